"""The Flower apps: a ClientApp (local training) and a ServerApp (seeded sampling, Flower strategy
aggregation, central evaluation), both on Flower's Message API.

``make_client_app(cfg)`` / ``make_server_app(cfg, recorder)`` build them for ``fl_sim.runner``
(``flwr.simulation.run_simulation``). The module-level ``client_app`` / ``server_app`` are the same
apps for ``flwr run .``: they compose the config from the run config's ``overrides`` string.

Each process (driver, Ray actor) loads the data and builds the model once (``workspace``) and
reuses them for every message: a client call costs its training, not a reload.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fl_sim._quiet  # noqa: F401
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from attacks.base import Knowledge
from defenses.accounting import calibrate_noise, epsilon, local_dp_noise_multiplier
from defenses.dpsgd import dp_local_train, make_dp_compatible, resolve_grad_sample_mode, sample_rate, steps_per_epoch
from defenses.mods import noise_mod, prune_mod, quantize_mod
from fl_sim.attacking import evaluate_outcome, malicious_rewrite
from fl_sim.data import FederatedData, build_federated_data
from fl_sim.models import build_model
from fl_sim.privacy import PrivacyLedger
from fl_sim.training import evaluate, local_train, make_optimizer, resolve_device
from strategies import make_strategy
from strategies.adversarial import AdversarialStrategy
from strategies.guard import RejectNonFinite
from strategies.registry import with_central_dp

log = logging.getLogger("fl_sim")



# --------------------------------------------------------------------------- per-process workspace

@dataclass
class Workspace:
    """A process's data and a scratch model (weights are always loaded before use)."""

    data: FederatedData
    model: torch.nn.Module
    device: torch.device
    tensors: dict  # cid -> (x, y) on device, built on first use

    def client_tensors(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cid not in self.tensors:
            x, y = self.data.client(cid)
            self.tensors[cid] = (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
        return self.tensors[cid]

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "test" not in self.tensors:
            self.tensors["test"] = (torch.from_numpy(self.data.x_test).to(self.device),
                                    torch.from_numpy(self.data.y_test).to(self.device))
        return self.tensors["test"]


_WORKSPACES: dict[tuple[str, str], Workspace] = {}


def _data_key(cfg: DictConfig) -> str:
    keys = ("dataset", "partition", "num_clients", "seed", "model", "attack", "defense", "device")  # shapes data/model
    return json.dumps({k: OmegaConf.to_container(cfg[k]) if isinstance(cfg[k], DictConfig) else cfg[k]
                       for k in keys}, sort_keys=True)


def _architecture(cfg: DictConfig, data: FederatedData) -> torch.nn.Module:
    return build_model(cfg.model.name, data.input_shape, data.num_classes, width=cfg.model.width,
                       hidden=tuple(cfg.model.hidden), activation=cfg.model.activation)


def initial_model(cfg: DictConfig, data: FederatedData) -> torch.nn.Module:
    """The seeded initial global model (same seed -> same weights), on the CPU; with attack=imprint,
    the malicious server's version (an imprint block in front)."""
    from fl_sim.attacking import wrap_model

    torch.manual_seed(cfg.seed)
    model = _architecture(cfg, data)
    if cfg.defense.dpsgd:  # every party uses the architecture Opacus can train (BatchNorm -> GroupNorm)
        model, _ = make_dp_compatible(model)
    return wrap_model(cfg, model, data)


def workspace(cfg: DictConfig, role: str) -> Workspace:
    """Data and model for this process, built once per config. ``role``: "client" or "server"."""
    key = (_data_key(cfg), role)
    if key not in _WORKSPACES:
        if role == "client":
            cpus = max(1, int(cfg.backend.client_resources.num_cpus))
            torch.set_num_threads(cpus)
            device = resolve_device(cfg.device, gpu_assigned=cfg.backend.client_resources.num_gpus > 0)
        else:
            device = resolve_device(cfg.device)
        data = build_federated_data(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed,
                                    float(cfg.attack.auxiliary_fraction))
        model = initial_model(cfg, data).to(device)
        _WORKSPACES[key] = Workspace(data, model, device, {})
    return _WORKSPACES[key]


def round_seed(seed: int, server_round: int, cid: int) -> int:
    """Seed of a client's local shuffling in a round: depends only on (seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, cid]).generate_state(1)[0])


class ClientDropout(RuntimeError):
    """A simulated client that goes offline after receiving the round's model (``client.dropout``)."""


def drops_out(seed: int, server_round: int, cid: int, probability: float) -> bool:
    """Whether client ``cid`` drops out of ``server_round`` (seeded: the same in every run)."""
    return probability > 0 and np.random.default_rng([seed, server_round, cid, 0xD0]).random() < probability


def _maybe_drop_out(cfg: DictConfig, server_round: int, cid: int) -> float:
    """The simulated failures of a client in a round (``client.dropout``, ``faults.*``), all seeded:
    raise (drop-out, crash), end the process (crash_mode=exit), or sleep (straggler; returns the delay)."""
    if drops_out(cfg.seed, server_round, cid, float(cfg.client.dropout)):
        raise ClientDropout(f"client {cid} dropped out of round {server_round} (client.dropout={cfg.client.dropout})")
    f = cfg.faults
    draws = np.random.default_rng([cfg.seed, server_round, cid, 0xFA]).random(2)
    if draws[0] < float(f.client_crash_rate):
        if f.crash_mode == "exit":
            log.warning("client %d: simulated crash of its process in round %d", cid, server_round)
            os._exit(3)  # the Ray actor dies; the engine must replace it
        raise ClientCrash(f"client {cid} crashed in round {server_round} (faults.client_crash_rate={f.client_crash_rate})")
    if draws[1] < float(f.straggler_rate) and f.straggler_seconds > 0:
        time.sleep(float(f.straggler_seconds))
        return float(f.straggler_seconds)
    return 0.0


def sends_nan(cfg: DictConfig, server_round: int, cid: int) -> bool:
    rate = float(cfg.faults.nan_update_rate)
    return rate > 0 and np.random.default_rng([cfg.seed, server_round, cid, 0xFA]).random(3)[2] < rate


def _reason(text: str | None) -> str:
    """The last line of a failure's reason (Flower sends the client's traceback)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown"


class ClientCrash(RuntimeError):
    """A simulated client failure during training (``faults.client_crash_rate``)."""


# --------------------------------------------------------------------------- ClientApp

def client_train(cfg: DictConfig, msg: Message, context: Context) -> Message:
    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    delay = _maybe_drop_out(cfg, server_round, cid)
    ws.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, server_round, cid))
    epochs, batch_size, lr = int(conf["local-epochs"]), int(conf["batch-size"]), float(conf["lr"])
    records: dict[str, Any] = {}
    restore_dp(msg, context)
    budget = DPBudget.load(context, cfg, len(x), epochs, batch_size) if _dp_mechanism(cfg) else None
    if budget is not None:
        # one round costs its DP-SGD steps, or one release of the noised update (local DP)
        steps_planned = epochs * steps_per_epoch(len(x), batch_size) if cfg.defense.dpsgd else 1
        if budget.would_exceed(steps_planned):
            # Out of budget: the client stays out of this and every later round.
            records["privacy"] = budget.record(declined=True)
            return Message(content=RecordDict({
                "metrics": MetricRecord({"num-examples": len(x)}),
                "client": ConfigRecord({"partition-id": cid, "steps": 0, "delay": delay}), **records}), reply_to=msg)
    if cfg.defense.dpsgd:
        state, loss, steps, _ = dp_local_train(
            ws.model, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
            noise_multiplier=budget.noise_multiplier, max_grad_norm=float(cfg.defense.max_grad_norm),
            make_optimizer=lambda params: make_optimizer(
                str(conf["optimizer"]), params, lr, float(conf["momentum"]), float(conf["weight-decay"])),
            grad_sample_mode=resolve_grad_sample_mode(str(cfg.defense.grad_sample_mode), cfg.model.name),
            generator=gen)
    else:
        state, loss, steps = _plain_train(ws.model, x, y, conf, gen)
    if sends_nan(cfg, server_round, cid):  # a diverged client (faults.nan_update_rate)
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    if budget is not None:
        budget.spend(server_round, steps if cfg.defense.dpsgd else 1)
        budget.save(context)
        records["privacy"] = budget.record(declined=False)
    content = RecordDict({
        "arrays": ArrayRecord(state),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x), "unit-weight": 1.0}),
        "client": ConfigRecord({"partition-id": cid, "steps": steps, "delay": delay}),
        **records,
    })
    return Message(content=content, reply_to=msg)


def _plain_train(model: torch.nn.Module, x, y, conf, gen: torch.Generator):
    """Local training with the hyper-parameters the server sent (``conf``: its train config)."""
    loss, steps = local_train(
        model, x, y,
        epochs=int(conf["local-epochs"]), batch_size=int(conf["batch-size"]), lr=float(conf["lr"]),
        optimizer=str(conf["optimizer"]), momentum=float(conf["momentum"]),
        weight_decay=float(conf["weight-decay"]),
        proximal_mu=float(conf["proximal-mu"]) if "proximal-mu" in conf else 0.0,
        generator=gen,
    )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, loss, steps


def client_train_legacy(cfg: DictConfig, msg: Message, context: Context) -> Message:
    """The same local training for Flower's legacy message format (FitIns -> FitRes), which the
    SecAgg+ protocol (``secaggplus_mod``) speaks."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = int(fitins.config["server-round"])
    delay = _maybe_drop_out(cfg, server_round, cid)  # mid-protocol: after SecAgg+'s key sharing
    keys = list(ws.model.state_dict().keys())
    ws.model.load_state_dict({k: torch.from_numpy(np.array(a))
                              for k, a in zip(keys, parameters_to_ndarrays(fitins.parameters))})
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, server_round, cid))
    state, loss, steps = _plain_train(ws.model, x, y, fitins.config, gen)
    res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters([state[k].numpy() for k in keys]), len(x),
                 {"train_loss": float(loss), "partition-id": cid, "steps": steps, "delay": delay})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _dp_mechanism(cfg: DictConfig) -> str | None:
    return "dpsgd" if cfg.defense.dpsgd else "local_dp" if cfg.defense.local_dp else None


@dataclass
class DPBudget:
    """A client's DP ledger (DP-SGD, or local DP of its update), kept in its Flower ``context.state``
    across rounds: the accountant history ``[(σ, q, steps)]`` and the rounds it trained in. ε always
    composes the whole history."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    max_epsilon: float | None
    history: list[tuple[float, float, int]]
    rounds: list[int]

    KEY = "dp-budget"

    @classmethod
    def load(cls, context: Context, cfg: DictConfig, n: int, epochs: int, batch_size: int) -> "DPBudget":
        d = cfg.defense
        q = sample_rate(n, batch_size) if d.dpsgd else 1.0  # local DP: every round releases the update
        if cls.KEY in context.state:
            rec = context.state[cls.KEY]
            sigma = float(rec["noise-multiplier"])
            history = list(zip(map(float, rec["sigma"]), map(float, rec["q"]), map(int, rec["steps"])))
            rounds = list(map(int, rec["rounds"]))
        else:
            history, rounds = [], []
            sigma = float(d.noise_multiplier) if d.dpsgd else local_dp_noise_multiplier(float(d.local_epsilon), float(d.delta))
            if d.dpsgd and d.target_epsilon is not None:  # spend the target over every planned round (the worst case)
                planned = cfg.num_rounds * epochs * steps_per_epoch(n, batch_size)
                sigma = calibrate_noise(float(d.target_epsilon), float(d.delta), q, planned, str(d.accountant))
        return cls(sigma, q, float(d.delta), str(d.accountant),
                   None if d.max_epsilon is None else float(d.max_epsilon), history, rounds)

    def epsilon(self, extra_steps: int = 0) -> float:
        extra = [(self.noise_multiplier, self.sample_rate, extra_steps)] if extra_steps else []
        return epsilon(self.history + extra, self.delta, self.accountant)

    def would_exceed(self, steps: int) -> bool:
        return self.max_epsilon is not None and self.epsilon(steps) > self.max_epsilon

    def spend(self, server_round: int, steps: int) -> None:
        self.history.append((self.noise_multiplier, self.sample_rate, int(steps)))
        self.rounds.append(int(server_round))

    def save(self, context: Context) -> None:
        context.state[self.KEY] = ConfigRecord({
            "noise-multiplier": self.noise_multiplier,
            "sigma": [h[0] for h in self.history], "q": [h[1] for h in self.history],
            "steps": [h[2] for h in self.history], "rounds": list(self.rounds)})

    def record(self, declined: bool) -> ConfigRecord:
        """What the client reports with its reply (for the run's privacy summary)."""
        eps = self.epsilon()
        return ConfigRecord({
            "epsilon": eps if math.isfinite(eps) else -1.0,  # -1: infinite (no noise)
            "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate,
            "rounds": list(self.rounds) or [0], "steps": [h[2] for h in self.history] or [0],
            "declined": declined})


RESTORE_KEY = "dp-restore"


def restore_dp(msg: Message, context: Context) -> None:
    """After a resume the client nodes are fresh: the server hands each client back the DP history
    the simulator checkpointed (the client's own ``context.state``), once, before it trains."""
    if RESTORE_KEY in msg.content and DPBudget.KEY not in context.state:
        context.state[DPBudget.KEY] = msg.content[RESTORE_KEY]


def dp_history_record(entry: dict) -> ConfigRecord:
    """A client's DP ledger entry (as the server's privacy ledger keeps it) as its ``context.state`` record."""
    n = len(entry["steps"])
    return ConfigRecord({"noise-multiplier": float(entry["noise_multiplier"]),
                         "sigma": [float(entry["noise_multiplier"])] * n, "q": [float(entry["sample_rate"])] * n,
                         "steps": [int(v) for v in entry["steps"]], "rounds": [int(r) for r in entry["rounds"]]})


def client_query(cfg: DictConfig, msg: Message, context: Context) -> Message:
    cid = int(context.node_config["partition-id"])
    workspace(cfg, "client")  # load data and model on this actor now, not in round 1
    return Message(content=RecordDict({"client": ConfigRecord({"partition-id": cid})}), reply_to=msg)


def make_client_app(cfg: dict | DictConfig | Callable[[Context], DictConfig]) -> ClientApp:
    """ClientApp training the received model on this node's partition.

    ``cfg`` is the resolved config (a plain dict travels to Ray actors cheaply) or a function
    of the Context returning it (``flwr run``).
    """
    get_cfg = cfg if callable(cfg) else (lambda _ctx, _c=OmegaConf.create(cfg): _c)
    app = ClientApp()

    @app.train(mods=[secagg_mod(get_cfg), update_defenses_mod(get_cfg)])
    def _train(msg: Message, context: Context) -> Message:
        cfg = get_cfg(context)
        if cfg.scenario.name == "split":
            from fl_sim.split import client_split_step

            return client_split_step(cfg, msg, context)
        return (client_train_legacy if cfg.defense.secagg else client_train)(cfg, msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return client_query(get_cfg(context), msg, context)

    return app


def _server_round(msg: Message) -> int:
    """The round of a train message, in the Message-API or the legacy (SecAgg+) format."""
    for name, record in msg.content.config_records.items():
        if "server-round" in record:
            return int(record["server-round"])
    return 0


def seeded_local_dp_mod(d: DictConfig, seed_fn: Callable[[Message, Context], int]):
    """Flower's ``LocalDpMod`` (clip the update to ``clipping_norm``, add Gaussian noise for a nominal
    (local_epsilon, delta) per release). It draws from NumPy's global generator: seeded per round and
    client here, so that runs reproduce."""
    from flwr.clientapp.mod import LocalDpMod

    inner = LocalDpMod(float(d.clipping_norm), float(d.local_sensitivity or d.clipping_norm),
                       float(d.local_epsilon), float(d.delta))

    def mod(msg: Message, context: Context, call_next) -> Message:
        replies: list[Message] = []

        def keep(m: Message, c: Context) -> Message:
            replies.append(call_next(m, c))
            return replies[-1]

        np.random.seed(seed_fn(msg, context) % 2**32)
        out = inner(msg, context, keep)
        # A client out of budget sends no model; LocalDpMod would turn that into a malformed error
        # reply that Flower drops (the server then waits for round_timeout): pass it on unchanged.
        if replies and not replies[-1].has_error() and not replies[-1].content.array_records:
            return replies[-1]
        return out

    return mod


def secagg_mod(get_cfg: Callable[[Context], DictConfig]):
    """Flower's ``secaggplus_mod`` when ``defense=secagg`` (outermost: it masks the final update)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        cfg = get_cfg(context)
        if not cfg.defense.secagg:
            return call_next(msg, context)
        from flwr.client.mod import secaggplus_mod

        # SecAgg+ quantises with stochastic rounding from NumPy's global generator: seeded per round and
        # client so that runs reproduce (the masks cancel exactly; the rounding would not)
        np.random.seed(round_seed(cfg.seed + 4, _server_round(msg), int(context.node_config["partition-id"])) % 2**32)
        return secaggplus_mod(msg, context, call_next)

    return mod


def update_defenses_mod(get_cfg: Callable[[Context], DictConfig]):
    """One Flower mod applying the configured update defenses (``defenses.mods``) in order:
    prune, then quantize, then noise — the config is read per message (``flwr run`` knows it only then)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        cfg = get_cfg(context)
        d, seed, chain = cfg.defense, cfg.seed, call_next
        wanted = []
        if d.local_dp:  # outermost: clips and noises the final update (Flower's LocalDpMod)
            wanted.append(seeded_local_dp_mod(d, lambda m, c: round_seed(
                seed + 3, _server_round(m), int(c.node_config["partition-id"]))))
        if d.noise:
            wanted.append(noise_mod(float(d.noise_std), lambda m, c: round_seed(
                seed + 1, _server_round(m), int(c.node_config["partition-id"]))))
        if d.quantize:
            wanted.append(quantize_mod(int(d.quantize_bits)))
        if d.prune:
            wanted.append(prune_mod(float(d.prune_ratio)))
        if d.central_dp and d.central_side == "client":  # innermost: clip the update as trained
            from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

            wanted.append(fixedclipping_mod if d.central_clipping == "fixed" else adaptiveclipping_mod)
        for m in reversed(wanted):  # innermost first: prune acts right after training
            chain = functools.partial(m, call_next=chain)
        return chain(msg, context)

    return mod


# --------------------------------------------------------------------------- ServerApp

class SampledGrid:
    """A view of the Grid showing only the nodes sampled for this round (seeded by fl_sim)."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def discover_clients(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Ask every node which client (partition) it is; return {client id: node id}."""
    deadline = time.time() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.time() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {num_clients} clients connected")
        time.sleep(0.05)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"client discovery failed: {reply.error.reason}")
        node_of[int(reply.content["client"]["partition-id"])] = reply.metadata.src_node_id
    return node_of


def train_config(cfg: DictConfig, server_round: int) -> ConfigRecord:
    c = cfg.client
    return ConfigRecord({
        "server-round": server_round, "lr": float(c.lr), "local-epochs": int(c.local_epochs),
        "batch-size": int(c.batch_size), "optimizer": str(c.optimizer), "momentum": float(c.momentum),
        "weight-decay": float(c.weight_decay),
    })


def num_sampled(num_clients: int, fraction: float, minimum: int) -> int:
    """Flower's rule: int(n * fraction) clients a round, at least ``minimum``, at most n."""
    return min(num_clients, max(int(num_clients * fraction), minimum))


def sample_clients(rng: np.random.Generator, num_clients: int, fraction: float, minimum: int) -> list[int]:
    """``num_sampled`` clients drawn from a seeded generator; sorted."""
    k = num_sampled(num_clients, fraction, minimum)
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def server_main(cfg: DictConfig, grid: Grid, recorder, context: Context | None = None,
                resume_from: dict | None = None) -> None:
    """The training loop of one run: sample, send, aggregate (Flower strategy), evaluate, record,
    checkpoint; ``resume_from``: a loaded checkpoint to continue from."""
    if cfg.scenario.name == "split":
        from fl_sim.split import server_main_split

        return server_main_split(cfg, grid, recorder, resume_from)
    if cfg.defense.secagg:
        return server_main_secagg(cfg, grid, context, recorder, resume_from)
    ws = workspace(cfg, "server")
    s = cfg.strategy
    strategy = make_strategy(
        s.name, proximal_mu=s.proximal_mu, eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2,
        tau=s.tau, server_learning_rate=s.server_learning_rate, server_momentum=s.server_momentum,
        trim_beta=s.trim_beta, num_malicious_clients=s.num_malicious_clients,
        # user-level DP calibrates its noise to a plain mean: every client weighs the same
        weighted_by_key="unit-weight" if cfg.defense.central_dp else "num-examples")
    central = CentralDP(cfg) if cfg.defense.central_dp else None
    if central is not None:
        d = cfg.defense
        strategy = with_central_dp(strategy, side=str(d.central_side), clipping=str(d.central_clipping),
                                   noise_multiplier=float(d.central_noise_multiplier),
                                   clipping_norm=float(d.clipping_norm), num_sampled_clients=central.num_sampled)
    node_of = discover_clients(grid, cfg.num_clients, cfg.round_timeout)
    client_of = {n: c for c, n in node_of.items()}
    # NaN/Inf in an update is rejected and reported, never averaged (nor clipped by a DP wrapper)
    guard = strategy = RejectNonFinite(strategy, client_of=lambda m: client_of.get(m.metadata.src_node_id, -1))
    if cfg.attack.name != "none":
        strategy = adversarial_server(cfg, strategy, ws, client_of)
    ledger = privacy_ledger(cfg, ws)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in initial_model(cfg, ws.data).state_dict().items()})
    rewrite = malicious_rewrite(cfg, arrays.to_torch_state_dict())
    x_test, y_test = ws.test_tensors()
    first = 1
    if resume_from is not None:  # continue an interrupted run from its last checkpoint
        from fl_sim import checkpoint

        arrays = ArrayRecord(resume_from["model"])
        checkpoint.restore_strategy(strategy, resume_from["strategy"])
        checkpoint.restore_rng(rng, resume_from["rng"])
        state = resume_from["state"]
        if ledger is not None:
            ledger.restore(state.get("ledger", {}))
        if central is not None:
            central.rounds, central.per_round = list(state["central"]["rounds"]), list(state["central"]["per_round"])
        first = int(resume_from["round"]) + 1
        log.info("resuming after round %d", first - 1)
    recorder.started()
    for rnd in range(first, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(rng, cfg.num_clients, s.fraction_train, s.min_train_clients)
        view = SampledGrid(grid, [node_of[c] for c in sampled])
        messages = list(strategy.configure_train(rnd, arrays, train_config(cfg, rnd), view))
        if resume_from is not None and ledger is not None:  # fresh client nodes get their DP history back
            for i, m in enumerate(messages):
                entry = ledger.clients.get(client_of.get(m.metadata.dst_node_id, -1))
                if entry is not None and entry.get("steps"):  # Flower's messages share one content: copy it
                    content = RecordDict({**dict(m.content.items()), RESTORE_KEY: dp_history_record(entry)})
                    messages[i] = Message(content=content, dst_node_id=m.metadata.dst_node_id,
                                          message_type=m.metadata.message_type)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        # Aggregate in client order so that float sums do not depend on arrival order.
        replies.sort(key=lambda m: client_of.get(m.metadata.src_node_id, -1))
        ok = [m for m in replies if not m.has_error()]
        failures = {client_of.get(m.metadata.src_node_id, -1): m.error.reason for m in replies if m.has_error()}
        answered = {m.metadata.src_node_id for m in replies}
        late = [c for c in sampled if node_of[c] not in answered]  # no reply within round_timeout
        failures.update({c: f"no reply within round_timeout={cfg.round_timeout:g} s" for c in late})
        stragglers = len(late) + sum(float(m.content["client"].get("delay", 0.0)) > 0 for m in ok)
        if not ok:
            reasons = "; ".join(f"client {c}: {r.splitlines()[-1] if r else '?'}" for c, r in failures.items())
            raise RuntimeError(f"round {rnd}: every sampled client failed ({reasons})")
        if ledger is not None:  # DP-SGD clients report their ε; those out of budget sent no model
            for m in ok:
                ledger.observe(rnd, client_of.get(m.metadata.src_node_id, -1), m.content["privacy"])
            ok = [m for m in ok if not bool(m.content["privacy"]["declined"])]
        seen = len(guard.rejected)
        ok = guard.screen(rnd, ok)  # before the attack sees it too
        rejected = [{"client": e.get("client", -1), "reason": e["reason"]} for e in guard.rejected[seen:]]
        if isinstance(strategy, AdversarialStrategy):
            strategy.note_failures(rnd, sorted(set(failures) | {e["client"] for e in rejected}))
        t_agg = time.perf_counter()
        np.random.seed(np.random.SeedSequence([cfg.seed, rnd, 0xA6]).generate_state(1)[0])  # Flower's DP noise
        new_arrays, metrics = strategy.aggregate_train(rnd, ok) if ok else (None, None)  # attacks happen in here
        if ledger is not None:
            ledger.end_round(rnd)
            recorder.privacy = ledger.summary()
        if central is not None and ok:
            central.released(rnd)
            recorder.privacy = central.summary() if ledger is None else {**recorder.privacy, "central": central.summary()}
        attack_seconds = 0.0
        if isinstance(strategy, AdversarialStrategy):
            attack_seconds = time.perf_counter() - t_agg
            score_attacks(strategy, cfg, ws, recorder)
        if new_arrays is not None:
            arrays = new_arrays if rewrite is None else ArrayRecord(rewrite(new_arrays.to_torch_state_dict()))
        ws.model.load_state_dict(arrays.to_torch_state_dict())
        test_loss, test_acc = evaluate(ws.model, x_test, y_test, cfg.eval_batch_size)
        recorder.round(
            round=rnd,
            train_loss=float(metrics["train_loss"]) if metrics and "train_loss" in metrics else None,
            test_loss=test_loss,
            test_accuracy=test_acc,
            clients=sampled,
            trained=len(ok),  # replies aggregated (sampled minus failed minus out of DP budget)
            failures=len(failures),
            failed={str(c): _reason(r) for c, r in sorted(failures.items())},
            rejected=rejected,
            stragglers=stragglers,
            seconds=time.perf_counter() - t0,
            attack_seconds=attack_seconds,
        )
        if cfg.checkpoint:
            from fl_sim import checkpoint

            checkpoint.save(recorder.run_dir, server_round=rnd, config=OmegaConf.to_container(cfg, resolve=True),
                            model=arrays.to_torch_state_dict(), strategy=strategy, rng=rng, recorder=recorder,
                            state={"ledger": ledger.state() if ledger is not None else {},
                                   "central": {"rounds": central.rounds, "per_round": central.per_round}
                                   if central is not None else {}})


class CentralDP:
    """User-level DP of the released global models (Flower's DP wrappers add the noise). Each round
    with updates is one Gaussian mechanism of noise multiplier z on the clipped sum, composed over the
    rounds with Opacus' RDP accountant; no amplification by client sampling is claimed (as Flower's
    accountant's "no-amplification"), so ε is an upper bound. Adaptive clipping also spends budget on
    the clipped-count estimate (Andrew et al. 2021): its ε is not accounted here and reported as such."""

    def __init__(self, cfg: DictConfig):
        d, st = cfg.defense, cfg.strategy
        self.z, self.delta = float(d.central_noise_multiplier), float(d.delta)
        self.adaptive = d.central_clipping == "adaptive"
        self.side, self.clipping_norm = str(d.central_side), float(d.clipping_norm)
        self.num_sampled = num_sampled(cfg.num_clients, st.fraction_train, st.min_train_clients)
        self.rounds: list[int] = []
        self.per_round: list[dict] = []

    def released(self, server_round: int) -> None:
        self.rounds.append(server_round)
        eps = None if self.adaptive else epsilon([(self.z, 1.0, len(self.rounds))], self.delta, "rdp")
        self.per_round.append({"round": server_round, "epsilon": eps if eps is None or math.isfinite(eps) else None,
                               "infinite": eps is not None and not math.isfinite(eps)})

    def summary(self) -> dict:
        last = self.per_round[-1] if self.per_round else {"epsilon": None, "infinite": False}
        return {
            "mechanism": "central_dp", "accountant": None if self.adaptive else "rdp", "delta": self.delta,
            "epsilon": last["epsilon"], "infinite": last["infinite"], "clients": {}, "max_epsilon": None,
            "epsilon_per_round": self.per_round, "stopped": [], "model_changes": [],
            "notes": [f"user-level DP of each client's whole update, {self.side}-side "
                      f"{'adaptive' if self.adaptive else 'fixed'} clipping (norm {self.clipping_norm:g}"
                      f"{' initially' if self.adaptive else ''}), noise multiplier {self.z:g} on the clipped sum of "
                      f"{self.num_sampled} sampled clients (Flower's DP wrapper); ε composes the released rounds "
                      "with no amplification by sampling (an upper bound)"
                      + ("; ε not accounted: adaptive clipping's count noise is not modelled here" if self.adaptive else "")],
        }


def server_main_secagg(cfg: DictConfig, grid: Grid, context: Context, recorder,
                       resume_from: dict | None = None) -> None:
    """The same run under Flower's SecAgg+ (legacy workflow): the server only ever holds the
    aggregate of the sampled clients' models, and that is what an adversarial server attacks."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from attacks.base import Observation
    from fl_sim.attacking import attack_from_config
    from strategies.adversarial import AttackJob
    from strategies.secure_aggregation import ObservedFedAvg

    ws = workspace(cfg, "server")
    d, s = cfg.defense, cfg.strategy
    node_of = discover_clients(grid, cfg.num_clients, cfg.round_timeout)
    client_of = {n: c for c, n in node_of.items()}
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    init = initial_model(cfg, ws.data)
    keys = list(init.state_dict().keys())
    start = [v.detach().cpu().numpy() for v in init.state_dict().values()]
    offset = 0  # Flower's legacy loop counts from 1: a resumed run's rounds are offset
    if resume_from is not None:
        from fl_sim import checkpoint

        start = [resume_from["model"][k].numpy() for k in keys]
        checkpoint.restore_rng(rng, resume_from["rng"])
        offset = int(resume_from["round"])
        log.info("resuming after round %d", offset)
    attack = attack_from_config(cfg.attack) if cfg.attack.name != "none" else None
    scratch = initial_model(cfg, ws.data) if attack is not None else None  # the attack's copy of the architecture
    executor = attack_executor(cfg) if attack is not None else None
    x_test, y_test = ws.test_tensors()
    rounds: dict[int, dict] = {}

    def sample(rnd: int) -> list[int]:
        rnd += offset
        sampled = sample_clients(rng, cfg.num_clients, s.fraction_train, s.min_train_clients)
        rounds[rnd] = {"t0": time.perf_counter(), "clients": sampled, "trained": 0, "train_loss": None,
                       "attack_seconds": 0.0}
        return [node_of[c] for c in sampled]

    def observe(rnd: int, nodes: list[int], sent: list, aggregate: list, results: list) -> None:
        rnd += offset
        clients = sorted(client_of[n] for n in nodes)
        n_total = sum(int(r.num_examples) for r in results)
        rounds[rnd].update(trained=len(results), stragglers=sum(float(r.metrics.get("delay", 0)) > 0 for r in results),
                           train_loss=sum(
            float(r.metrics["train_loss"]) * int(r.num_examples) for r in results) / max(n_total, 1))
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
        rounds[rnd]["attack_seconds"] = time.perf_counter() - t

    rewrite = malicious_rewrite(cfg, init.state_dict())

    def as_sent(ndarrays: list) -> dict[str, torch.Tensor]:
        state = {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, ndarrays)}
        return state if rewrite is None else rewrite(state)

    def evaluate_fn(rnd: int, ndarrays: list, _config: dict):
        if rnd == 0:
            recorder.started()
            return None
        rnd += offset
        ws.model.load_state_dict(as_sent(ndarrays))
        test_loss, test_acc = evaluate(ws.model, x_test, y_test, cfg.eval_batch_size)
        r = rounds.get(rnd, {"t0": time.perf_counter(), "clients": [], "trained": 0, "train_loss": None,
                             "attack_seconds": 0.0})
        recorder.round(round=rnd, train_loss=r["train_loss"], test_loss=test_loss, test_accuracy=test_acc,
                       clients=r["clients"], trained=r["trained"], failures=len(r["clients"]) - r["trained"],
                       stragglers=r.get("stragglers", 0),
                       seconds=time.perf_counter() - r["t0"], attack_seconds=r["attack_seconds"])
        if cfg.checkpoint:  # the aggregated model as the strategy holds it (a malicious rewrite is re-applied)
            from fl_sim import checkpoint

            checkpoint.save(recorder.run_dir, server_round=rnd, config=OmegaConf.to_container(cfg, resolve=True),
                            model={k: torch.from_numpy(np.array(v)) for k, v in zip(keys, ndarrays)}, rng=rng,
                            recorder=recorder)
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


def _count_or_fraction(v: float) -> int | float:
    """Flower's convention: an int counts clients, a float in (0, 1] is a fraction of those sampled."""
    return int(v) if v > 1 else float(v)


def privacy_ledger(cfg: DictConfig, ws: Workspace) -> PrivacyLedger | None:
    d = cfg.defense
    if d.local_dp and not d.dpsgd:
        z = local_dp_noise_multiplier(float(d.local_epsilon), float(d.delta))
        return PrivacyLedger(mechanism="local_dp", accountant=str(d.accountant), delta=float(d.delta),
                             max_epsilon=None if d.max_epsilon is None else float(d.max_epsilon), notes=[
            f"local DP of each client's whole update (Flower's LocalDpMod): clipped to {d.clipping_norm:g}, Gaussian "
            f"noise for a nominal (ε={d.local_epsilon:g}, δ={d.delta:g}) per release, sensitivity "
            f"{d.local_sensitivity or d.clipping_norm:g}, i.e. noise multiplier {z:.4g}; ε composes every round the "
            "client sent an update (RDP of the Gaussian mechanism)"])
    if not cfg.defense.dpsgd:
        return None
    base = _architecture(cfg, ws.data)
    d = cfg.defense
    notes = ["sample-level (ε, δ)-DP of each client's examples, composed over every round the client trained in; "
             f"Poisson sampling, noise multiplier {'calibrated to target ε ' + str(d.target_epsilon) + ' over ' + str(cfg.num_rounds) + ' rounds' if d.target_epsilon is not None else d.noise_multiplier}, "
             f"clipping norm {d.max_grad_norm}, Opacus grad_sample_mode "
             f"{resolve_grad_sample_mode(str(d.grad_sample_mode), cfg.model.name)}"]
    return PrivacyLedger(mechanism="dpsgd", accountant=str(d.accountant), delta=float(d.delta),
                         max_epsilon=None if d.max_epsilon is None else float(d.max_epsilon),
                         model_changes=make_dp_compatible(base)[1], notes=notes)


def score_attacks(strategy: AdversarialStrategy, cfg: DictConfig, ws: Workspace, recorder) -> None:
    """The evaluator's turn: score the round's reconstructions against the truth, note skipped targets."""
    for outcome in strategy.take_outcomes():
        recorder.attack(evaluate_outcome(outcome, ws.data, cfg.attack.name, recorder.run_dir))
    for skipped in strategy.skipped:
        log.warning("attack skipped: round %d client %d (%s)", skipped["round"], skipped["client"], skipped["reason"])
    recorder.skipped_attacks += strategy.skipped
    strategy.skipped = []


def attack_executor(cfg: DictConfig):
    """Ray tasks on the reserved attack resource, or this process when the cluster has none."""
    from fl_sim.attacking import ATTACK_RESOURCE, executor_from_config, local_executor

    a = cfg.attack
    executor = executor_from_config(cfg)
    if a.workers > 0:
        import ray

        if ray.cluster_resources().get(ATTACK_RESOURCE, 0) < 1:
            log.warning("the Ray cluster has no '%s' resource: attacks run in the server process "
                        "(start Ray nodes with --resources='{\"%s\": N}' to run them in parallel)",
                        ATTACK_RESOURCE, ATTACK_RESOURCE)
            executor = local_executor(max(1, int(a.num_cpus)))
    return executor


def adversarial_server(cfg: DictConfig, inner, ws: Workspace, client_of: dict[int, int]) -> AdversarialStrategy:
    """The honest-but-curious (or, with imprint, malicious) server around ``inner``."""
    from fl_sim.attacking import attack_from_config, knowledge_fn

    a = cfg.attack
    executor = attack_executor(cfg)
    scratch = initial_model(cfg, ws.data)
    return AdversarialStrategy(
        inner, attack_from_config(a), knowledge_fn(cfg, scratch, ws.data),
        client_of=lambda m: client_of.get(m.metadata.src_node_id, -1),
        targets=set(a.target_clients) or None, rounds=set(a.rounds) or None, executor=executor)


def make_server_app(cfg: dict | DictConfig, recorder, resume_from: dict | None = None) -> ServerApp:
    conf = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(conf, grid, recorder, context, resume_from)

    return app


# --------------------------------------------------------------------------- `flwr run .`

@functools.lru_cache(maxsize=4)
def _compose_validated(overrides: str) -> DictConfig:
    from fl_sim.config import validate
    from fl_sim.runner import compose

    cfg = compose(overrides.split())
    validate(cfg)
    return cfg


def _cfg_from_run_config(context: Context) -> DictConfig:
    return _compose_validated(str(context.run_config.get("overrides", "")))


client_app = make_client_app(_cfg_from_run_config)
server_app = ServerApp()


@server_app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the same run, its run directory under outputs/flwr-run/."""
    from fl_sim.runner import RunRecorder, new_run_dir, prepare

    cfg = _cfg_from_run_config(context)
    run_dir = str(context.run_config.get("run_dir", ""))
    recorder = RunRecorder(cfg, Path(run_dir) if run_dir else new_run_dir("outputs/flwr-run"))
    try:
        prepare(cfg, recorder)
        server_main(cfg, grid, recorder, context)
        recorder.finish("completed")
    except Exception as e:
        recorder.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
