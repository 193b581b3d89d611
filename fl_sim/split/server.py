"""The split-learning server: its side of the model and its optimiser (``SplitServer``), the attacks
on what it observes (activations, cut gradients; FSHA's hijacking gradient when malicious), and the
training loop of a split run (``server_main_split``): sample, run each client's turn(s), average the
client-side models (splitfed), score the attacks, evaluate, record, checkpoint."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from attacks.base import Knowledge, Reconstruction
from attacks.label_leakage import direction_scoring, norm_scoring
from attacks.rmle import ActivationObservation
from fl_sim import checkpoint
from fl_sim.attacking import attack_executor, attack_from_config
from fl_sim.evaluator import evaluate_label_guess, evaluate_outcome
from fl_sim.faults import failure_reason
from fl_sim.privacy import RESTORE_KEY, dp_history_record, privacy_ledger
from fl_sim.protocol import discover_clients, train_config
from fl_sim.sampling import sample_clients
from fl_sim.split.cut import batch_plan, load_optimizer, part, save_optimizer, split
from fl_sim.training import evaluate, make_optimizer
from fl_sim.workspace import initial_model, workspace
from strategies import make_strategy
from strategies.adversarial import AttackJob, AttackOutcome
from strategies.guard import non_finite_reason

log = logging.getLogger("fl_sim")


class SplitServer:
    """The server side of one run: the top model and its optimiser, and, when attacking, the attack."""

    def __init__(self, cfg: DictConfig, model: nn.Module, data, recorder):
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
        c = self.cfg.client
        model = copy.deepcopy(self.bottom)
        model.load_state_dict(part(sent_bottom, "bottom"))  # the client-side weights the server sent this turn
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
                self.recorder.ran_on("clients", str(reply.content["client"].get("device", "?")))
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
    ws = workspace(cfg, "server")
    s = cfg.strategy
    model = initial_model(cfg, ws.data).to("cpu")
    server = SplitServer(cfg, model, ws.data, recorder)
    fedavg = make_strategy("fedavg", weighted_by_key="num-examples")
    node_of = discover_clients(grid, cfg)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    executor = attack_executor(cfg) if cfg.attack.name in ("rmle", "inverse_network", "unsplit") else None
    x_test, y_test = (t.cpu() for t in ws.test_tensors())
    bottom_state = {k: v.detach().clone() for k, v in server.client_side.state_dict().items()}
    ledger = privacy_ledger(cfg, ws.data)  # its note says what DP-SGD covers in split learning
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
        load_optimizer(server.top_opt, ArrayRecord(resume_from["extra"]["top_optimizer"]))
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
            reasons = "; ".join(f"client {c}: {failure_reason(r)}" for c, r in failures.items())
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
            failures=len(failures), failed={str(c): failure_reason(r) for c, r in sorted(failures.items())},
            stragglers=len(server.stragglers), seconds=time.perf_counter() - t0,
            attack_seconds=attack_seconds)
        if failures:
            log.warning("round %d: clients %s failed", rnd, sorted(failures))
        if cfg.checkpoint:
            extra = {"top_optimizer": save_optimizer(server.top_opt).to_torch_state_dict()}
            if cfg.attack.name == "fsha":  # the hijacker's networks are part of the run's state
                extra["fsha"] = server.attack.state_dict()
            checkpoint.save(recorder.run_dir, server_round=rnd, config=OmegaConf.to_container(cfg, resolve=True),
                            model=model.state_dict(), extra=extra,
                            rng=rng, recorder=recorder,
                            state={"ledger": ledger.state() if ledger is not None else {}})
