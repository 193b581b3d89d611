"""The adversarial server: a wrapper around any Flower strategy (as Flower's
``DifferentialPrivacyServerSideFixedClipping`` wraps one).

Each round it remembers what it sent (global model, train config), and when the replies come back it
builds, for each targeted client, exactly what an honest-but-curious server observes — that client's
returned model next to the model sent — plus what the server knows (hyper-parameters it sent, the
number of examples the client reported), hands them to the attack, then lets the inner strategy
aggregate the same replies unchanged. It never sees client data: scoring happens in fl_sim.

    >>> adv = AdversarialStrategy(FedAvg(), attack=make_attack("inverting_gradients"),
    ...                           knowledge=knowledge_fn, client_of=client_of, targets={0})
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from attacks.base import Knowledge, Observation, Reconstruction


@dataclass
class AttackJob:
    """One attack to run: what was observed, about whom, and what the server knows."""

    server_round: int
    client: int | list[int]  # the target (a list: the clients behind an aggregate)
    observed: str  # client_update | aggregate | activations
    observation: Any  # Observation, or attacks.rmle.ActivationObservation
    knowledge: Knowledge
    batch: list[int] | None = None  # for the evaluator: positions of the observed examples in the client's data


@dataclass
class UpdateObservation:
    """A client update as the server holds it: the arrays it sent and the reply's arrays, turned into an
    ``Observation`` (tensors) only when the attack runs. A round with many targets thus keeps one copy of
    each update, the reply's own, and ships compact arrays to the attack workers."""

    sent: ArrayRecord
    received: ArrayRecord

    def load(self) -> Observation:
        return Observation(self.sent.to_torch_state_dict(), self.received.to_torch_state_dict(), kind="client_update")


def observation_of(job: "AttackJob") -> Any:
    """The job's observation, loaded (``UpdateObservation``) or as given."""
    obs = job.observation
    return obs.load() if isinstance(obs, UpdateObservation) else obs


@dataclass
class AttackOutcome:
    job: AttackJob
    reconstruction: Reconstruction | None
    seconds: float
    error: str | None = None
    extra: dict = field(default_factory=dict)


def run_jobs_sequentially(attack, jobs: list[AttackJob],
                          progress: Callable[[AttackJob, int, float], None] | None = None) -> list[AttackOutcome]:
    """The default executor: one attack after the other in this process; ``progress(job, iteration, loss)``."""
    out = []
    for job in jobs:
        report = None if progress is None else (lambda it, loss, _job=job: progress(_job, it, loss))
        t = time.perf_counter()
        try:
            rec = attack.reconstruct(observation_of(job), job.knowledge, progress=report)
            out.append(AttackOutcome(job, rec, time.perf_counter() - t))
        except Exception as e:  # noqa: BLE001 - one failed attack must not end the run
            out.append(AttackOutcome(job, None, time.perf_counter() - t, error=f"{type(e).__name__}: {e}"))
    return out


class AdversarialStrategy(Strategy):
    """Honest-but-curious server around ``inner``: observe, attack, delegate.

    Parameters
    ----------
    inner : Strategy
        Any Flower strategy; its sampling and aggregation are used unchanged.
    attack : object with ``reconstruct(observation, knowledge)``
        The attack (``attacks.make_attack(...)``).
    knowledge : callable (server_round, arrays sent, config sent, reply) -> Knowledge
        What the server knows about a reply's client (architecture, hyper-parameters, reported size).
    client_of : callable (Message) -> int
        The client id behind a reply.
    targets : set of int or None
        Clients to attack (None: every client that replies).
    rounds : set of int or None
        Rounds to attack in (None: every round).
    executor : callable (attack, jobs) -> outcomes
        How to run the round's attacks (default: sequentially here; fl_sim runs them as Ray tasks).
    tamper : callable (state dict) -> state dict, or None
        A malicious server's change to the model it sends a target in an attacked round (e.g. an imprint
        block in front); the other clients get the model unchanged. The attack observes the target's
        reply next to the tampered model.
    untamper : callable (state dict) -> state dict, or None
        What the server keeps of a target's reply to a tampered model before the inner strategy
        aggregates it (the model's own arrays).
    recipient_of : callable (Message) -> int
        The client a message goes to (needed with ``tamper``).
    """

    def __init__(self, inner: Strategy, attack: Any, knowledge: Callable[..., Knowledge],
                 client_of: Callable[[Message], int], targets: set[int] | None = None,
                 rounds: set[int] | None = None,
                 executor: Callable[[Any, list[AttackJob]], list[AttackOutcome]] = run_jobs_sequentially,
                 tamper: Callable[[dict], dict] | None = None, untamper: Callable[[dict], dict] | None = None,
                 recipient_of: Callable[[Message], int] | None = None) -> None:
        if tamper is not None and (untamper is None or recipient_of is None):
            raise ValueError("tamper needs untamper and recipient_of")
        self.inner = inner
        self.attack = attack
        self.knowledge = knowledge
        self.client_of = client_of
        self.targets = targets
        self.rounds = rounds
        self.executor = executor
        self.tamper, self.untamper, self.recipient_of = tamper, untamper, recipient_of
        self._sent: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}
        self._tampered: dict[int, dict[int, ArrayRecord]] = {}  # round -> client -> the model it was sent
        self._failed: dict[int, set[int]] = {}
        self.outcomes: list[AttackOutcome] = []
        self.skipped: list[dict] = []

    def __repr__(self) -> str:
        return (f"AdversarialStrategy(inner={type(self.inner).__name__}, attack={getattr(self.attack, 'name', self.attack)},"
                f" targets={sorted(self.targets) if self.targets is not None else 'all'})")

    def summary(self) -> None:
        self.inner.summary()

    # --- what the server sends: remembered, then delegated
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if messages:
            first = messages[0].content
            self._sent[server_round] = (first["arrays"], first["config"])
        if self.tamper is not None and self._attacks_in(server_round):
            tampered = None
            for i, m in enumerate(messages):
                cid = self.recipient_of(m)
                if self.targets is not None and cid not in self.targets:
                    continue
                if tampered is None:
                    tampered = ArrayRecord(self.tamper(m.content["arrays"].to_torch_state_dict()))
                # Flower's messages share one content: the target's gets its own
                content = RecordDict({**dict(m.content.items()), "arrays": tampered})
                messages[i] = Message(content=content, dst_node_id=m.metadata.dst_node_id,
                                      message_type=m.metadata.message_type)
                self._tampered.setdefault(server_round, {})[cid] = tampered
        return messages

    def _attacks_in(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    # --- what the server receives: observed, attacked, delegated
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._attacks_in(server_round):
            jobs = self.observe(server_round, replies)
            if jobs:
                self.outcomes += self.executor(self.attack, jobs)
        tampered = self._tampered.pop(server_round, {})
        for m in replies:  # the inner strategy aggregates the model's own arrays of a tampered reply
            if not m.has_error() and self.client_of(m) in tampered:
                m.content["arrays"] = ArrayRecord(self.untamper(m.content["arrays"].to_torch_state_dict()))
        self._sent.pop(server_round, None)
        self._failed.pop(server_round, None)
        return self.inner.aggregate_train(server_round, replies)

    def note_failures(self, server_round: int, clients: Iterable[int]) -> None:
        """Clients whose training failed this round (a runner that filters error replies tells us here)."""
        self._failed.setdefault(server_round, set()).update(clients)

    def observe(self, server_round: int, replies: list[Message]) -> list[AttackJob]:
        sent_arrays, sent_config = self._sent[server_round]
        tampered = self._tampered.get(server_round, {})
        ok = {self.client_of(m): m for m in replies if not m.has_error()}
        failed = {self.client_of(m) for m in replies if m.has_error()} | self._failed.get(server_round, set())
        wanted = set(ok) | failed if self.targets is None else set(self.targets)
        jobs = []
        for cid in sorted(wanted):
            if cid in failed:
                self.skipped.append({"round": server_round, "client": cid, "reason": "the client failed this round"})
                continue
            if cid not in ok:
                continue  # not sampled this round
            reply = ok[cid]
            sent = tampered.get(cid, sent_arrays)
            obs = UpdateObservation(sent, reply.content["arrays"])  # loaded where and when the attack runs
            jobs.append(AttackJob(server_round, cid, "client_update", obs,
                                  self.knowledge(server_round, sent, sent_config, reply)))
        return jobs

    # --- evaluation: unchanged
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def take_outcomes(self) -> list[AttackOutcome]:
        out, self.outcomes = self.outcomes, []
        return out
