"""The server side: Flower's ServerApp and the federated training loop. Each round: sample the
clients (seeded), send them the global model through the run's Flower strategy, screen the replies
(failures, DP budgets, NaN/Inf), let the adversarial server attack what it observed, aggregate,
evaluate centrally, record, checkpoint. ``server_main`` hands a SecAgg+ run to ``fl_sim.secagg``
and a split-learning run to ``fl_sim.split.server``.

``make_server_app(cfg, recorder)`` builds the app for ``fl_sim.runner``; ``fl_sim.flwr_app`` runs
``server_main`` under ``flwr run``."""

from __future__ import annotations

import gc

import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fl_sim import checkpoint, dispatch
from fl_sim.attacking import adversarial_server
from fl_sim.cohorts import CohortGrid, clients_per_node, num_nodes
from fl_sim.evaluator import evaluate_outcome
from fl_sim.faults import failure_reason
from fl_sim.inversion import attack_final_model, is_model_inversion, participant_attack
from fl_sim.malicious import INJECTED_KEY, malicious_rewrite
from fl_sim.privacy import RESTORE_KEY, CentralDP, dp_history_record, privacy_ledger
from fl_sim.protocol import SampledGrid, discover_clients, train_config
from fl_sim.sampling import sample_clients
from fl_sim.secagg import server_main_secagg
from fl_sim.split.server import server_main_split
from fl_sim.training import evaluate
from fl_sim.validation import UPDATE_ATTACKS
from fl_sim.workspace import Workspace, initial_model, workspace
from strategies import make_strategy
from strategies.adversarial import AdversarialStrategy
from strategies.guard import RejectNonFinite
from strategies.registry import with_central_dp

log = logging.getLogger("fl_sim")
PULL_INTERVAL = 0.01  # seconds between the server's looks for replies in the simulation (Flower's default: 0.1)


def make_server_app(cfg: dict | DictConfig, recorder, resume_from: dict | None = None) -> ServerApp:
    conf = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(conf, grid, recorder, context, resume_from)

    return app


def server_main(cfg: DictConfig, grid: Grid, recorder, context: Context | None = None,
                resume_from: dict | None = None) -> None:
    """One run's server loop, by scenario and defense, then model inversion of the final global model when
    configured; ``resume_from``: a loaded checkpoint to continue from."""
    if isinstance(getattr(grid, "pull_interval", None), float):
        # The simulation's in-memory Grid looks for replies every 0.1 s by default: up to 0.1 s idle per round
        # (and per SecAgg+ stage), a third of a 100-client round on 2 cores. Looking costs a lock and a scan.
        grid.pull_interval = PULL_INTERVAL
        dispatch.wake_on_push(grid)  # and the engine hands the pushed messages to the actors at once
        # The driver holds Ray's, Flower's and torch's objects by the million: a full collection of the
        # garbage collector's oldest generation took 0.24-0.27 s mid-run, a slow round in every ~10 at 100
        # clients. Everything alive now is left out of those collections (they then took 5-13 ms);
        # fl_sim.runner puts it back when the simulation ends.
        gc.freeze()
    if cfg.scenario.name == "split":
        return server_main_split(cfg, grid, recorder, resume_from)
    if cfg.defense.secagg:
        spy = participant_attack(cfg, workspace(cfg, "server"), recorder)  # attack.on=client
        final = server_main_secagg(cfg, grid, context, recorder, resume_from, participant=spy)
        if spy is not None:
            spy.finish()
    else:
        final = server_main_federated(cfg, grid, recorder, resume_from)
    if cfg.save_model:  # the model as deployed: what a model-inversion attacker would hold
        torch.save({k: v.detach().cpu() for k, v in final.items()}, recorder.run_dir / "final_model.pt")
    if is_model_inversion(cfg) and cfg.attack.on == "final":
        attack_final_model(cfg, workspace(cfg, "server"), final, recorder)


def with_injection(m: Message, inputs: torch.Tensor, labels: torch.Tensor) -> Message:
    """The attacker's train message with the samples it trains on besides its own data (``attack=hitaj``):
    the participant's own doing, which the simulation carries in its message; Flower's messages share one
    content, so it is copied."""
    content = RecordDict({**dict(m.content.items()), INJECTED_KEY: ArrayRecord({"inputs": inputs, "labels": labels})})
    return Message(content=content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)


def score_attacks(strategy: AdversarialStrategy, cfg: DictConfig, ws: Workspace, recorder) -> None:
    """The evaluator's turn: score the round's reconstructions against the truth, note skipped targets."""
    drawn: dict[int, int] = {}  # pictures per round so far: at most attack.pictures (every attack is scored)
    by_target = lambda o: (o.job.server_round, o.job.client if isinstance(o.job.client, int) else -1)  # noqa: E731
    for outcome in sorted(strategy.take_outcomes(), key=by_target):
        rnd = outcome.job.server_round
        draw = drawn.get(rnd, 0) < int(cfg.attack.pictures)
        drawn[rnd] = drawn.get(rnd, 0) + draw
        recorder.attack(evaluate_outcome(outcome, ws.data, cfg.attack.name, recorder.run_dir if draw else None))
    for skipped in strategy.skipped:
        log.warning("attack skipped: round %d client %d (%s)", skipped["round"], skipped["client"], skipped["reason"])
    recorder.skipped_attacks += strategy.skipped
    strategy.skipped = []


def server_main_federated(cfg: DictConfig, grid: Grid, recorder,
                          resume_from: dict | None = None) -> dict[str, torch.Tensor]:
    """The training loop of a federated run: sample, send, aggregate (Flower strategy), evaluate, record,
    checkpoint; ``resume_from``: a loaded checkpoint to continue from. Returns the final global model."""
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
    if clients_per_node(cfg) > 1:  # cohorts: the loop speaks to virtual nodes, one per client
        grid = CohortGrid(grid, discover_clients(grid, cfg, num_nodes(cfg)), cfg)
        node_of = grid.node_of()
    else:
        node_of = discover_clients(grid, cfg)
    client_of = {n: c for c, n in node_of.items()}
    # NaN/Inf in an update is rejected and reported, never averaged (nor clipped by a DP wrapper)
    guard = strategy = RejectNonFinite(strategy, client_of=lambda m: client_of.get(m.metadata.src_node_id, -1))
    if cfg.attack.name in UPDATE_ATTACKS:  # the adversarial server inverts what clients send
        strategy = adversarial_server(cfg, strategy, ws, client_of)
    ledger = privacy_ledger(cfg, ws.data)
    spy = participant_attack(cfg, ws, recorder)  # attack.on=client: a participant inverts what it receives
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in initial_model(cfg, ws.data).state_dict().items()})
    rewrite = malicious_rewrite(cfg, arrays.to_torch_state_dict())
    x_test, y_test = ws.test_tensors()
    first = 1
    if resume_from is not None:  # continue an interrupted run from its last checkpoint
        arrays = ArrayRecord(resume_from["model"])
        checkpoint.restore_strategy(strategy, resume_from["strategy"])
        checkpoint.restore_rng(rng, resume_from["rng"])
        state = resume_from["state"]
        if ledger is not None:
            ledger.restore(state.get("ledger", {}))
        if central is not None:
            central.rounds, central.per_round = list(state["central"]["rounds"]), list(state["central"]["per_round"])
        if spy is not None:
            spy.restore(resume_from["extra"].get("participant", {}))
        first = int(resume_from["round"]) + 1
        log.info("resuming after round %d", first - 1)
    recorder.started()
    for rnd in range(first, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(rng, cfg.num_clients, s.fraction_train, s.min_train_clients)
        view = SampledGrid(grid, [node_of[c] for c in sampled])
        messages = list(strategy.configure_train(rnd, arrays, train_config(cfg, rnd), view))
        participant_seconds = 0.0
        if spy is not None and spy.wants(rnd, sampled):  # the participant attacks the model it is sent
            t_spy = time.perf_counter()
            spy.attack(rnd, arrays.to_torch_state_dict())
            participant_seconds = time.perf_counter() - t_spy
            extra = spy.injection()  # an active one (attack=hitaj) trains on its generated samples too
            if extra is not None:
                messages = [with_injection(m, *extra) if m.metadata.dst_node_id == node_of[spy.client] else m
                            for m in messages]
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
        recorder.ran_on("clients", *(str(m.content["client"].get("device", "?")) for m in ok))
        if not ok:
            reasons = "; ".join(f"client {c}: {failure_reason(r)}" for c, r in list(failures.items())[:3])
            more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
            raise RuntimeError(f"round {rnd}: every sampled client failed ({reasons}{more})")
        recorder.client_losses(rnd, {client_of.get(m.metadata.src_node_id, -1): float(m.content["metrics"]["train_loss"])
                                     for m in ok if "train_loss" in m.content["metrics"]}, ws.data.num_classes)
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
            central.released(rnd, len(ok))
            recorder.privacy = central.summary() if ledger is None else {**recorder.privacy, "central": central.summary()}
        attack_seconds = participant_seconds  # part of the round's seconds, as the server's attacks are
        if isinstance(strategy, AdversarialStrategy):
            attack_seconds += time.perf_counter() - t_agg
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
            failed={str(c): failure_reason(r) for c, r in sorted(failures.items())},
            rejected=rejected,
            stragglers=stragglers,
            seconds=time.perf_counter() - t0,
            attack_seconds=attack_seconds,
        )
        if cfg.checkpoint:
            checkpoint.save(recorder.run_dir, server_round=rnd, config=OmegaConf.to_container(cfg, resolve=True),
                            model=arrays.to_torch_state_dict(), strategy=strategy, rng=rng, recorder=recorder,
                            extra={"participant": spy.state()} if spy is not None else None,
                            state={"ledger": ledger.state() if ledger is not None else {},
                                   "central": {"rounds": central.rounds, "per_round": central.per_round}
                                   if central is not None else {}})
    if spy is not None:
        spy.finish()
    return arrays.to_torch_state_dict()
