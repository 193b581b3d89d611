"""The SecAgg+ server (``defense=secagg``): the same run under Flower's SecAgg+ protocol, on Flower's
legacy workflow (``LegacyContext`` + ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``). The server
only ever holds the aggregate of the sampled clients' models, and that is what an adversarial
server attacks (``observed: "aggregate"``). Flower's legacy loop counts rounds from 1: a resumed
run's rounds are offset."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from attacks.base import Knowledge, Observation
from attacks.imprint import ImprintedModel
from fl_sim import checkpoint
from fl_sim.attacking import attack_executor, attack_from_config
from fl_sim.evaluator import evaluate_outcome
from fl_sim.malicious import malicious_rewrite, untamper
from fl_sim.protocol import discover_clients, train_config
from fl_sim.sampling import sample_clients
from fl_sim.training import evaluate
from fl_sim.validation import UPDATE_ATTACKS
from fl_sim.workspace import initial_model, workspace
from strategies.adversarial import AttackJob
from strategies.secure_aggregation import ObservedFedAvg

log = logging.getLogger("fl_sim")


def server_main_secagg(cfg: DictConfig, grid: Grid, context: Context, recorder,
                       resume_from: dict | None = None, participant=None) -> dict[str, torch.Tensor]:
    """The same run under Flower's SecAgg+ (legacy workflow): the server only ever holds the
    aggregate of the sampled clients' models, and that is what an adversarial server attacks.
    ``participant``: a malicious participant (``fl_sim.inversion.ParticipantAttack``) that inverts the
    global model it receives; SecAgg+ hides updates, not the model every client is sent."""
    ws = workspace(cfg, "server")
    d, s = cfg.defense, cfg.strategy
    node_of = discover_clients(grid, cfg)
    client_of = {n: c for c, n in node_of.items()}
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    init = initial_model(cfg, ws.data)
    keys = list(init.state_dict().keys())
    start = [v.detach().cpu().numpy() for v in init.state_dict().values()]
    offset = 0  # Flower's legacy loop counts from 1: a resumed run's rounds are offset
    if resume_from is not None:
        start = [resume_from["model"][k].numpy() for k in keys]
        checkpoint.restore_rng(rng, resume_from["rng"])
        offset = int(resume_from["round"])
        if participant is not None:
            participant.restore(resume_from["extra"].get("participant", {}))
        log.info("resuming after round %d", offset)
    attack = attack_from_config(cfg.attack) if cfg.attack.name in UPDATE_ATTACKS else None
    scratch = initial_model(cfg, ws.data) if attack is not None else None  # the attack's copy of the architecture
    executor = attack_executor(cfg) if attack is not None else None
    x_test, y_test = ws.test_tensors()
    rounds: dict[int, dict] = {}
    final = {"model": {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, start)}}  # the latest global model

    def sample(rnd: int) -> list[int]:
        rnd += offset
        sampled = sample_clients(rng, cfg.num_clients, s.fraction_train, s.min_train_clients)
        rounds[rnd] = {"t0": time.perf_counter(), "clients": sampled, "trained": 0, "train_loss": None,
                       "attack_seconds": 0.0}
        return [node_of[c] for c in sampled]

    def observe(rnd: int, nodes: list[int], sent: list, aggregate: list, results: list) -> None:
        rnd += offset
        clients = sorted(client_of[n] for n in nodes)
        results = sorted(results, key=lambda r: int(r.metrics["partition-id"]))  # sums independent of arrival order
        recorder.ran_on("clients", *(str(r.metrics.get("device", "?")) for r in results))
        recorder.client_losses(rnd, {int(r.metrics["partition-id"]): float(r.metrics["train_loss"]) for r in results},
                               ws.data.num_classes)
        n_total = sum(int(r.num_examples) for r in results)
        rounds[rnd].update(trained=len(results), stragglers=sum(float(r.metrics.get("delay", 0)) > 0 for r in results),
                           train_loss=sum(
            float(r.metrics["train_loss"]) * int(r.num_examples) for r in results) / max(n_total, 1))
        if participant is not None and participant.wants(rnd, clients):
            t = time.perf_counter()
            participant.attack(rnd, as_sent(sent))  # the model every sampled client received this round
            rounds[rnd]["attack_seconds"] += time.perf_counter() - t
        if attack is None or (cfg.attack.rounds and rnd not in cfg.attack.rounds):
            return
        t = time.perf_counter()
        before = {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, sent)}
        after = {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, aggregate)}
        c = train_config(cfg, rnd)
        know = Knowledge(model=scratch, input_shape=ws.data.input_shape,
                         num_classes=ws.data.num_classes, lr=float(c["lr"]), local_epochs=int(c["local-epochs"]),
                         batch_size=int(c["batch-size"]), num_examples=n_total,
                         mean=tuple(ws.data.mean.tolist()), std=tuple(ws.data.std.tolist()))
        job = AttackJob(rnd, clients, "aggregate", Observation(before, after, kind="aggregate"), know)
        for outcome in executor(attack, [job]):
            recorder.attack(evaluate_outcome(outcome, ws.data, cfg.attack.name, recorder.run_dir))
        rounds[rnd]["attack_seconds"] += time.perf_counter() - t

    rewrite = malicious_rewrite(cfg, init.state_dict())

    def as_sent(ndarrays: list) -> dict[str, torch.Tensor]:
        state = {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, ndarrays)}
        return state if rewrite is None else rewrite(state)

    def evaluate_fn(rnd: int, ndarrays: list, _config: dict):
        if rnd == 0:
            recorder.started()
            return None
        rnd += offset
        full = as_sent(ndarrays)
        ws.model.load_state_dict(full)
        final["model"] = untamper(full)  # the model's own arrays (a malicious block is the server's, not the model's)
        # evaluated as the clients' model without the block, as without SecAgg+ (fl_sim.malicious)
        model = ws.model.base if isinstance(ws.model, ImprintedModel) else ws.model
        test_loss, test_acc = evaluate(model, x_test, y_test, cfg.eval_batch_size)
        r = rounds.get(rnd, {"t0": time.perf_counter(), "clients": [], "trained": 0, "train_loss": None,
                             "attack_seconds": 0.0})
        recorder.round(round=rnd, train_loss=r["train_loss"], test_loss=test_loss, test_accuracy=test_acc,
                       clients=r["clients"], trained=r["trained"], failures=len(r["clients"]) - r["trained"],
                       stragglers=r.get("stragglers", 0),
                       seconds=time.perf_counter() - r["t0"], attack_seconds=r["attack_seconds"])
        if cfg.checkpoint:  # the aggregated model as the strategy holds it (a malicious rewrite is re-applied)
            checkpoint.save(recorder.run_dir, server_round=rnd, config=OmegaConf.to_container(cfg, resolve=True),
                            model={k: torch.from_numpy(np.array(v)) for k, v in zip(keys, ndarrays)}, rng=rng,
                            recorder=recorder,
                            extra={"participant": participant.state()} if participant is not None else None)
        return test_loss, {"accuracy": test_acc}

    strategy = ObservedFedAvg(initial=start, sample=sample, fit_config=lambda rnd: dict(train_config(cfg, rnd + offset)),
                              observe=observe, evaluate_fn=evaluate_fn,
                              rewrite=None if rewrite is None else lambda nd: [v.numpy() for v in as_sent(nd).values()])
    largest = max(len(p) for p in ws.data.partitions)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=_count_or_fraction(d.secagg_num_shares),
        reconstruction_threshold=_count_or_fraction(d.secagg_reconstruction_threshold),
        clipping_range=float(d.secagg_clipping_range), max_weight=float(largest), timeout=float(cfg.round_timeout)))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds - offset,
                                                                round_timeout=float(cfg.round_timeout)),
                           strategy=strategy)
    workflow(grid, legacy)
    return final["model"]


def _count_or_fraction(v: float) -> int | float:
    """Flower's convention: an int counts clients, a float in (0, 1] is a fraction of those sampled."""
    return int(v) if v > 1 else float(v)
