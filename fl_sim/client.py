"""The client side: Flower's ClientApp. A train message is answered by local training on the
node's partition (plain SGD/Adam, or DP-SGD through Opacus within the client's ε budget), after
the client's simulated failures; the update then passes through the client's mods
(``fl_sim.client_mods``). Under SecAgg+ the same training speaks Flower's legacy format; in split
learning the message is one step of ``fl_sim.split.client``.

``make_client_app(cfg)`` builds the app for ``fl_sim.runner`` (and, with a config function, for
``flwr run``: ``fl_sim.flwr_app``)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from omegaconf import DictConfig, OmegaConf

from defenses.dpsgd import dp_local_train, resolve_grad_sample_mode, steps_per_epoch
from defenses.inversion import BiDO, inversion_defense_loss, seed_bottlenecks
from fl_sim.client_mods import secagg_mod, update_defenses_mod
from fl_sim.cohorts import in_cohort, is_cohort, num_nodes, train_cohort
from fl_sim.faults import maybe_fail, sends_nan
from fl_sim.malicious import INJECTED_KEY, as_received
from fl_sim.privacy import DPBudget, dp_mechanism, restore_dp
from fl_sim.sampling import round_seed
from fl_sim.split.client import client_split_step
from fl_sim.training import local_train, make_optimizer
from fl_sim.workspace import workspace


_LAST_RECEIVED: list = [None, None]  # (ArrayRecord, its state dict): a cohort's clients share the model sent


def _as_state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The received model as tensors, converted once for every client of a cohort message that shares it
    (the tensors are only read: loading them into a model copies them)."""
    if _LAST_RECEIVED[0] is not arrays:
        _LAST_RECEIVED[:] = [arrays, arrays.to_torch_state_dict()]
    return _LAST_RECEIVED[1]


def client_train(cfg: DictConfig, msg: Message, context: Context) -> Message:
    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    if INJECTED_KEY in msg.content:  # attack=hitaj: the active participant also trains on its generated samples
        extra = msg.content[INJECTED_KEY].to_torch_state_dict()
        x, y = torch.cat([x, extra["inputs"].to(x.device)]), torch.cat([y, extra["labels"].to(y.device)])
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    delay = maybe_fail(cfg, server_round, cid, sleep=not in_cohort(context))  # a cohort's node accounts it
    received = _as_state_dict(msg.content["arrays"])
    model = as_received(ws.model, received, ws.data.input_shape)  # a malicious server's block, when sent one
    model.load_state_dict(received)
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, server_round, cid))
    epochs, batch_size, lr = int(conf["local-epochs"]), int(conf["batch-size"]), float(conf["lr"])
    records: dict[str, Any] = {}
    restore_dp(msg, context)
    budget = DPBudget.load(context, cfg, len(x), epochs, batch_size) if dp_mechanism(cfg) else None
    if budget is not None:
        # one round costs its DP-SGD steps, or one release of the noised update (local DP)
        steps_planned = epochs * steps_per_epoch(len(x), batch_size) if cfg.defense.dpsgd else 1
        if budget.would_exceed(steps_planned):
            # Out of budget: the client stays out of this and every later round.
            records["privacy"] = budget.record(declined=True)
            return Message(content=RecordDict({
                "metrics": MetricRecord({"num-examples": len(x)}),
                "client": ConfigRecord({"partition-id": cid, "steps": 0, "delay": delay, "device": str(ws.device)}),
                **records}), reply_to=msg)
    if cfg.defense.dpsgd:
        state, loss, steps, _ = dp_local_train(
            model, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
            noise_multiplier=budget.noise_multiplier, max_grad_norm=float(cfg.defense.max_grad_norm),
            make_optimizer=lambda params: make_optimizer(
                str(conf["optimizer"]), params, lr, float(conf["momentum"]), float(conf["weight-decay"])),
            grad_sample_mode=resolve_grad_sample_mode(str(cfg.defense.grad_sample_mode), cfg.model.name),
            generator=gen, loss_fn=training_loss(cfg))
    else:
        state, loss, steps = plain_train(model, x, y, conf, gen, cfg)
    if sends_nan(cfg, server_round, cid):  # a diverged client (faults.nan_update_rate)
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    if budget is not None:
        budget.spend(server_round, steps if cfg.defense.dpsgd else 1)
        budget.save(context)
        records["privacy"] = budget.record(declined=False)
    content = RecordDict({
        "arrays": ArrayRecord(state),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x), "unit-weight": 1.0}),
        "client": ConfigRecord({"partition-id": cid, "steps": steps, "delay": delay, "device": str(ws.device)}),
        **records,
    })
    return Message(content=content, reply_to=msg)


def training_loss(cfg: DictConfig, bido: BiDO | None = None):
    """The clients' per-example loss under the model-inversion defenses (``defense=mid``,
    ``label_smoothing``, ``bido`` with its hooks ``bido``); None: plain cross-entropy."""
    d = cfg.defense
    if not (d.mid or d.label_smoothing or bido is not None):
        return None
    return functools.partial(inversion_defense_loss, alpha=float(d.smoothing) if d.label_smoothing else 0.0,
                             beta=float(d.mid_beta) if d.mid else 0.0, bido=bido)


def plain_train(model: torch.nn.Module, x, y, conf, gen: torch.Generator, cfg: DictConfig):
    """Local training with the hyper-parameters the server sent (``conf``: its train config) and the
    defenses' loss (``training_loss``); a MID bottleneck draws its noise from ``gen``."""
    d = cfg.defense
    bido = BiDO(model, float(d.bido_lambda_x), float(d.bido_lambda_y), float(d.bido_sigma)) if d.bido else None
    seed_bottlenecks(model, gen)
    try:
        loss, steps = local_train(
            model, x, y,
            epochs=int(conf["local-epochs"]), batch_size=int(conf["batch-size"]), lr=float(conf["lr"]),
            optimizer=str(conf["optimizer"]), momentum=float(conf["momentum"]),
            weight_decay=float(conf["weight-decay"]),
            proximal_mu=float(conf["proximal-mu"]) if "proximal-mu" in conf else 0.0,
            generator=gen, loss_fn=training_loss(cfg, bido),
        )
    finally:  # the model (reused next round, copied by attacks) keeps no generator and no hooks
        seed_bottlenecks(model, None)
        if bido is not None:
            bido.close()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, loss, steps


def client_train_legacy(cfg: DictConfig, msg: Message, context: Context) -> Message:
    """The same local training for Flower's legacy message format (FitIns -> FitRes), which the
    SecAgg+ protocol (``secaggplus_mod``) speaks."""
    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = int(fitins.config["server-round"])
    delay = maybe_fail(cfg, server_round, cid)  # mid-protocol: after SecAgg+'s key sharing
    keys = list(ws.model.state_dict().keys())
    ws.model.load_state_dict({k: torch.from_numpy(np.array(a))
                              for k, a in zip(keys, parameters_to_ndarrays(fitins.parameters))})
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, server_round, cid))
    state, loss, steps = plain_train(ws.model, x, y, fitins.config, gen, cfg)
    res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters([state[k].numpy() for k in keys]), len(x),
                 {"train_loss": float(loss), "partition-id": cid, "steps": steps, "delay": delay,
                  "device": str(ws.device)})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def client_query(cfg: DictConfig, msg: Message, context: Context) -> Message:
    """Client discovery: say which client (partition) this node is, and load its workspace now."""
    cid = int(context.node_config["partition-id"])
    size = int(context.node_config.get("num-partitions", -1))  # the federation's size, as the node knows it
    if size in (-1, num_nodes(cfg)):
        workspace(cfg, "client")  # load data and model on this actor now, not in round 1
    return Message(content=RecordDict({"client": ConfigRecord({"partition-id": cid, "num-partitions": size})}),
                   reply_to=msg)


def _read_only(cfg: dict | DictConfig) -> DictConfig:
    conf = OmegaConf.create(cfg)
    OmegaConf.set_readonly(conf, True)  # nothing on the client changes the run's config
    return conf


def make_client_app(cfg: dict | DictConfig | Callable[[Context], DictConfig]) -> ClientApp:
    """ClientApp training the received model on this node's partition.

    ``cfg`` is the resolved config (a plain dict travels to Ray actors cheaply) or a function
    of the Context returning it (``flwr run``).
    """
    get_cfg = cfg if callable(cfg) else (lambda _ctx, _c=_read_only(cfg): _c)
    app = ClientApp()
    defenses = update_defenses_mod(get_cfg)  # on the app's replies, and on each cohort client's

    @app.train(mods=[secagg_mod(get_cfg), defenses])
    def _train(msg: Message, context: Context) -> Message:
        cfg = get_cfg(context)
        if cfg.scenario.name == "split":
            return client_split_step(cfg, msg, context)
        if is_cohort(msg):  # many virtual clients on this node: each trains in turn, through its own mods
            return train_cohort(msg, context, lambda m, c: defenses(m, c, lambda mm, cc: client_train(cfg, mm, cc)),
                                round_timeout=cfg.round_timeout)
        return (client_train_legacy if cfg.defense.secagg else client_train)(cfg, msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return client_query(get_cfg(context), msg, context)

    return app
