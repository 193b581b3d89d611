"""The checks Hydra cannot make: what depends on values (ranges, finite numbers, keys that ``+key=``
added) and on combinations of groups (an attack for another scenario, defenses that do not stack).
Each failure is a ``ConfigError`` of one line naming the key and how to fix it. Also the options
each group offers, and the stacked defense's name ("dpsgd+prune")."""

from __future__ import annotations

import math
from dataclasses import is_dataclass
from typing import Any, get_type_hints

from omegaconf import OmegaConf

from fl_sim.config import Config, ConfigError

DATASETS = ("mnist", "digits", "cifar10_samples", "cifar100_samples", "fashion_mnist_samples",
            "cifar_pickle", "mnist_idx", "huggingface", "synthetic")
MODELS = ("mlp", "cnn", "lenet", "convnet", "resnet18")
PARTITIONS = ("iid", "dirichlet", "pathological", "natural")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian",
              "fedtrimmedavg", "krum")
OPTIMIZERS = ("sgd", "adam")
ATTACKS = ("none", "dlg", "idlg", "inverting_gradients", "analytic", "imprint",
           "rmle", "inverse_network", "unsplit", "fsha", "label_leakage", "mi_face", "gmi", "kedmi", "plgmi",
           "deepinversion", "hitaj")
SPLIT_ATTACKS = ("rmle", "inverse_network", "unsplit", "fsha", "label_leakage")  # activations / cut gradients
# model inversion of the trained model (observed: model); hitaj: an active participant, every round
MODEL_ATTACKS = ("mi_face", "gmi", "kedmi", "plgmi", "deepinversion", "hitaj")
GAN_ATTACKS = ("gmi", "kedmi", "plgmi")  # model inversion with a GAN prior trained on the auxiliary data
PRECISIONS = ("float32", "bfloat16")  # attack.precision: attacks.base.PRECISIONS (not imported: no torch here)
MALICIOUS_ATTACKS = ("imprint", "fsha")  # the server changes what it sends (the model; the split gradients)
UPDATE_ATTACKS = ("dlg", "idlg", "inverting_gradients", "analytic", "imprint")  # a client's update, or the aggregate
SCENARIOS = ("federated", "split")
SPLIT_MODES = ("vanilla", "splitfed")


DEFENSES = ("dpsgd", "mid", "label_smoothing", "bido", "central_dp", "local_dp", "prune", "quantize", "noise", "secagg",
            "cut_noise", "cut_dropout", "nopeek")
UPDATE_DEFENSES = ("central_dp", "local_dp", "prune", "quantize", "noise", "secagg")  # federated only
INVERSION_DEFENSES = ("mid", "label_smoothing", "bido")  # the federated model's training loss (model inversion)
CUT_DEFENSES = ("cut_noise", "cut_dropout", "nopeek")  # split only
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")
ACCOUNTANTS = ("rdp", "prv")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu")  # fl_sim.models.ACTIVATIONS


def active_defenses(cfg: Any) -> list[str]:
    """The defenses switched on, in the order they act (training first, then the update)."""
    return [d for d in DEFENSES if bool(cfg.defense[d])]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(key: str, value: Any, options: tuple) -> None:
    _need(value in options, f"{key}={value!r} is not known; choose one of {', '.join(options)}")


def _unknown_keys(node: dict, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``node`` that the dataclass ``schema`` does not declare (Hydra lets ``+key=value`` add them)."""
    types = get_type_hints(schema)
    out = []
    for key, value in node.items():
        if key not in types:
            out.append(prefix + str(key))
        elif is_dataclass(types[key]) and isinstance(value, dict):
            out += _unknown_keys(value, types[key], f"{prefix}{key}.")
    return out


def _non_finite(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(key, value) of every NaN or Inf number in the config (Hydra reads ``nan`` and ``inf`` as floats)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    out = []
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(node, dict) else f"{prefix.rstrip('.')}[{key}]"
        if isinstance(value, float) and not math.isfinite(value):
            out.append((name, value))
        elif isinstance(value, (dict, list)):
            out += _non_finite(value, name + ".")
    return out


def validate(cfg: Any) -> None:
    """Check value ranges and group combinations; raise ConfigError naming the key."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    for key in _unknown_keys(plain, Config):
        raise ConfigError(f"{key} is not a key of fl-sim's config (added with +?); fl-sim --cfg job lists the keys")
    for key, value in _non_finite(plain):
        raise ConfigError(f"{key}={value} is not a finite number")
    _need(cfg.num_clients >= 1, f"num_clients must be at least 1 (got {cfg.num_clients}); set num_clients=N with N >= 1")
    _need(cfg.num_rounds >= 1, f"num_rounds must be at least 1 (got {cfg.num_rounds}); set num_rounds=N with N >= 1")
    for key, value in (("seed", cfg.seed), ("attack.seed", cfg.attack.seed)):
        _need(0 <= int(value) < 2**32, f"{key}={value} is not a seed: use an integer from 0 to 2**32 - 1")
    _need(str(cfg.device) in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
          f"device={cfg.device!r} is not known; use auto, cpu, cuda or cuda:N")
    _choice("dataset", cfg.dataset.name, DATASETS)
    _choice("model", cfg.model.name, MODELS)
    _choice("partition", cfg.partition.name, PARTITIONS)
    _choice("strategy", cfg.strategy.name, STRATEGIES)
    _choice("client.optimizer", cfg.client.optimizer, OPTIMIZERS)
    _choice("scenario", cfg.scenario.name, SCENARIOS)
    _choice("attack", cfg.attack.name, ATTACKS)
    split = cfg.scenario.name == "split"
    if split:
        _choice("scenario.mode", cfg.scenario.mode, SPLIT_MODES)
        _need(cfg.attack.name not in MODEL_ATTACKS,
              f"attack={cfg.attack.name} inverts the trained global model; model inversion runs with "
              "scenario=federated (a split run has no global model to release)")
        _need(cfg.attack.name in ("none",) + SPLIT_ATTACKS,
              f"attack={cfg.attack.name} attacks model updates; with scenario=split the server sees activations: "
              f"choose attack={'|'.join(SPLIT_ATTACKS)} or none")
        _need(cfg.attack.batch >= 0, f"attack.batch must be >= 0 (got {cfg.attack.batch})")
        u_shape = bool(cfg.scenario.head_layer)
        _need(cfg.attack.name != "label_leakage" or u_shape,
              "attack=label_leakage infers labels that stay with the client: set scenario.head_layer "
              "(the label-private U-shape), e.g. scenario.head_layer=body.3")
        _choice("attack.scoring", cfg.attack.scoring, ("direction", "norm"))
        _need(not (u_shape and cfg.attack.name == "fsha"),
              "attack=fsha hijacks a split where the server computes the loss; unset scenario.head_layer")
        _need(not cfg.defense.dpsgd or cfg.defense.grad_sample_mode in ("auto", "hooks"),
              f"defense.grad_sample_mode={cfg.defense.grad_sample_mode}: split learning's DP-SGD uses Opacus' hooks "
              "(per message, on the client-side bottom); use auto or hooks")
        _need(not (u_shape and cfg.defense.dpsgd),
              "defense=dpsgd trains the client-side bottom; with scenario.head_layer (U-shape) the client's head is "
              "not covered: unset scenario.head_layer or drop dpsgd")
        _need(cfg.strategy.name == "fedavg", f"scenario=split averages client models with FedAvg (splitfed); "
                                             f"use strategy=fedavg (got strategy={cfg.strategy.name})")
        _need(not cfg.save_model, "save_model=true writes the final global model of a federated run; a split run "
                                  "has none (set save_model=false)")
    else:
        _need(not cfg.scenario.head_layer, "scenario.head_layer is for scenario=split (the label-private U-shape)")
        _need(cfg.attack.name not in SPLIT_ATTACKS,
              f"attack={cfg.attack.name} inverts split-learning activations; use it with scenario=split")
    _need(0 <= cfg.attack.auxiliary_fraction < 1,
          f"attack.auxiliary_fraction must be in [0, 1) (got {cfg.attack.auxiliary_fraction})")
    _need(cfg.attack.name not in ("inverse_network", "fsha") or cfg.attack.auxiliary_fraction > 0,
          f"attack={cfg.attack.name} trains on the attacker's own data: set attack.auxiliary_fraction "
          "in (0, 1), e.g. 0.1")
    if cfg.attack.name in MODEL_ATTACKS:
        validate_model_inversion(cfg)
    else:
        _need(cfg.attack.precision == "float32",
              f"attack.precision={cfg.attack.precision} is for the model-inversion attacks "
              f"({', '.join(MODEL_ATTACKS)}); attack={cfg.attack.name} computes in float32: drop the override")
    bad = [c for c in cfg.attack.target_clients if not 0 <= c < cfg.num_clients]
    _need(not bad, f"attack.target_clients={list(cfg.attack.target_clients)}: {bad} are not clients "
                   f"(clients are 0..{cfg.num_clients - 1})")
    bad = [r for r in cfg.attack.rounds if not 1 <= r <= cfg.num_rounds]
    _need(not bad, f"attack.rounds={list(cfg.attack.rounds)}: {bad} are not rounds (1..{cfg.num_rounds})")
    _need(cfg.attack.iterations >= 1, f"attack.iterations must be at least 1 (got {cfg.attack.iterations})")
    _need(cfg.attack.restarts >= 1, f"attack.restarts must be at least 1 (got {cfg.attack.restarts})")
    _need(cfg.attack.max_evaluations >= 1, f"attack.max_evaluations must be at least 1 (got {cfg.attack.max_evaluations})")
    _need(cfg.attack.bins >= 2, f"attack.bins must be at least 2 (got {cfg.attack.bins})")
    _need(cfg.attack.gain > 0, f"attack.gain must be > 0 (got {cfg.attack.gain:g})")
    _need(cfg.attack.strength > 0, f"attack.strength must be > 0 (got {cfg.attack.strength:g})")
    _need(cfg.attack.workers >= 0, f"attack.workers must be >= 0 (got {cfg.attack.workers})")
    _need(cfg.attack.bn_mode in ("train", "eval"),
          f"attack.bn_mode must be train or eval (got {cfg.attack.bn_mode!r}): how the client's BatchNorm ran")
    _need(cfg.attack.num_cpus is None or cfg.attack.num_cpus > 0, f"attack.num_cpus must be > 0 (got {cfg.attack.num_cpus})")
    _need(cfg.attack.num_gpus >= 0, f"attack.num_gpus must be >= 0 (got {cfg.attack.num_gpus})")
    _need(cfg.attack.num_gpus == 0 or str(cfg.device) != "cpu",
          f"attack.num_gpus={cfg.attack.num_gpus:g} with device=cpu: the attack workers would hold GPUs they do not "
          "use; set device=auto or cuda, or attack.num_gpus=0")
    replaying = cfg.attack.name in ("dlg", "idlg", "inverting_gradients")
    _need(not replaying or (cfg.client.optimizer == "sgd" and cfg.client.momentum == 0
                            and cfg.client.weight_decay == 0 and cfg.strategy.proximal_mu == 0),
          f"attack={cfg.attack.name} replays the client's plain SGD steps; set client.optimizer=sgd "
          "client.momentum=0 client.weight_decay=0 strategy.proximal_mu=0 (or choose attack=analytic/imprint)")
    _need(cfg.attack.name != "analytic" or cfg.model.name == "mlp",
          f"attack=analytic needs a model whose first layer is fully connected; use model=mlp (got model={cfg.model.name})")
    validate_defense(cfg)
    if cfg.dataset.name == "synthetic":
        validate_synthetic(cfg)
    _need(0.0 < cfg.dataset.test_fraction < 1.0,
          f"dataset.test_fraction must be in (0, 1) (got {cfg.dataset.test_fraction})")
    _need(cfg.dataset.max_examples is None or cfg.dataset.max_examples >= 2,
          f"dataset.max_examples must be at least 2 (got {cfg.dataset.max_examples})")
    _need(0.0 < cfg.strategy.fraction_train <= 1.0,
          f"strategy.fraction_train must be in (0, 1] (got {cfg.strategy.fraction_train}); "
          "it is the fraction of clients sampled each round")
    _need(cfg.strategy.min_train_clients >= 1,
          f"strategy.min_train_clients must be at least 1 (got {cfg.strategy.min_train_clients})")
    _need(cfg.strategy.min_train_clients <= cfg.num_clients,
          f"strategy.min_train_clients={cfg.strategy.min_train_clients} exceeds num_clients={cfg.num_clients}")
    _need(0.0 <= cfg.strategy.trim_beta < 0.5,
          f"strategy.trim_beta must be in [0, 0.5) (got {cfg.strategy.trim_beta})")
    _need(cfg.strategy.proximal_mu >= 0, f"strategy.proximal_mu must be >= 0 (got {cfg.strategy.proximal_mu})")
    _need(cfg.partition.alpha > 0, f"partition.alpha must be > 0 (got {cfg.partition.alpha})")
    _need(cfg.partition.classes_per_client >= 1,
          f"partition.classes_per_client must be at least 1 (got {cfg.partition.classes_per_client})")
    _need(cfg.client.batch_size >= 1, f"client.batch_size must be at least 1 (got {cfg.client.batch_size})")
    _need(cfg.client.local_epochs >= 1, f"client.local_epochs must be at least 1 (got {cfg.client.local_epochs})")
    _need(cfg.client.lr > 0, f"client.lr must be > 0 (got {cfg.client.lr})")
    _need(cfg.client.momentum >= 0, f"client.momentum must be >= 0 (got {cfg.client.momentum})")
    _need(cfg.client.weight_decay >= 0, f"client.weight_decay must be >= 0 (got {cfg.client.weight_decay})")
    _need(0 <= cfg.client.dropout < 1, f"client.dropout must be in [0, 1) (got {cfg.client.dropout}); "
                                       "it is the probability that a sampled client drops out of a round")
    f = cfg.faults
    _need(0 <= f.client_crash_rate < 1, f"faults.client_crash_rate must be in [0, 1) (got {f.client_crash_rate})")
    _choice("faults.crash_mode", f.crash_mode, ("raise", "exit"))
    _need(0 <= f.straggler_rate <= 1, f"faults.straggler_rate must be in [0, 1] (got {f.straggler_rate})")
    _need(0 <= f.nan_update_rate <= 1, f"faults.nan_update_rate must be in [0, 1] (got {f.nan_update_rate})")
    _need(f.nan_update_rate == 0 or (cfg.scenario.name == "federated" and not cfg.defense.secagg),
          "faults.nan_update_rate simulates a NaN model update: federated runs without secagg only")
    _need(f.straggler_seconds >= 0, f"faults.straggler_seconds must be >= 0 (got {f.straggler_seconds})")
    _need(cfg.eval_batch_size >= 1, f"eval_batch_size must be at least 1 (got {cfg.eval_batch_size})")
    _need(cfg.round_timeout > 0, f"round_timeout must be > 0 seconds (got {cfg.round_timeout})")
    _need(cfg.backend.connect_timeout > 0,
          f"backend.connect_timeout must be > 0 seconds (got {cfg.backend.connect_timeout})")
    _need(cfg.attack.pictures >= 0, f"attack.pictures must be >= 0 (pictures per round; got {cfg.attack.pictures})")
    per_node = cfg.backend.get("clients_per_node")
    _need(per_node is None or per_node >= 1,
          f"backend.clients_per_node must be at least 1, or null for automatic (got {per_node})")
    _need(per_node is None or per_node == 1 or not (cfg.scenario.name == "split" or cfg.defense.secagg),
          f"backend.clients_per_node={per_node}: cohorts are for federated runs without SecAgg+ (SecAgg+ and split "
          "learning need one node per client); set backend.clients_per_node=1 or null")
    res = cfg.backend.client_resources
    _need(res.num_cpus > 0, f"backend.client_resources.num_cpus must be > 0 (got {res.num_cpus})")
    _need(cfg.backend.max_actor_restarts >= -1,
          f"backend.max_actor_restarts must be -1 (always) or >= 0 (got {cfg.backend.max_actor_restarts})")
    _need(res.num_gpus >= 0, f"backend.client_resources.num_gpus must be >= 0 (got {res.num_gpus})")
    if res.num_gpus > 0 and not cfg.backend.ray_address and cfg.backend.num_gpus is None:
        import torch  # here, not at import: `fl-sim --help` and config errors answer without it

        # Flower's pool would hold no client actor on a local instance without GPUs, and stop with a traceback
        _need(torch.cuda.device_count() > 0,
              f"backend.client_resources.num_gpus={res.num_gpus:g} but torch sees no GPU on this machine, so no "
              "client could start; set it to 0 (or join a cluster with GPUs: backend.ray_address)")
    _need(cfg.backend.num_cpus is None or cfg.backend.num_cpus >= 1,
          f"backend.num_cpus must be at least 1 (got {cfg.backend.num_cpus})")
    _need(cfg.backend.num_cpus is None or res.num_cpus <= cfg.backend.num_cpus,
          f"backend.client_resources.num_cpus={res.num_cpus} exceeds backend.num_cpus={cfg.backend.num_cpus}: "
          "no client could start")
    _choice("model.activation", cfg.model.activation, ACTIVATIONS)
    _need(cfg.model.width >= 1, f"model.width must be at least 1 (got {cfg.model.width})")
    _need(all(h >= 1 for h in cfg.model.hidden),  # mlp with none: multinomial logistic regression
          f"model.hidden must list positive layer sizes (got {list(cfg.model.hidden)})")


def validate_synthetic(cfg: Any) -> None:
    """FedProx's synthetic devices: feature vectors (model=mlp), no attack on images, sizes that leave
    every device a training example."""
    d = cfg.dataset
    _need(cfg.model.name == "mlp", f"dataset=synthetic holds vectors of {d.dimension} features, not images: use "
          f"model=mlp, not model={cfg.model.name}, or experiment=cross_device (FedProx's setting: logistic regression, "
          "partition=natural, attack=none)")
    _need(cfg.attack.name == "none", f"dataset=synthetic holds feature vectors, not images, so attack={cfg.attack.name}"
          "'s image scores (PSNR, SSIM, attack accuracy) would mean nothing: use attack=none "
          "(experiment=cross_device sets everything for scale)")
    _need(cfg.scenario.name == "federated", "dataset=synthetic is for federated runs (scenario=federated)")
    _need(d.min_size >= 2, f"dataset.min_size must be at least 2 (a device keeps 90% of its examples for training; "
          f"got {d.min_size})")
    _need(d.alpha >= 0 and d.beta >= 0 and d.size_sigma >= 0,
          f"dataset.alpha, dataset.beta and dataset.size_sigma must be >= 0 (got {d.alpha}, {d.beta}, {d.size_sigma})")
    _need(d.dimension >= 1 and d.classes >= 2,
          f"dataset.dimension must be >= 1 and dataset.classes >= 2 (got {d.dimension}, {d.classes})")


def validate_model_inversion(cfg: Any) -> None:
    """The settings of a model-inversion attack (the classes it may target are checked once the data are
    loaded: ``fl_sim.inversion.check_targets``)."""
    a = cfg.attack
    _choice("attack.on", a.on, ("final", "client"))
    _need(a.name != "hitaj" or a.on == "client",
          "attack=hitaj is a participant that trains a GAN against each round's global model: set attack.on=client "
          "(and attack.attacker_client)")
    _need(a.injected >= 0, f"attack.injected must be >= 0 (got {a.injected}; 0: a passive attacker)")
    _need(not (a.name == "hitaj" and a.injected > 0 and cfg.defense.secagg),
          "attack=hitaj with attack.injected > 0 puts samples into the attacker's training, which fl-sim's SecAgg+ "
          "path does not carry: use attack.injected=0 (passive) with defense=secagg, or drop secagg")
    _need(a.on != "client" or 0 <= a.attacker_client < cfg.num_clients,
          f"attack.attacker_client={a.attacker_client} is not a client (clients are 0..{cfg.num_clients - 1})")
    _choice("attack.auxiliary", a.auxiliary, ("disjoint_classes", "split"))
    _need(a.auxiliary != "split" or a.auxiliary_fraction > 0,
          "attack.auxiliary=split gives the attacker a fraction of the clients' classes: set "
          "attack.auxiliary_fraction in (0, 1), e.g. 0.2")
    _need(a.auxiliary != "disjoint_classes" or a.auxiliary_fraction == 0,
          f"attack.auxiliary_fraction={a.auxiliary_fraction} is for attack.auxiliary=split; with disjoint_classes "
          "the attacker's data are the public classes (set attack.auxiliary_fraction=0)")
    _need(a.auxiliary == "disjoint_classes" or not a.private_classes,
          "attack.private_classes divides the classes (attack.auxiliary=disjoint_classes); with auxiliary=split "
          "every class is private")
    _need(a.per_class >= 1, f"attack.per_class must be at least 1 (got {a.per_class})")
    _choice("attack.precision", a.precision, PRECISIONS)
    _need(a.lr > 0, f"attack.lr must be > 0 (got {a.lr})")
    _need(a.name != "mi_face" or a.patience >= 1, f"attack.patience must be at least 1 (got {a.patience})")
    if a.name in GAN_ATTACKS:
        for key in ("latent_dim", "gan_steps", "gan_batch_size", "critic_steps"):
            _need(a[key] >= 1, f"attack.{key} must be at least 1 (got {a[key]})")
        _need(a.gan_width >= 2, f"attack.gan_width must be at least 2 (got {a.gan_width})")
        _need(a.gan_lr > 0, f"attack.gan_lr must be > 0 (got {a.gan_lr})")
        _need(a.lam >= 0 and a.momentum >= 0, f"attack.lam and attack.momentum must be >= 0 (got {a.lam}, {a.momentum})")
        _need(a.samples >= 1 and a.top_k >= 1, f"attack.samples and attack.top_k must be at least 1 (got {a.samples}, "
                                               f"{a.top_k})")
    if a.name == "deepinversion":
        _need(cfg.model.name in ("convnet", "resnet18") and not cfg.defense.dpsgd,
              f"attack=deepinversion matches the statistics stored in BatchNorm layers: model={cfg.model.name}"
              f"{' under defense=dpsgd (GroupNorm)' if cfg.defense.dpsgd else ''} has none; use model=convnet or "
              "model=resnet18 without dpsgd, or another attack (gmi, mi_face)")


def validate_defense(cfg: Any) -> None:
    d = cfg.defense
    on = active_defenses(cfg)
    _need(d.name == "none" or on, f"defense={d.name} is not known; choose none or one or more of {', '.join(DEFENSES)}")
    split = cfg.scenario.name == "split"
    inversion = [x for x in on if x in INVERSION_DEFENSES]
    _need(not (split and inversion), f"defense={'+'.join(inversion)} acts on the federated model's training loss "
                                     "(against model inversion), which split learning does not train; use it with "
                                     "scenario=federated")
    wrong = [x for x in on if x in (UPDATE_DEFENSES if split else CUT_DEFENSES)]
    _need(not wrong, f"defense={'+'.join(wrong)} acts on "
                     + ("model updates, which split learning does not send; with scenario=split use "
                        f"{', '.join(CUT_DEFENSES)} or dpsgd" if split else
                        "split-learning activations; use it with scenario=split"))
    if "cut_noise" in on:
        _choice("defense.cut_noise_kind", d.cut_noise_kind, ("gaussian", "laplace"))
        _need(d.cut_noise_scale >= 0, f"defense.cut_noise_scale must be >= 0 (got {d.cut_noise_scale})")
    if "cut_dropout" in on:
        _need(0 <= d.cut_dropout_p < 1, f"defense.cut_dropout_p must be in [0, 1) (got {d.cut_dropout_p})")
    if "nopeek" in on:
        _need(d.nopeek_alpha >= 0, f"defense.nopeek_alpha must be >= 0 (got {d.nopeek_alpha})")
        _need("dpsgd" not in on, "defense=nopeek's distance correlation mixes the examples of a batch, so DP-SGD's "
                                 "per-example clipping cannot bound it; choose nopeek or dpsgd")
    if "mid" in on:
        _need(d.mid_beta >= 0, f"defense.mid_beta must be >= 0 (got {d.mid_beta})")
        _need(d.mid_dim >= 0, f"defense.mid_dim must be >= 0 (got {d.mid_dim}); 0 takes half the classifier's input")
        _need(d.mid_eval in ("sample", "mean"), f"defense.mid_eval must be sample or mean (got {d.mid_eval!r}): "
                                                "whether the deployed model draws z or uses its mean")
    if "label_smoothing" in on:
        _need(-1 <= d.smoothing < 1, f"defense.smoothing must be in [-1, 1) (got {d.smoothing}); the paper's "
                                     "defense is about -0.05")
    if "bido" in on:
        _need(d.bido_lambda_x >= 0 and d.bido_lambda_y >= 0,
              f"defense.bido_lambda_x and bido_lambda_y must be >= 0 (got {d.bido_lambda_x}, {d.bido_lambda_y})")
        _need(d.bido_sigma > 0, f"defense.bido_sigma must be > 0 (got {d.bido_sigma})")
        _need("dpsgd" not in on, "defense=bido's dependency term mixes the examples of a batch, so DP-SGD's "
                                 "per-example clipping cannot bound it; choose bido or dpsgd (mid and "
                                 "label_smoothing stack with dpsgd)")
    if "dpsgd" in on and set(on) & set(INVERSION_DEFENSES):
        _need(d.grad_sample_mode != "ghost",
              f"defense.grad_sample_mode=ghost computes Opacus' own cross-entropy; with "
              f"{'+'.join(x for x in on if x in INVERSION_DEFENSES)} use auto, hooks, functorch or ew")
    if "dpsgd" in on:
        _need(d.noise_multiplier >= 0, f"defense.noise_multiplier must be >= 0 (got {d.noise_multiplier})")
        _need(d.max_grad_norm > 0, f"defense.max_grad_norm must be > 0 (got {d.max_grad_norm})")
        _choice("defense.accountant", d.accountant, ACCOUNTANTS)
        _choice("defense.grad_sample_mode", d.grad_sample_mode, GRAD_SAMPLE_MODES)
        _need(0 < d.delta < 1, f"defense.delta must be in (0, 1) (got {d.delta}); 1e-5 or below 1/examples is usual")
        _need(d.target_epsilon is None or d.target_epsilon > 0,
              f"defense.target_epsilon must be > 0 (got {d.target_epsilon})")
        _need(d.max_epsilon is None or d.max_epsilon > 0, f"defense.max_epsilon must be > 0 (got {d.max_epsilon})")
        _need(cfg.strategy.proximal_mu == 0,
              "defense=dpsgd clips per-example gradients; the FedProx term is not per-example: "
              "use strategy.proximal_mu=0 (or another strategy)")
    if "local_dp" in on:
        _need("dpsgd" not in on, "defense=local_dp (user-level, per update) and dpsgd (per example) protect different "
                                 "neighbours and cannot share one ε; choose one")
        _need(d.local_epsilon > 0, f"defense.local_epsilon must be > 0 (got {d.local_epsilon})")
        _need(d.local_sensitivity is None or d.local_sensitivity > 0,
              f"defense.local_sensitivity must be > 0 (got {d.local_sensitivity})")
        _need(d.clipping_norm > 0, f"defense.clipping_norm must be > 0 (got {d.clipping_norm})")
        _need(0 < d.delta < 1, f"defense.delta must be in (0, 1) (got {d.delta})")
        _choice("defense.accountant", d.accountant, ACCOUNTANTS)
    if "central_dp" in on:
        _choice("defense.central_side", d.central_side, ("server", "client"))
        _choice("defense.central_clipping", d.central_clipping, ("fixed", "adaptive"))
        _need(d.central_noise_multiplier >= 0,
              f"defense.central_noise_multiplier must be >= 0 (got {d.central_noise_multiplier})")
        _need(d.clipping_norm > 0, f"defense.clipping_norm must be > 0 (got {d.clipping_norm})")
        _need(cfg.strategy.name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"),
              f"defense=central_dp needs an averaging strategy (DP noise is calibrated to a mean); "
              f"strategy={cfg.strategy.name} is not one")
    if "prune" in on:
        _need(0 <= d.prune_ratio < 1, f"defense.prune_ratio must be in [0, 1) (got {d.prune_ratio}); "
                                      "it is the fraction of each layer's update set to zero")
    if "quantize" in on:
        _need(1 <= d.quantize_bits <= 16, f"defense.quantize_bits must be in 1..16 (got {d.quantize_bits})")
    if "noise" in on:
        _need(d.noise_std >= 0, f"defense.noise_std must be >= 0 (got {d.noise_std})")
    if "secagg" in on:
        _need(not {"dpsgd", "central_dp", "local_dp"} & set(on),
              "defense=secagg stacks with prune, quantize and noise only (its legacy Flower workflow carries no "
              "DP accounting here); remove dpsgd/central_dp/local_dp")
        _need(cfg.strategy.name == "fedavg", f"defense=secagg runs Flower's FedAvg under SecAgg+; use strategy=fedavg "
                                             f"(got strategy={cfg.strategy.name})")
        for key in ("secagg_num_shares", "secagg_reconstruction_threshold"):
            v = d[key]
            _need(v > 0 and (v <= 1 or float(v).is_integer()),
                  f"defense.{key} must be a count (an integer > 1) or a fraction in (0, 1] (got {v})")
        _need(d.secagg_num_shares <= 1 or d.secagg_num_shares >= 3,
              f"defense.secagg_num_shares as a count must be at least 3 (got {d.secagg_num_shares})")
        _need(d.secagg_clipping_range > 0, f"defense.secagg_clipping_range must be > 0 (got {d.secagg_clipping_range})")
        n, s = cfg.num_clients, cfg.strategy
        sampled = min(n, max(int(n * s.fraction_train), s.min_train_clients))  # fl_sim.sampling.num_sampled's rule
        _need(sampled >= 2, f"defense=secagg needs at least 2 clients sampled each round (got {sampled}: num_clients={n}, "
                            f"strategy.fraction_train={s.fraction_train}); SecAgg+ masks an update with other clients'")
        shares, threshold = d.secagg_num_shares, d.secagg_reconstruction_threshold
        _need(shares <= 1 or shares <= sampled,
              f"defense.secagg_num_shares={int(shares)} exceeds the {sampled} clients sampled each round")
        if shares > 1:  # shares of each secret, as Flower's SecAggPlusWorkflow resolves them
            resolved = int(shares)
        else:
            resolved = round(shares * sampled)
            resolved += 1 if resolved < sampled and resolved % 2 == 0 else 0
            resolved = sampled if resolved <= 2 else resolved
        limit = resolved - 1 if shares > 1 else resolved  # Flower: a count threshold below a count of shares
        _need(threshold <= 1 or int(threshold) <= limit,
              f"defense.secagg_reconstruction_threshold={int(threshold)} exceeds the {limit} allowed with {resolved} "
              f"shares of each secret ({sampled} clients sampled each round)")


def defense_name(cfg: Any) -> str:
    """"none", or the active defenses joined by "+" (the name of a stacked defense)."""
    return "+".join(active_defenses(cfg)) or "none"
