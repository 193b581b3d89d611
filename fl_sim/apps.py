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

from fl_sim.attacking import evaluate_outcome
from fl_sim.data import FederatedData, build_federated_data
from fl_sim.models import build_model
from fl_sim.training import evaluate, local_train, resolve_device
from strategies import make_strategy
from strategies.adversarial import AdversarialStrategy

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
    keys = ("dataset", "partition", "num_clients", "seed", "model", "attack", "device")  # all that shapes data/model
    return json.dumps({k: OmegaConf.to_container(cfg[k]) if isinstance(cfg[k], DictConfig) else cfg[k]
                       for k in keys}, sort_keys=True)


def initial_model(cfg: DictConfig, data: FederatedData) -> torch.nn.Module:
    """The seeded initial global model (same seed -> same weights), on the CPU; with attack=imprint,
    the malicious server's version (an imprint block in front)."""
    from fl_sim.attacking import wrap_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, width=cfg.model.width,
                        hidden=tuple(cfg.model.hidden), activation=cfg.model.activation)
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
        data = build_federated_data(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed)
        model = initial_model(cfg, data).to(device)
        _WORKSPACES[key] = Workspace(data, model, device, {})
    return _WORKSPACES[key]


def round_seed(seed: int, server_round: int, cid: int) -> int:
    """Seed of a client's local shuffling in a round: depends only on (seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, cid]).generate_state(1)[0])


# --------------------------------------------------------------------------- ClientApp

def client_train(cfg: DictConfig, msg: Message, context: Context) -> Message:
    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    conf = msg.content["config"]
    ws.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, int(conf["server-round"]), cid))
    loss, steps = local_train(
        ws.model, x, y,
        epochs=int(conf["local-epochs"]), batch_size=int(conf["batch-size"]), lr=float(conf["lr"]),
        optimizer=str(conf["optimizer"]), momentum=float(conf["momentum"]),
        weight_decay=float(conf["weight-decay"]),
        proximal_mu=float(conf["proximal-mu"]) if "proximal-mu" in conf else 0.0,
        generator=gen,
    )
    state = {k: v.detach().cpu() for k, v in ws.model.state_dict().items()}
    content = RecordDict({
        "arrays": ArrayRecord(state),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x)}),
        "client": ConfigRecord({"partition-id": cid, "steps": steps}),
    })
    return Message(content=content, reply_to=msg)


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

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_train(get_cfg(context), msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return client_query(get_cfg(context), msg, context)

    return app


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


def sample_clients(rng: np.random.Generator, num_clients: int, fraction: float, minimum: int) -> list[int]:
    """Flower's rule (int(n * fraction), at least ``minimum``), drawn from a seeded generator; sorted."""
    k = min(num_clients, max(int(num_clients * fraction), minimum))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def server_main(cfg: DictConfig, grid: Grid, recorder) -> None:
    """The training loop of one run: sample, send, aggregate (Flower strategy), evaluate, record."""
    ws = workspace(cfg, "server")
    s = cfg.strategy
    strategy = make_strategy(
        s.name, proximal_mu=s.proximal_mu, eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2,
        tau=s.tau, server_learning_rate=s.server_learning_rate, server_momentum=s.server_momentum,
        trim_beta=s.trim_beta, num_malicious_clients=s.num_malicious_clients)
    node_of = discover_clients(grid, cfg.num_clients, cfg.round_timeout)
    client_of = {n: c for c, n in node_of.items()}
    if cfg.attack.name != "none":
        strategy = adversarial_server(cfg, strategy, ws, client_of)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in initial_model(cfg, ws.data).state_dict().items()})
    x_test, y_test = ws.test_tensors()
    recorder.started()
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(rng, cfg.num_clients, s.fraction_train, s.min_train_clients)
        view = SampledGrid(grid, [node_of[c] for c in sampled])
        messages = list(strategy.configure_train(rnd, arrays, train_config(cfg, rnd), view))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        # Aggregate in client order so that float sums do not depend on arrival order.
        replies.sort(key=lambda m: client_of.get(m.metadata.src_node_id, -1))
        ok = [m for m in replies if not m.has_error()]
        failures = {client_of.get(m.metadata.src_node_id, -1): m.error.reason for m in replies if m.has_error()}
        if not ok:
            reasons = "; ".join(f"client {c}: {r.splitlines()[-1] if r else '?'}" for c, r in failures.items())
            raise RuntimeError(f"round {rnd}: every sampled client failed ({reasons})")
        if isinstance(strategy, AdversarialStrategy):
            strategy.note_failures(rnd, sorted(failures))
        t_agg = time.perf_counter()
        new_arrays, metrics = strategy.aggregate_train(rnd, ok)  # the adversarial server attacks in here
        attack_seconds = 0.0
        if isinstance(strategy, AdversarialStrategy):
            attack_seconds = time.perf_counter() - t_agg
            score_attacks(strategy, cfg, ws, recorder)
        if new_arrays is not None:
            arrays = new_arrays
        ws.model.load_state_dict(arrays.to_torch_state_dict())
        test_loss, test_acc = evaluate(ws.model, x_test, y_test, cfg.eval_batch_size)
        recorder.round(
            round=rnd,
            train_loss=float(metrics["train_loss"]) if metrics and "train_loss" in metrics else None,
            test_loss=test_loss,
            test_accuracy=test_acc,
            clients=sampled,
            failures=len(failures),
            seconds=time.perf_counter() - t0,
            attack_seconds=attack_seconds,
        )


def score_attacks(strategy: AdversarialStrategy, cfg: DictConfig, ws: Workspace, recorder) -> None:
    """The evaluator's turn: score the round's reconstructions against the truth, note skipped targets."""
    for outcome in strategy.take_outcomes():
        recorder.attack(evaluate_outcome(outcome, ws.data, cfg.attack.name, recorder.run_dir))
    for skipped in strategy.skipped:
        log.warning("attack skipped: round %d client %d (%s)", skipped["round"], skipped["client"], skipped["reason"])
    recorder.skipped_attacks += strategy.skipped
    strategy.skipped = []


def adversarial_server(cfg: DictConfig, inner, ws: Workspace, client_of: dict[int, int]) -> AdversarialStrategy:
    """The honest-but-curious (or, with imprint, malicious) server around ``inner``."""
    from fl_sim.attacking import ATTACK_RESOURCE, attack_from_config, executor_from_config, knowledge_fn, local_executor

    a = cfg.attack
    executor = executor_from_config(cfg)
    if a.workers > 0:
        import ray

        if ray.cluster_resources().get(ATTACK_RESOURCE, 0) < 1:
            log.warning("the Ray cluster has no '%s' resource: attacks run in the server process "
                        "(start Ray nodes with --resources='{\"%s\": N}' to run them in parallel)",
                        ATTACK_RESOURCE, ATTACK_RESOURCE)
            executor = local_executor(max(1, int(a.num_cpus)))
    scratch = initial_model(cfg, ws.data)
    return AdversarialStrategy(
        inner, attack_from_config(a), knowledge_fn(cfg, scratch, ws.data),
        client_of=lambda m: client_of.get(m.metadata.src_node_id, -1),
        targets=set(a.target_clients) or None, rounds=set(a.rounds) or None, executor=executor)


def make_server_app(cfg: dict | DictConfig, recorder) -> ServerApp:
    conf = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(conf, grid, recorder)

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
        server_main(cfg, grid, recorder)
        recorder.finish("completed")
    except Exception as e:
        recorder.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
