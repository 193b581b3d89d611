"""The config: its schema (Hydra structured configs) and its composition from the packaged ``conf/``.

Hydra checks key names and types against these dataclasses (a wrong key or a value of the wrong
type is refused when the config is composed); ``fl_sim.validation`` checks what depends on values.
Only ``fl_sim`` sees this config; attacks and defenses receive typed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message says which key and how to fix it."""


@dataclass
class DatasetConfig:
    name: str = MISSING
    path: Optional[str] = None  # user data: folder or file, per dataset
    hf_name: Optional[str] = None  # huggingface: hub name or local path
    hf_split: str = "train"
    image_key: str = "image"
    label_key: str = "label"
    test_fraction: float = 0.2  # held out for central evaluation
    max_examples: Optional[int] = None  # keep the first N (after shuffling) if set
    normalize: bool = True  # per-channel mean/std of the training split
    # synthetic (FedProx's synthetic(alpha, beta), conf/dataset/synthetic.yaml)
    alpha: float = 1.0
    beta: float = 1.0
    iid: bool = False
    dimension: int = 60
    classes: int = 10
    size_mean: float = 4.0
    size_sigma: float = 2.0
    min_size: int = 1


@dataclass
class ModelConfig:
    name: str = MISSING
    width: int = 64
    hidden: List[int] = field(default_factory=lambda: [200, 200])
    activation: str = "relu"
    lr: float = 0.05  # the clients' learning rate unless client.lr is set (conf/model/*.yaml: each model's)


@dataclass
class PartitionConfig:
    name: str = MISSING
    alpha: float = 0.5  # dirichlet concentration
    classes_per_client: int = 2  # pathological
    min_partition_size: int = 1  # dirichlet resamples until every client has this many


@dataclass
class StrategyConfig:
    name: str = MISSING
    fraction_train: float = 1.0
    min_train_clients: int = 1
    proximal_mu: float = 0.0  # fedprox
    eta: float = 0.1  # fedadam / fedyogi server lr
    eta_l: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.0
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end
    num_malicious_clients: int = 0  # krum: f, the number of Byzantine clients tolerated


@dataclass
class ScenarioConfig:
    name: str = "federated"  # federated | split
    mode: Optional[str] = None  # split: vanilla (clients take turns) | splitfed (in parallel, FedAvg of client models)
    cut_layer: Optional[str] = None  # split: the last layer the client keeps (None: its first non-linearity)
    head_layer: Optional[str] = None  # split, label-private U-shape: the client also keeps the layers after this one


@dataclass
class AttackConfig:
    name: str = "none"
    target_clients: List[int] = field(default_factory=lambda: [0])  # [] = every sampled client
    rounds: List[int] = field(default_factory=list)  # [] = every round
    iterations: int = 1000  # inverting_gradients: optimisation steps per restart
    restarts: int = 1
    lr: float = 0.1
    tv: float = 1e-4  # weight of total variation
    bn_prior: float = 0.0  # weight of GradInversion's BatchNorm statistics term (targets from the update's running stats)
    bn_mode: str = "train"  # BatchNorm as the attacker replays the client's training: train (what the simulated
    # clients do: batch statistics) | eval (running statistics, breaching's reference setting)
    signed: bool = True  # Adam on the sign of the gradient (Geiping et al.)
    max_evaluations: int = 3000  # dlg / idlg: L-BFGS objective evaluations
    bins: int = 128  # imprint: number of bins of the imprint block
    gain: float = 1e-7  # imprint: the block's first layer scaled down, its second up (attacks/imprint.py)
    strength: float = 1e-2  # imprint: how far the block moves the input (x' = x + about this much)
    labels_known: bool = False  # threat model: the server knows the clients' labels
    seed: int = 0
    auxiliary_fraction: float = 0.0  # share of the training pool set aside as the attacker's own data
    gradient_penalty: float = 10.0  # fsha: WGAN-GP weight of its critic
    scoring: str = "direction"  # label_leakage: direction | norm (binary tasks)
    batch: int = 0  # split learning: which batch of a client's turn is attacked (0: the first)
    workers: int = 2  # attacks of one round run in parallel as Ray tasks (0: in the server process)
    pictures: int = 20  # pictures per round at most (the first targets by client id); every attack is scored
    num_cpus: Optional[float] = None  # threads of each attack (None: the CPUs free while the round's attacks run, shared)
    num_gpus: float = 0.0  # GPU share of each attack worker (Ray; 0.25 puts four on one GPU); device= picks it
    # model inversion of a trained model (mi_face, gmi, deepinversion): observed "model"
    on: str = "final"  # which model is attacked: final (the global model after the last round) | client (the global
    # model a participant, attacker_client, receives in each round it is sampled: FedInverse's passive client)
    attacker_client: int = 0  # on=client: the participant that attacks (it trains honestly on its own partition)
    injected: int = 50  # hitaj: generated samples per target class the attacker trains on each round (0: passive)
    fake_class: int = -1  # hitaj: the attacker's own class its generated samples are labelled with (-1: its first)
    auxiliary: str = "disjoint_classes"  # the attacker's public data: disjoint_classes | split (auxiliary_fraction)
    private_classes: List[int] = field(default_factory=list)  # disjoint_classes: the clients' classes ([]: lower half)
    target_classes: List[int] = field(default_factory=list)  # classes to reconstruct ([]: every private class)
    per_class: int = 5  # reconstructions per target class
    momentum: float = 0.9  # gmi: Nesterov momentum of the latent search
    lam: float = 100.0  # gmi: weight of the identity loss against the prior
    patience: int = 100  # mi_face: stop after this many iterations without improvement
    bn_weight: float = 10.0  # deepinversion: weight of the BatchNorm statistics term
    samples: int = 8  # kedmi: latents drawn per class and iteration from the learned distribution
    top_k: int = 30  # plgmi: public images pseudo-labelled per class
    alpha: float = 0.2  # plgmi: weight of the max-margin term in the conditional GAN's generator loss
    latent_dim: int = 100  # GAN prior: latent size
    gan_width: int = 64  # GAN prior: base width of generator and critic
    gan_steps: int = 2000  # GAN prior: generator steps (each after critic_steps critic steps)
    gan_batch_size: int = 64
    gan_lr: float = 2.0e-4
    critic_steps: int = 5
    precision: str = "float32"  # model inversion: forward passes in float32 | bfloat16 (autocast; GMI 1.3-1.6x
    # faster, measured on a 2-core CPU with AVX-512 BF16; the latents, images and losses stay float32)


@dataclass
class DefenseConfig:
    """Client-side defenses. Each ``conf/defense/<name>.yaml`` switches its flag on, so that
    ``defense=[dpsgd,prune]`` stacks them; ``name`` is then rewritten to "dpsgd+prune"."""

    name: str = "none"
    dpsgd: bool = False  # sample-level DP-SGD (Opacus) in local training
    central_dp: bool = False  # user-level DP: clipping + noise of client updates (Flower's DP wrappers)
    prune: bool = False  # magnitude pruning of the update (client mod)
    quantize: bool = False  # k-bit quantisation of the update (client mod)
    noise: bool = False  # Gaussian noise on the update (client mod)
    secagg: bool = False  # Flower's SecAgg+: the server only sees the aggregate
    local_dp: bool = False  # Flower's LocalDpMod: each client clips and noises its own update
    cut_noise: bool = False  # split learning: noise on the activations the client sends
    cut_dropout: bool = False  # split learning: dropout on the activations the client sends
    nopeek: bool = False  # split learning: NoPeek's distance-correlation loss on the client side
    mid: bool = False  # model inversion: MID's variational information bottleneck before the classifier
    label_smoothing: bool = False  # model inversion: label smoothing of signed factor smoothing (negative defends)
    bido: bool = False  # model inversion: BiDO's bilateral dependency (COCO) of hidden layers with input and label
    # dpsgd
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"  # rdp | prv (Opacus)
    delta: float = 1e-5
    target_epsilon: Optional[float] = None  # calibrate noise_multiplier to this ε over the planned rounds
    max_epsilon: Optional[float] = None  # a client stops training once its next round would exceed it
    grad_sample_mode: str = "auto"  # auto | hooks | functorch | ew | ghost (auto: fastest measured for the model)
    # central_dp
    central_side: str = "server"  # server: the server clips and adds noise; client: clients clip
    central_clipping: str = "fixed"  # fixed | adaptive (Andrew et al. 2021)
    central_noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # fixed clipping norm (central_dp: the initial one if adaptive; local_dp too)
    # local_dp (delta, accountant, max_epsilon and clipping_norm as above)
    local_epsilon: float = 1.0  # nominal ε of one release (one round's update)
    local_sensitivity: Optional[float] = None  # L2 sensitivity of the clipped update (default: clipping_norm)
    # the local optimiser and learning rate a defense needs (client.optimizer / client.lr follow them unless given;
    # null: sgd and the model's lr). MID's bottleneck sets adam at 0.001 (conf/defense/mid.yaml says why)
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    # mid (Wang et al., AAAI 2021) / label_smoothing (Struppek et al., ICLR 2024)
    mid_beta: float = 0.01  # weight of the bottleneck's KL (bits) in the loss
    mid_dim: int = 0  # bottleneck dimensions (0: half the classifier's input width, as the authors' code)
    mid_eval: str = "sample"  # the deployed model draws z ~ N(mu, sigma^2) on every call (the authors' code) | mean
    smoothing: float = -0.05  # alpha: targets (1 - alpha) onehot + alpha / K; > 0 helps the attacker
    bido_lambda_x: float = 1.0  # bido (Peng et al., KDD 2022): weight of the input-feature dependency (lowered)
    bido_lambda_y: float = 50.0  # weight of the feature-label dependency (raised); (1, 50): their MNIST COCO
    bido_sigma: float = 5.0  # Gaussian kernel width (times sqrt of the features' dimension)
    # prune / quantize / noise
    prune_ratio: float = 0.5  # fraction of each layer's update set to zero (smallest magnitudes)
    quantize_bits: int = 8
    noise_std: float = 0.01
    # secagg (Flower's SecAggPlusWorkflow): a value > 1 counts clients, one in (0, 1] is a fraction
    secagg_num_shares: float = 1.0  # shares of each client's secrets (1.0: every sampled client)
    secagg_reconstruction_threshold: float = 0.5  # shares needed to unmask (tolerates the other clients dropping)
    secagg_clipping_range: float = 8.0  # model values are clipped to +-this before quantisation
    # split learning, at the cut
    cut_noise_kind: str = "gaussian"  # gaussian | laplace (Titcombe et al. 2021)
    cut_noise_scale: float = 0.5  # standard deviation (gaussian) or scale b (laplace)
    cut_dropout_p: float = 0.5
    nopeek_alpha: float = 0.5  # weight of dCor(x, activations) in the client's loss (Vepakomma et al. 2020)


@dataclass
class ClientResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class BackendConfig:
    client_resources: ClientResources = field(default_factory=ClientResources)
    ray_address: Optional[str] = None  # join an existing Ray cluster ("auto", "ip:port")
    num_cpus: Optional[int] = None  # CPUs a local Ray instance may use (default: all)
    num_gpus: Optional[int] = None
    max_actor_restarts: int = -1  # Ray restarts a client actor whose process died (-1: always)
    connect_timeout: float = 60.0  # seconds the server waits for num_clients clients to connect
    clients_per_node: Optional[int] = None  # virtual clients per simulated node (fl_sim.cohorts); None: auto


@dataclass
class ClientConfig:
    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.0
    weight_decay: float = 0.0
    dropout: float = 0.0  # probability that a sampled client drops out of a round (seeded per round and client)


@dataclass
class FaultsConfig:
    """Simulated client failures, seeded per (seed, round, client): the same in every run."""

    client_crash_rate: float = 0.0  # probability that a sampled client fails during training
    crash_mode: str = "raise"  # raise: an exception in the client | exit: its Ray actor process dies
    straggler_rate: float = 0.0  # probability that a sampled client is slow
    straggler_seconds: float = 0.0  # how much slower (beyond round_timeout: its reply is lost)
    nan_update_rate: float = 0.0  # probability that a sampled client sends an update full of NaN (diverged)


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    partition: PartitionConfig = MISSING
    strategy: StrategyConfig = MISSING
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    num_clients: int = 10
    num_rounds: int = 3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512
    round_timeout: float = 3600.0
    verbose: bool = False
    report: bool = True
    checkpoint: bool = True  # write checkpoint.pt after every round (removed when the run completes)
    save_model: bool = False  # write the final global model to final_model.pt (a weights-only state dict)
    cache_dir: Optional[str] = None  # trained GAN priors and evaluation classifiers ($FL_SIM_CACHE or ~/.cache/fl_sim)


def _first(*values):
    """The first value that is not null (``${fl_sim.first:${defense.lr},${model.lr}}``)."""
    return next((v for v in values if v is not None), None)


def register_configs() -> None:
    if not OmegaConf.has_resolver("fl_sim.first"):
        OmegaConf.register_new_resolver("fl_sim.first", _first)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in [
        ("dataset", DatasetConfig),
        ("model", ModelConfig),
        ("partition", PartitionConfig),
        ("strategy", StrategyConfig),
        ("scenario", ScenarioConfig),
        ("attack", AttackConfig),
        ("defense", DefenseConfig),
    ]:
        cs.store(group=group, name=f"base_{group}", node=node)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the packaged config with Hydra overrides (the same config ``fl-sim`` would run)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fl_sim.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))
