"""Split learning on Flower's Simulation Engine (``scenario=split``): the same Ray simulation, ServerApp
and ClientApp as federated runs, with one Flower message per training step.

The model is cut after ``scenario.cut_layer``: the client keeps the bottom, the server the top.
Per batch the client runs the bottom on its data and sends the activations and labels; the server
runs the top, takes the loss, steps its own optimiser and returns the gradient at the cut; the
client back-propagates it through the bottom and steps. One message carries the gradient of batch
k-1 and asks for the activations of batch k, so a client's turn of K batches costs K+1 messages.

Modes (``scenario.mode``):

- ``vanilla`` (Gupta & Raskar 2018): the sampled clients take turns, in client order; the client-side
  model passes from one client to the next, relayed by the server (their centralised mode).
- ``splitfed`` (Thapa et al., "SplitFed", AAAI 2022, SFLV2): the sampled clients train in parallel
  from the same client-side model; the server processes their batches one after the other on a
  single server-side model (in client order) and averages the client-side models with Flower's
  FedAvg at the end of the round.

Client state between messages lives in the node's ``context.state`` (a Ray actor is not tied to a
client): the bottom's weights and optimiser state. The client recomputes the forward pass of batch
k-1 when its gradient arrives (the batch order is seeded by (seed, round, client), the cut
defenses' randomness by (seed, round, client, batch)), so nothing but records crosses messages.

What the server observes is the activations (``observed: "activations"``); attacks on them
(``rmle``, ``inverse_network``, ``unsplit``) run after the round on the batch ``attack.batch`` of each
targeted client's turn, with the client-side weights the server sent at the start of that turn
(white box for rMLE: exact for batch 0). ``fsha`` (a malicious server) returns its hijacking
gradient instead of the honest one for every batch, and decodes the targeted batch at once.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from attacks.base import Knowledge
from attacks.rmle import ActivationObservation
from defenses.cut import distance_correlation, dropout_activations, noisy_activations
from defenses.dpsgd import sample_rate, steps_per_epoch
from fl_sim.models import cut_points, layers, split_model
from fl_sim.training import evaluate, make_optimizer

log = logging.getLogger("fl_sim")

STATE_BOTTOM, STATE_OPTIMIZER = "split-bottom", "split-optimizer"
_NONLINEAR = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.MaxPool2d)


def default_cut(model: nn.Module) -> str:
    """The cut used when ``scenario.cut_layer`` is not set: after the model's first non-linearity."""
    for name, layer in layers(model)[:-1]:
        if isinstance(layer, _NONLINEAR):
            return name
    return cut_points(model)[0]


def cut_of(cfg: DictConfig, model: nn.Module) -> str:
    return str(cfg.scenario.cut_layer) if cfg.scenario.cut_layer else default_cut(model)


def split(cfg: DictConfig, model: nn.Module) -> tuple[nn.ModuleDict, nn.Sequential]:
    """(client side, server side) sharing ``model``'s layers. The client side is ``{"bottom": ...}``, plus
    ``"head"`` in the label-private U-shape (``scenario.head_layer``: the client keeps the layers after it,
    and its labels). An invalid cut is a ConfigError naming the valid ones."""
    from fl_sim.config import ConfigError

    try:
        bottom, rest = split_model(model, cut_of(cfg, model))
    except ValueError as e:
        raise ConfigError(f"{e} (model={cfg.model.name})") from e
    head_layer = cfg.scenario.get("head_layer")
    if not head_layer:
        return nn.ModuleDict({"bottom": bottom}), rest
    names = [n for n, _ in layers(model)]
    after = names[names.index(cut_of(cfg, model)) + 1:-1]  # the server keeps at least one layer, the client too
    if head_layer not in after:
        raise ConfigError(f"scenario.head_layer={head_layer!r} is not a layer after the cut that leaves the client "
                          f"a head (model={cfg.model.name}); choose one of {', '.join(after) or '(none: cut earlier)'}")
    k = after.index(head_layer) + 1
    middle, head = nn.Sequential(*list(rest)[:k]), nn.Sequential(*list(rest)[k:])
    return nn.ModuleDict({"bottom": bottom, "head": head}), middle


def ledger_sigma(cfg: DictConfig) -> str:
    d = cfg.defense
    return f"calibrated to target ε {d.target_epsilon}" if d.target_epsilon is not None else f"{d.noise_multiplier:g}"


def _part(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}


def batch_plan(n: int, epochs: int, batch_size: int, seed: int, server_round: int, cid: int,
               poisson: bool = False) -> list[np.ndarray]:
    """The client's batches of a round, in order: a seeded permutation per epoch, cut in batches; with
    ``poisson`` (DP-SGD), as many Poisson draws of rate 1/ceil(n/batch_size) (Opacus' sampling)."""
    from fl_sim.apps import round_seed

    gen = torch.Generator().manual_seed(round_seed(seed, server_round, cid))
    if poisson:
        q = sample_rate(n, batch_size)
        return [torch.nonzero(torch.rand(n, generator=gen) < q).flatten().numpy()
                for _ in range(epochs * steps_per_epoch(n, batch_size))]
    plan = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).numpy()
        plan += [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return plan


def _step_seed(seed: int, server_round: int, cid: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, server_round, cid, step, 0xC7]).generate_state(1)[0])


def at_the_cut(cfg: DictConfig, a: torch.Tensor, server_round: int, cid: int, step: int) -> torch.Tensor:
    """The cut defenses on what the client sends (dropout, then noise), seeded by the step so that the
    client's recomputation of a batch sends the same thing."""
    d = cfg.defense
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, server_round, cid, step))
    if d.cut_dropout:
        a = dropout_activations(a, float(d.cut_dropout_p), generator=gen)
    if d.cut_noise:
        a = noisy_activations(a, float(d.cut_noise_scale), str(d.cut_noise_kind), generator=gen)
    return a


def _save_optimizer(opt: torch.optim.Optimizer) -> ArrayRecord:
    state = opt.state_dict()["state"]
    return ArrayRecord({f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
                        for i, s in state.items() for k, v in s.items()})


def _load_optimizer(opt: torch.optim.Optimizer, record: ArrayRecord) -> None:
    state: dict[int, dict] = {}
    for key, v in record.to_torch_state_dict().items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


# --------------------------------------------------------------------------- the client

def client_split_step(cfg: DictConfig, msg: Message, context: Context) -> Message:
    """One split-learning message on the client: back-propagate batch k-1's gradient (k >= 1), then
    send batch k's activations, or, after the last batch, the trained client-side model.

    With ``defense=dpsgd`` the client-side model trains with DP-SGD (Opacus' per-example clipping and
    noise on its own parameters, Poisson batches): the gradient at the cut of example i only depends
    on example i, so per-example gradients of the bottom are exact. ε is accounted as in federated runs."""
    from fl_sim.apps import DPBudget, _maybe_drop_out, restore_dp, workspace

    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    conf = msg.content["config"]
    rnd, k = int(conf["server-round"]), int(conf["step"])
    epochs, batch_size, lr = int(conf["local-epochs"]), int(conf["batch-size"]), float(conf["lr"])
    dp = bool(cfg.defense.dpsgd)
    plan = batch_plan(len(x), epochs, batch_size, cfg.seed, rnd, cid, poisson=dp)
    work = copy.deepcopy(split(cfg, ws.model)[0]).train()  # Opacus' hooks must not stay on the workspace model
    bottom = work["bottom"]
    # one optimiser for the client side: a step only moves the part that has gradients (bottom or head)
    opt = make_optimizer(str(conf["optimizer"]), work.parameters(), lr, float(conf["momentum"]),
                         float(conf["weight-decay"]))
    if k == 0:
        restore_dp(msg, context)
    budget = DPBudget.load(context, cfg, len(x), epochs, batch_size) if dp else None
    content: dict = {"client": ConfigRecord({"partition-id": cid, "step": k, "steps": len(plan)})}
    if "head-input" in msg.content:  # U-shape: the client's head takes the server's output, with the labels
        work.load_state_dict(context.state[STATE_BOTTOM].to_torch_state_dict())
        if STATE_OPTIMIZER in context.state:
            _load_optimizer(opt, context.state[STATE_OPTIMIZER])
        h = msg.content["head-input"].to_torch_state_dict()["input"].requires_grad_(True)
        yb = y[torch.from_numpy(plan[k])]
        loss = F.cross_entropy(work["head"](h), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        context.state[STATE_BOTTOM] = ArrayRecord({n: v.detach().cpu() for n, v in work.state_dict().items()})
        context.state[STATE_OPTIMIZER] = _save_optimizer(opt)
        content["client"]["loss"] = float(loss.detach())
        content["head-gradient"] = ArrayRecord({"gradient": h.grad.detach().cpu()})
        return Message(content=RecordDict(content), reply_to=msg)
    if k == 0:
        content["client"]["delay"] = _maybe_drop_out(cfg, rnd, cid)
        work.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        if budget is not None:
            if budget.would_exceed(len(plan)):  # out of budget: no training this round nor later
                content["privacy"] = budget.record(declined=True)
                content["metrics"] = MetricRecord({"num-examples": len(x)})
                return Message(content=RecordDict(content), reply_to=msg)
            budget.save(context)  # the noise multiplier (calibrated once) for the turn's later messages
    else:
        work.load_state_dict(context.state[STATE_BOTTOM].to_torch_state_dict())
        if STATE_OPTIMIZER in context.state:
            _load_optimizer(opt, context.state[STATE_OPTIMIZER])
        net, stepper = bottom, opt
        if budget is not None:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            net = GradSampleModule(bottom, loss_reduction="mean")
            device = next(bottom.parameters()).device  # Opacus draws the noise where the parameters are
            noise = torch.Generator(device=device).manual_seed(_step_seed(cfg.seed, rnd, cid, k - 1) + 1)
            stepper = DPOptimizer(opt, noise_multiplier=budget.noise_multiplier,
                                  max_grad_norm=float(cfg.defense.max_grad_norm),
                                  expected_batch_size=max(1, int(len(x) * budget.sample_rate)), generator=noise)
        idx = torch.from_numpy(plan[k - 1])
        buffers = {n: b.clone() for n, b in work.named_buffers()}  # the recomputation must not count twice
        stepper.zero_grad(set_to_none=True)
        if len(idx) == 0:  # an empty Poisson draw still takes its (pure noise) DP-SGD step
            for p in bottom.parameters():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        else:
            xb = x[idx]
            sent = at_the_cut(cfg, net(xb), rnd, cid, k - 1)
            grad = msg.content["cut-gradient"].to_torch_state_dict()["gradient"].to(sent.device)
            if cfg.defense.nopeek:  # the client's own loss term: decorrelate what it sends from its inputs
                leak = float(cfg.defense.nopeek_alpha) * distance_correlation(xb, sent)
                torch.autograd.backward([sent, leak], [grad, torch.ones_like(leak)])
            else:
                sent.backward(grad)
        stepper.step()
        if net is not bottom:
            net._close()
        with torch.no_grad():
            for n, b in work.named_buffers():
                b.copy_(buffers[n])
    if k < len(plan):
        idx = torch.from_numpy(plan[k])
        with torch.no_grad():
            a = at_the_cut(cfg, bottom(x[idx]), rnd, cid, k)
        sent = {"activations": a.detach().cpu()}
        if "head" not in work:  # labels travel with the activations unless the client keeps the head
            sent["labels"] = y[idx].cpu()
        content["activations"] = ArrayRecord(sent)
        context.state[STATE_BOTTOM] = ArrayRecord({n: v.detach().cpu() for n, v in work.state_dict().items()})
        context.state[STATE_OPTIMIZER] = _save_optimizer(opt)
    else:
        content["arrays"] = ArrayRecord({n: v.detach().cpu() for n, v in work.state_dict().items()})
        content["metrics"] = MetricRecord({"num-examples": len(x)})
        if budget is not None:
            budget.spend(rnd, len(plan))
            budget.save(context)
            content["privacy"] = budget.record(declined=False)
    return Message(content=RecordDict(content), reply_to=msg)


# --------------------------------------------------------------------------- the server

class SplitServer:
    """The server side of one run: the top model and its optimiser, and, when attacking, the attack."""

    def __init__(self, cfg: DictConfig, model: nn.Module, data, recorder):
        from fl_sim.attacking import attack_from_config

        self.cfg, self.data, self.recorder = cfg, data, recorder
        self.model = model
        self.client_side, self.top = split(cfg, model)  # top: the server's part (the middle in a U-shape)
        self.bottom = self.client_side["bottom"]
        self.u_shape = "head" in self.client_side
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # U-shape: (cut input, output) per client
        c = cfg.client
        self.top_opt = make_optimizer(str(c.optimizer), self.top.parameters(), float(c.lr), float(c.momentum),
                                      float(c.weight_decay))
        a = cfg.attack
        self.attack = attack_from_config(a) if a.name not in ("none", "label_leakage") else \
            ("label_leakage" if a.name == "label_leakage" else None)
        self.targets = set(a.target_clients) or None
        self.rounds = set(a.rounds) or None
        self.jobs: list = []
        self.outcomes: list = []
        aux = None if data.x_aux is None else torch.from_numpy(data.x_aux)
        self.auxiliary = aux
        if a.name == "fsha":
            self.attack.setup(copy.deepcopy(self.bottom), data.input_shape, aux)
        self.loss_sum, self.loss_count = 0.0, 0
        self.stragglers: set[int] = set()
        self.restore: dict[int, ConfigRecord] = {}  # after a resume: clients' DP histories to hand back
        self.label_guesses: list[dict] = []  # label_leakage: what the server inferred, for the evaluator
        self.skipped: list[dict] = []  # targets not attacked, and why

    def skip(self, server_round: int, cid: int, reason: str) -> None:
        log.warning("attack skipped: round %d client %d (%s)", server_round, cid, reason)
        self.skipped.append({"round": server_round, "client": cid, "reason": reason})

    def label_attack(self, server_round: int, cid: int, step: int) -> bool:
        return self.cfg.attack.name == "label_leakage" and self._targeted(server_round, cid, step)

    def attacked(self, server_round: int, cid: int, step: int) -> bool:
        return self.cfg.attack.name != "label_leakage" and self._targeted(server_round, cid, step)

    def observe_cut_gradients(self, server_round: int, cid: int, gradient: torch.Tensor, batch: np.ndarray) -> None:
        """Label leakage (Li et al. 2022): the classes of the batch, up to a renaming, from the gradients the
        client's head returned; scored by the evaluator as label accuracy (best renaming)."""
        from attacks.label_leakage import direction_scoring, norm_scoring

        t = time.perf_counter()
        k = self.data.num_classes
        guess = norm_scoring(gradient) if k == 2 and self.cfg.attack.scoring == "norm" else \
            direction_scoring(gradient, k, seed=int(self.cfg.attack.seed))
        self.label_guesses.append({"round": server_round, "client": cid, "guess": guess,
                                   "batch": [int(i) for i in batch], "seconds": time.perf_counter() - t})

    def _targeted(self, server_round: int, cid: int, step: int) -> bool:
        a = self.cfg.attack
        return (self.attack is not None and step == int(a.batch)
                and (self.rounds is None or server_round in self.rounds)
                and (self.targets is None or cid in self.targets))

    def gradient(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gradient returned to the client: the honest one through the top, or FSHA's hijacking one."""
        if len(y) == 0:  # an empty Poisson batch (DP-SGD): nothing to learn from
            return torch.zeros_like(a)
        if self.cfg.attack.name == "fsha":
            self.top.eval()  # its statistics must not absorb the hijacked features
            with torch.no_grad():  # the server still reports the task loss its top would have
                self.loss_sum += float(F.cross_entropy(self.top(a), y, reduction="sum"))
            self.loss_count += len(y)
            return self.attack.hijack(a)
        self.top.train()
        a = a.detach().requires_grad_(True)
        loss = F.cross_entropy(self.top(a), y)
        self.top_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.top_opt.step()
        self.loss_sum += float(loss.detach()) * len(y)
        self.loss_count += len(y)
        return a.grad.detach()

    def forward_middle(self, cid: int, a: torch.Tensor) -> torch.Tensor:
        """U-shape: the server's layers on the activations; the graph is kept for the head's gradient."""
        self.top.train()
        a = a.detach().requires_grad_(True)
        h = self.top(a)
        self.graphs[cid] = (a, h)
        return h.detach()

    def backward_middle(self, cid: int, head_gradient: torch.Tensor, loss: float) -> torch.Tensor:
        """U-shape: back-propagate the gradient the client's head returned, step, return the cut's gradient."""
        a, h = self.graphs.pop(cid)
        self.top_opt.zero_grad(set_to_none=True)
        h.backward(head_gradient)
        self.top_opt.step()
        self.loss_sum += loss * len(a)
        self.loss_count += len(a)
        return a.grad.detach()

    def observe(self, server_round: int, cid: int, step: int, a: torch.Tensor, y: torch.Tensor | None,
                sent_bottom: dict[str, torch.Tensor], batch: np.ndarray) -> None:
        """What the attack does with one targeted batch of activations."""
        from attacks.base import Reconstruction
        from strategies.adversarial import AttackJob, AttackOutcome

        c = self.cfg.client
        model = copy.deepcopy(self.bottom)
        model.load_state_dict(_part(sent_bottom, "bottom"))  # the client-side weights the server sent this turn
        labels = None if y is None else y.clone()  # U-shape: the labels stay with the client
        know = Knowledge(model=model, input_shape=self.data.input_shape, num_classes=self.data.num_classes,
                         lr=float(c.lr), local_epochs=int(c.local_epochs), batch_size=int(c.batch_size),
                         num_examples=len(a), labels=labels, mean=tuple(self.data.mean.tolist()),
                         std=tuple(self.data.std.tolist()), auxiliary_inputs=self.auxiliary)
        job = AttackJob(server_round, cid, "activations", ActivationObservation(a.clone(), labels), know,
                        batch=[int(i) for i in batch])
        if self.cfg.attack.name == "fsha":  # the hijacker's decoder, as trained so far
            t = time.perf_counter()
            rec: Reconstruction = self.attack.reconstruct(job.observation, know)
            self.outcomes.append(AttackOutcome(job, rec, time.perf_counter() - t))
        else:
            self.jobs.append(job)

    def run_turns(self, grid: Grid, server_round: int, clients: list[int], node_of: dict[int, int],
                  start: dict[str, torch.Tensor], config: ConfigRecord) -> tuple[list[Message], dict[int, str]]:
        """Train the client-side model of each client in ``clients`` from ``start``, all in parallel (one
        message per client per step); returns the final replies (trained client-side models) and the
        failures {client: reason}."""
        from fl_sim.apps import RESTORE_KEY
        from strategies.guard import non_finite_reason

        client_of = {n: c for c, n in node_of.items()}
        plans = {c: batch_plan(len(self.data.partitions[c]), int(config["local-epochs"]), int(config["batch-size"]),
                               self.cfg.seed, server_round, c, poisson=bool(self.cfg.defense.dpsgd)) for c in clients}
        start_record = ArrayRecord({k: v.detach().cpu() for k, v in start.items()})

        def message(cid: int, step: int, extra: dict) -> Message:
            conf = ConfigRecord({**dict(config), "step": step})
            return Message(RecordDict({"config": conf, **extra}), dst_node_id=node_of[cid], message_type="train")

        for c in clients:  # a targeted batch that will never come
            if self._targeted(server_round, c, int(self.cfg.attack.batch)) and len(plans[c]) <= int(self.cfg.attack.batch):
                self.skip(server_round, c, f"attack.batch={self.cfg.attack.batch} but the client has only "
                                           f"{len(plans[c])} batch(es) this round")
        pending = [message(c, 0, {"arrays": start_record, **({RESTORE_KEY: self.restore[c]} if c in self.restore else {})})
                   for c in clients]
        finals: list[Message] = []
        failures: dict[int, str] = {}
        while pending:
            replies = list(grid.send_and_receive(pending, timeout=float(self.cfg.round_timeout)))
            replies.sort(key=lambda m: client_of.get(m.metadata.src_node_id, -1))  # deterministic top updates
            answered = {m.metadata.src_node_id for m in replies}
            for m in pending:
                if m.metadata.dst_node_id not in answered:
                    failures[client_of[m.metadata.dst_node_id]] = \
                        f"no reply within round_timeout={self.cfg.round_timeout:g} s"
                    self.stragglers.add(client_of[m.metadata.dst_node_id])
            pending = []
            for reply in replies:
                cid = client_of.get(reply.metadata.src_node_id, -1)
                if reply.has_error():
                    failures[cid] = reply.error.reason
                    continue
                bad = non_finite_reason(reply)
                if bad is not None:  # NaN/Inf from a client: its turn ends here, nothing of it is used
                    failures[cid] = f"rejected: {bad}"
                    self.graphs.pop(cid, None)
                    continue
                step = int(reply.content["client"]["step"])
                records = reply.content.array_records
                if "head-gradient" in records:  # U-shape: the client's head answered; finish the batch
                    gh = records["head-gradient"].to_torch_state_dict()["gradient"]
                    if self.label_attack(server_round, cid, step) and len(gh):
                        self.observe_cut_gradients(server_round, cid, gh, plans[cid][step])
                    g = self.backward_middle(cid, gh, float(reply.content["client"]["loss"]))
                    pending.append(message(cid, step + 1, {"cut-gradient": ArrayRecord({"gradient": g.cpu()})}))
                    continue
                if "activations" not in records:  # the turn's end
                    finals.append(reply)
                    continue
                if float(reply.content["client"].get("delay", 0.0)) > 0:
                    self.stragglers.add(cid)
                rec = records["activations"].to_torch_state_dict()
                a, y = rec["activations"].float(), rec["labels"].long() if "labels" in rec else None
                if self.attacked(server_round, cid, step):
                    if len(a) == 0:
                        self.skip(server_round, cid, "the attacked batch was an empty Poisson draw (DP-SGD)")
                    else:
                        self.observe(server_round, cid, step, a, y, start, plans[cid][step])
                if self.u_shape and self.cfg.attack.name != "fsha":
                    h = self.forward_middle(cid, a)
                    pending.append(message(cid, step, {"head-input": ArrayRecord({"input": h.cpu()})}))
                    continue
                g = self.gradient(a, y)
                pending.append(message(cid, step + 1, {"cut-gradient": ArrayRecord({"gradient": g.cpu()})}))
        return finals, failures


def server_main_split(cfg: DictConfig, grid: Grid, recorder, resume_from: dict | None = None) -> None:
    """The training loop of a split-learning run: sample, train each client's turn(s), evaluate, record,
    checkpoint; ``resume_from``: a loaded checkpoint."""
    from fl_sim import checkpoint
    from fl_sim.apps import (_reason, attack_executor, discover_clients, dp_history_record, initial_model,
                             privacy_ledger, sample_clients, train_config, workspace)
    from fl_sim.attacking import evaluate_label_guess, evaluate_outcome
    from strategies import make_strategy

    ws = workspace(cfg, "server")
    s = cfg.strategy
    model = initial_model(cfg, ws.data).to("cpu")
    server = SplitServer(cfg, model, ws.data, recorder)
    fedavg = make_strategy("fedavg", weighted_by_key="num-examples")
    node_of = discover_clients(grid, cfg.num_clients, cfg.round_timeout)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    executor = attack_executor(cfg) if cfg.attack.name in ("rmle", "inverse_network", "unsplit") else None
    x_test, y_test = (t.cpu() for t in ws.test_tensors())
    bottom_state = {k: v.detach().clone() for k, v in server.client_side.state_dict().items()}
    ledger = privacy_ledger(cfg, ws)
    if ledger is not None:  # say exactly what DP-SGD covers in split learning
        d = cfg.defense
        ledger.notes = [f"sample-level (ε, δ)-DP of the client-side model's weights only (DP-SGD through Opacus "
                        f"hooks, Poisson sampling, noise multiplier {ledger_sigma(cfg)}, clipping norm "
                        f"{d.max_grad_norm}): the activations (and labels) sent at the cut carry no noise and "
                        "are not covered by ε; attacks on them are measured separately"]
    client_of = {n: c for c, n in node_of.items()}

    def trained_models(rnd: int, finals: list[Message]) -> list[Message]:
        """The replies that carry a trained client-side model (DP-SGD: those within budget), ledger kept."""
        if ledger is None:
            return finals
        for m in finals:
            ledger.observe(rnd, client_of.get(m.metadata.src_node_id, -1), m.content["privacy"])
        return [m for m in finals if not bool(m.content["privacy"]["declined"])]

    first = 1
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        bottom_state = {k: v.detach().clone() for k, v in server.client_side.state_dict().items()}
        _load_optimizer(server.top_opt, ArrayRecord(resume_from["extra"]["top_optimizer"]))
        if cfg.attack.name == "fsha":
            server.attack.load_state_dict(resume_from["extra"]["fsha"])
        checkpoint.restore_rng(rng, resume_from["rng"])
        if ledger is not None:
            ledger.restore(resume_from["state"].get("ledger", {}))
            server.restore = {c: dp_history_record(e) for c, e in ledger.clients.items() if e.get("steps")}
        first = int(resume_from["round"]) + 1
        log.info("resuming after round %d", first - 1)
    recorder.started()
    for rnd in range(first, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        server.loss_sum, server.loss_count, server.stragglers = 0.0, 0, set()
        sampled = sample_clients(rng, cfg.num_clients, s.fraction_train, s.min_train_clients)
        config = train_config(cfg, rnd)
        failures: dict[int, str] = {}
        trained = 0
        if cfg.scenario.mode == "vanilla":  # one client after the other, the client-side model handed on
            for cid in sampled:
                finals, failed = server.run_turns(grid, rnd, [cid], node_of, bottom_state, config)
                failures.update(failed)
                for reply in trained_models(rnd, finals):
                    bottom_state = reply.content["arrays"].to_torch_state_dict()
                    trained += 1
        else:  # splitfed: in parallel from the same client-side model, then FedAvg
            finals, failures = server.run_turns(grid, rnd, sampled, node_of, bottom_state, config)
            finals = trained_models(rnd, finals)
            trained = len(finals)
            if finals:
                averaged, _ = fedavg.aggregate_train(rnd, finals)
                bottom_state = averaged.to_torch_state_dict()
        if ledger is not None:
            ledger.end_round(rnd)
            recorder.privacy = ledger.summary()
        if not trained and failures:
            reasons = "; ".join(f"client {c}: {_reason(r)}" for c, r in failures.items())
            raise RuntimeError(f"round {rnd}: every sampled client failed ({reasons})")
        recorder.skipped_attacks += server.skipped
        server.skipped = []
        if server.attack is not None and (server.rounds is None or rnd in server.rounds):
            attacked = ({j.client for j in server.jobs} | {o.job.client for o in server.outcomes}
                        | {g["client"] for g in server.label_guesses})
            for cid in sorted(set(failures) & set(sampled)):
                if (server.targets is None or cid in server.targets) and cid not in attacked:
                    skipped = {"round": rnd, "client": cid, "reason": "the client failed this round"}
                    log.warning("attack skipped: round %d client %d (%s)", rnd, cid, skipped["reason"])
                    recorder.skipped_attacks.append(skipped)
        t_attack = time.perf_counter()
        if server.jobs:
            server.outcomes += executor(server.attack, server.jobs)
            server.jobs = []
        for outcome in server.outcomes:
            recorder.attack(evaluate_outcome(outcome, ws.data, cfg.attack.name, recorder.run_dir))
        server.outcomes = []
        for g in server.label_guesses:
            recorder.attack(evaluate_label_guess(g, ws.data))
        server.label_guesses = []
        attack_seconds = time.perf_counter() - t_attack
        server.client_side.load_state_dict(bottom_state)
        test_loss, test_acc = evaluate(model, x_test, y_test, cfg.eval_batch_size)
        recorder.round(
            round=rnd,
            train_loss=server.loss_sum / server.loss_count if server.loss_count else None,
            test_loss=test_loss, test_accuracy=test_acc, clients=sampled, trained=trained,
            failures=len(failures), failed={str(c): _reason(r) for c, r in sorted(failures.items())},
            stragglers=len(server.stragglers), seconds=time.perf_counter() - t0,
            attack_seconds=attack_seconds)
        if failures:
            log.warning("round %d: clients %s failed", rnd, sorted(failures))
        if cfg.checkpoint:
            extra = {"top_optimizer": _save_optimizer(server.top_opt).to_torch_state_dict()}
            if cfg.attack.name == "fsha":  # the hijacker's networks are part of the run's state
                extra["fsha"] = server.attack.state_dict()
            checkpoint.save(recorder.run_dir, server_round=rnd, config=OmegaConf.to_container(cfg, resolve=True),
                            model=model.state_dict(), extra=extra,
                            rng=rng, recorder=recorder,
                            state={"ledger": ledger.state() if ledger is not None else {}})
