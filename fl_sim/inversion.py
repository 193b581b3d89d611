"""Model inversion of the trained model (``attack=mi_face|gmi|kedmi|plgmi|deepinversion``, ``attack.on=final``).

Threat model: after training, anyone holding the final global model — the server, any client, a user
of the deployed model — inverts it, white-box, to reconstruct representatives of its private classes.
The attacker has auxiliary public data of its own: by default (``attack.auxiliary=disjoint_classes``,
the GMI/KEDMI/BiDO MNIST protocol) the dataset's classes are divided, the clients train on the private
ones (the lower half, or ``attack.private_classes``) and the attacker holds the training examples of the
public ones, which share no class with them; with ``attack.auxiliary=split`` it holds
``attack.auxiliary_fraction`` of the clients' own classes instead.

With ``attack.on=client`` the attacker is a participant instead (FedInverse, Wu et al., ICLR 2024): client
``attack.attacker_client`` trains honestly on its own partition, and in each round it is sampled
(``attack.rounds``: [] = every round) it inverts the global model it received, to reconstruct the private
classes its own partition lacks (``partition=pathological`` gives it few). It never reads another client's
data: its auxiliary data are the public ones, as above. Since it sees exactly what the server sent it, the
simulation runs its attack in the server's process after that round, one entry per attacked round.

The final-model attack runs in the server's process once the last round is done. A GAN prior (``gmi``) is trained
on the auxiliary data once (``kedmi``, ``plgmi``: per target model) and cached (``fl_sim.cache``). The evaluator then scores the reconstructions
with the evaluation classifier (``fl_sim.evaluation_classifier``), which no attack sees.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from omegaconf import DictConfig

from attacks.base import Knowledge, ModelObservation
from fl_sim import cache
from fl_sim.attacking import attack_from_config
from fl_sim.config import ConfigError
from fl_sim.data import FederatedData
from fl_sim.evaluation_classifier import evaluation_classifier
from fl_sim.evaluator import evaluate_model_inversion
from fl_sim.training import evaluate
from fl_sim.validation import MODEL_ATTACKS
from fl_sim.workspace import Workspace, initial_model

log = logging.getLogger("fl_sim")

ATTACKER = "anyone holding the final global model (the server, any client, a user of the deployed model)"


def participant(cfg: DictConfig) -> str:
    a = cfg.attack
    if a.name == "hitaj" and a.injected > 0:
        return (f"client {int(a.attacker_client)}, an active participant (Hitaj et al.): in each round it is sampled "
                "it trains a generator against the global model it received and trains on its own data plus "
                f"{int(a.injected)} generated samples per target class labelled as a class of its own")
    how = ("trains a generator against the global model it receives in each round it is sampled (Hitaj et al.'s "
           "attacker, injecting nothing)" if a.name == "hitaj" else
           "inverts the global model it receives in each round it is sampled (as FedInverse)")
    return f"client {int(a.attacker_client)}, a passive participant: it trains honestly on its own partition and {how}"


def fake_label(cfg: DictConfig, data: FederatedData) -> int:
    """``attack=hitaj``: the dataset label its generated samples are labelled with, a class of its own
    (``attack.fake_class``, -1: the first it holds); a ConfigError when it holds none, or not that one."""
    k, own, f = int(cfg.attack.attacker_client), attacker_holds(cfg, data), int(cfg.attack.fake_class)
    if not own:
        raise ConfigError(f"attack=hitaj: client {k} holds no example, so it has no class of its own to label its "
                          "generated samples with; choose another attack.attacker_client")
    if f < 0:
        return own[0]
    if f not in own:
        raise ConfigError(f"attack.fake_class={f}: client {k} does not hold it; an active participant labels its "
                          f"generated samples with a class of its own: one of {own}")
    return f


def is_model_inversion(cfg: DictConfig) -> bool:
    return cfg.attack.name in MODEL_ATTACKS


def attacker_holds(cfg: DictConfig, data: FederatedData) -> list[int]:
    """``attack.on=client``: the dataset's labels of the classes in the attacker's own partition."""
    own = np.unique(data.y_train[data.partitions[int(cfg.attack.attacker_client)]])
    return sorted(int(data.dataset_labels[int(c)]) for c in own)


def target_classes(cfg: DictConfig, data: FederatedData) -> tuple[int, ...]:
    """The model's classes to reconstruct (``attack.target_classes`` names the dataset's labels; [] = every
    private class, or with ``attack.on=client`` every one the attacker's partition lacks); a ConfigError
    names any that the clients do not hold, or that a participant attacker holds itself."""
    labels = data.dataset_labels
    wanted = list(cfg.attack.target_classes) or list(labels)
    bad = [c for c in wanted if c not in labels]
    if bad:
        raise ConfigError(f"attack.target_classes={list(cfg.attack.target_classes)}: {bad} are not private classes "
                          f"(the clients hold {list(labels)}; the others are the attacker's public data)")
    if cfg.attack.on == "client":
        k, own = int(cfg.attack.attacker_client), attacker_holds(cfg, data)
        lacking = [c for c in labels if c not in own]
        if not lacking:
            raise ConfigError(f"attack.on=client: client {k} holds every private class {list(labels)}, so it has no "
                              "class to steal; give clients fewer classes (partition=pathological "
                              "partition.classes_per_client=2, or partition=dirichlet with a small alpha)")
        held = [c for c in wanted if c in own]
        if cfg.attack.target_classes and held:
            raise ConfigError(f"attack.target_classes={list(cfg.attack.target_classes)}: client {k} holds {held} "
                              f"itself; a participant attacks the classes it lacks ({lacking})")
        wanted = [c for c in wanted if c not in own]
    return tuple(labels.index(c) for c in wanted)


def division(cfg: DictConfig, data: FederatedData) -> dict:
    """The private/public division for ``summary.json`` (``data.division``)."""
    a = cfg.attack
    aux = 0 if data.x_aux is None else int(len(data.x_aux))
    mine = ({"attacker_client": int(a.attacker_client), "attacker_classes": attacker_holds(cfg, data)}
            if a.on == "client" else {})
    if a.auxiliary == "disjoint_classes":
        public = sorted(set(int(c) for c in data.y_aux.tolist())) if data.y_aux is not None else []
        return {"auxiliary": "disjoint_classes", "private_classes": list(data.dataset_labels),
                "public_classes": public, "auxiliary_examples": aux, **mine}
    return {"auxiliary": "split", "private_classes": list(data.dataset_labels), "public_classes": [],
            "auxiliary_fraction": float(a.auxiliary_fraction), "auxiliary_examples": aux, **mine}


def knowledge(cfg: DictConfig, ws: Workspace) -> Knowledge:
    """What the attacker holds: the architecture, the input normalisation, its own auxiliary data."""
    data = ws.data
    aux = None if data.x_aux is None else torch.from_numpy(data.x_aux)
    return Knowledge(model=initial_model(cfg, data), input_shape=data.input_shape, num_classes=data.num_classes,
                     mean=tuple(data.mean.tolist()), std=tuple(data.std.tolist()), auxiliary_inputs=aux,
                     target_classes=target_classes(cfg, data), device=str(ws.device))


def prepare_prior(attack, know: Knowledge, state: dict[str, torch.Tensor], cfg: DictConfig) -> dict:
    """Train the attack's generative prior on the auxiliary data, or load it from the cache; its record."""
    if not hasattr(attack, "fit_prior"):
        return {"prior": None, "seconds": 0.0, "cached": False}
    parts = [attack.name, attack.prior_key(), know.input_shape, know.auxiliary_inputs]
    if attack.prior_uses_target:
        parts.append(state)
        answers = [m.sample_at_eval for m in know.model.modules() if hasattr(m, "sample_at_eval")]
        if answers:  # the same weights answer differently as MID's deployed model draws z or uses its mean
            parts.append({"sample_at_eval": answers})
    key = cache.fingerprint(*parts)
    kind = f"{attack.name}-prior"
    saved = cache.load(kind, key, cfg.cache_dir)
    if saved is not None:
        try:
            attack.load_prior_state_dict(saved["prior"], know)
        except (KeyError, RuntimeError) as e:  # an entry of another layout: trained anew, written over
            log.warning("%s: cached prior does not fit (%s): training it anew", attack.name, type(e).__name__)
            saved = None
    if saved is not None:
        log.info("%s: GAN prior loaded from the cache (%s)", attack.name, cache.cache_root(cfg.cache_dir) / kind)
        return {"prior": kind, "key": key, "seconds": float(saved["seconds"]), "cached": True}
    log.info("%s: training the GAN prior on %d auxiliary images (%d generator steps)", attack.name,
             len(know.auxiliary_inputs), attack.gan_steps)
    t0 = time.perf_counter()
    target = know.model_at(state).eval() if attack.prior_uses_target else None
    losses = attack.fit_prior(know, target, progress=lambda step, d, g: log.info(
        "  %s prior: step %d/%d, critic loss %.4f, generator loss %.4f", attack.name, step, attack.gan_steps, d, g))
    seconds = time.perf_counter() - t0
    path = cache.save(kind, key, {"prior": attack.prior_state_dict(), "seconds": seconds}, cfg.cache_dir)
    log.info("%s: GAN prior trained in %.1f s, cached in %s", attack.name, seconds, path)
    return {"prior": kind, "key": key, "seconds": seconds, "cached": False, **losses}


NOTES = ["attack accuracy: top-1 under the evaluation classifier over every class of the dataset",
         "knn_distance: squared L2 in the evaluation classifier's 128-d penultimate features, to the "
         "nearest private training image of the target class, averaged",
         "feature_fid: Fréchet distance in the evaluation classifier's features (not Inception FID: "
         "no Inception weights can be loaded here)"]


def invert(cfg: DictConfig, ws: Workspace, state: dict[str, torch.Tensor], *, server_round: int, run_dir,
           judge=None, what: str = "the final global model", tag: str = "", attack=None,
           know: Knowledge | None = None) -> tuple[dict, dict, object, float]:
    """One model inversion of ``state`` and its score: (entry, prior record, judge, seconds spent on the
    judge). ``judge``: an evaluation classifier already at hand; ``tag``: set into the pictures' names;
    ``attack``, ``know``: an attack that keeps its state from call to call (hitaj's generator), its knowledge."""
    data = ws.data
    attack = attack if attack is not None else attack_from_config(cfg.attack)
    know = know if know is not None else knowledge(cfg, ws)
    state = {k: v.detach().cpu() for k, v in state.items()}
    prior = prepare_prior(attack, know, state, cfg)
    log.info("%s: inverting %s (classes %s, %d images each)", attack.name, what,
             [data.dataset_labels[c] for c in know.target_classes], cfg.attack.per_class)
    t0 = time.perf_counter()
    rec = attack.reconstruct(ModelObservation(state), know, progress=lambda it, loss: log.info(
        "  %s: iteration %d, loss %.4f", attack.name, it, loss))
    attack_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    judge = judge if judge is not None else evaluation_classifier(data, int(cfg.seed), cfg.cache_dir)
    judge_seconds = time.perf_counter() - t1
    entry = evaluate_model_inversion(rec, data, judge, attack_name=attack.name, server_round=server_round,
                                     seconds=attack_seconds, run_dir=run_dir, tag=tag)
    entry["prior_seconds"], entry["prior_cached"] = prior["seconds"], prior["cached"]
    entry["device"] = str(know.device)  # the server process's (the prior trains there too)
    entry["precision"] = attack.precision  # the forward passes' arithmetic (attack.precision), the prior's too
    return entry, prior, judge, judge_seconds


def attack_final_model(cfg: DictConfig, ws: Workspace, state: dict[str, torch.Tensor], recorder) -> None:
    """Invert the final global model ``state``; the evaluator scores it; the recorder keeps the entry,
    the division, the target and the evaluation classifier, and the time of each part."""
    data = ws.data
    entry, prior, judge, judge_seconds = invert(cfg, ws, state, server_round=int(cfg.num_rounds),
                                                run_dir=recorder.run_dir)
    recorder.attack(entry)
    last = recorder.rounds[-1] if recorder.rounds else {}
    recorder.model_inversion = {
        "attacker": ATTACKER, "on": str(cfg.attack.on), "division": division(cfg, data),
        "target": {"model": cfg.model.name, "classes": list(data.dataset_labels),
                   "test_accuracy": last.get("test_accuracy")},
        "evaluation_classifier": judge.summary(), "prior": prior, "notes": list(NOTES),
    }
    recorder.extra_timing.update({"prior_training_seconds": 0.0 if prior["cached"] else prior["seconds"],
                                  "model_inversion_seconds": entry["seconds"],
                                  "evaluation_classifier_seconds": judge_seconds})


class ParticipantAttack:
    """``attack.on=client``: client ``attack.attacker_client`` inverts the global model it receives, in every
    round it is sampled (and ``attack.rounds`` names, [] = all). The server loops call ``wants(round,
    sampled)`` and then ``attack(round, state)`` with the model the attacker receives, before they send it;
    one scored entry per attacked round (``attacker_client``, ``model_round``: the rounds of training behind
    the model it received, ``target_test_accuracy``: that model's). ``attack=hitaj`` keeps its generator
    from round to round, and an active one trains on ``injection()`` too (the server adds it to the
    attacker's train message; the strategy never sees it)."""

    def __init__(self, cfg: DictConfig, ws: Workspace, recorder):
        self.cfg, self.ws, self.recorder = cfg, ws, recorder
        self.client = int(cfg.attack.attacker_client)
        self.judge = None
        self.judge_seconds = 0.0
        self.prior_seconds = 0.0
        hitaj = cfg.attack.name == "hitaj"
        # hitaj's generator learns from round to round: one attack object, in the checkpoint (state / restore)
        self.persistent = attack_from_config(cfg.attack) if hitaj else None
        self.know = knowledge(cfg, ws)  # the same every round: the architecture, its own classes, public data
        self.injected = int(cfg.attack.injected) if hitaj else 0
        self.fake = fake_label(cfg, ws.data) if hitaj else None
        if (recorder.model_inversion or {}).get("on") == "client":  # a resumed run: its attacks so far
            return
        recorder.model_inversion = {
            "attacker": participant(cfg), "on": "client", "division": division(cfg, ws.data),
            "target": {"model": cfg.model.name, "classes": list(ws.data.dataset_labels), "test_accuracy": None},
            "evaluation_classifier": None, "prior": None, "rounds_attacked": [],
            **({"injected_per_class": self.injected, "fake_class": self.fake} if hitaj else {}),
            "notes": list(NOTES) + ["round r: the global model the attacker received at the start of round r, "
                                    "trained for r - 1 rounds (round 1: the initial model)"]}

    def wants(self, server_round: int, sampled: list[int]) -> bool:
        rounds = list(self.cfg.attack.rounds)
        return self.client in sampled and (not rounds or server_round in rounds)

    def attack(self, server_round: int, state: dict[str, torch.Tensor]) -> dict:
        """Attack the model the participant received this round: the scored entry (recorded); for an
        active attacker, ``injection(...)`` then gives the samples it trains on."""
        model = copy.deepcopy(self.ws.model)  # the server's copy of the architecture, on its device
        model.load_state_dict(state)
        test_accuracy = evaluate(model, *self.ws.test_tensors(), int(self.cfg.eval_batch_size))[1]
        entry, prior, self.judge, judge_seconds = invert(
            self.cfg, self.ws, state, server_round=server_round, run_dir=self.recorder.run_dir, judge=self.judge,
            what=f"the global model client {self.client} received in round {server_round}", tag=f"_round{server_round}",
            attack=self.persistent, know=self.know)
        entry.update(attacker_client=self.client, model_round=server_round - 1, target_test_accuracy=test_accuracy)
        if self.persistent is not None:
            entry.update(injected=self.injected * len(entry["target_classes"]), fake_class=self.fake,
                         generator_steps=int(self.persistent.steps))
        self.recorder.attack(entry)  # its line of output says who attacked what
        self.judge_seconds += judge_seconds
        self.prior_seconds += 0.0 if prior["cached"] else prior["seconds"]
        mi = self.recorder.model_inversion
        mi.update(evaluation_classifier=self.judge.summary(), prior=prior,
                  rounds_attacked=mi["rounds_attacked"] + [server_round])
        timing = self.recorder.extra_timing
        timing["model_inversion_seconds"] = timing.get("model_inversion_seconds", 0.0) + entry["seconds"]
        timing.update(prior_training_seconds=self.prior_seconds, evaluation_classifier_seconds=self.judge_seconds)
        return entry

    def injection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An active attacker's training extra for this round, after ``attack``: ``injected`` generated samples
        per target class (normalised as the clients' inputs) and the fake label for all; None when passive."""
        if self.persistent is None or self.injected <= 0:
            return None
        images, _ = self.persistent.samples(self.injected, self.know, salt=1)
        data = self.ws.data
        x = (images.numpy() - data.mean[None, :, None, None]) / data.std[None, :, None, None]
        y = torch.full((len(images),), data.dataset_labels.index(self.fake), dtype=torch.int64)
        return torch.from_numpy(x.astype(np.float32)), y

    def state(self) -> dict:
        """For the checkpoint: what the attacker carries from round to round (hitaj's generator); {} if nothing."""
        return {"attack": self.persistent.state_dict()} if self.persistent is not None else {}

    def restore(self, state: dict) -> None:
        """A resumed run: the attacker goes on from ``state()`` of the checkpointed round."""
        if self.persistent is not None and state.get("attack"):
            self.persistent.load_state_dict(state["attack"], self.know)

    def finish(self) -> None:
        """After the last round: the target's final test accuracy."""
        last = self.recorder.rounds[-1] if self.recorder.rounds else {}
        self.recorder.model_inversion["target"]["test_accuracy"] = last.get("test_accuracy")


def participant_attack(cfg: DictConfig, ws: Workspace, recorder) -> ParticipantAttack | None:
    """The participant of ``attack.on=client`` (passive, or hitaj's active one), or None when none attacks."""
    return ParticipantAttack(cfg, ws, recorder) if is_model_inversion(cfg) and cfg.attack.on == "client" else None
