"""Privacy budgets, on both sides of a run.

- The client's budget (``DPBudget``): a DP-SGD (or local DP) client composes its own accountant
  history, kept in its Flower ``context.state`` across rounds, refuses a round that would take it
  past ``max_epsilon``, and reports ε with its reply. After a resume the server hands each client
  its history back (``restore_dp``).
- The server's ledger (``PrivacyLedger``): the latest ε of every client, the worst client's ε after
  each round, and the clients that stopped. ``summary()`` is ``summary.json``'s ``privacy``; ε is
  ``null`` in JSON when it is infinite (no noise). ``privacy_ledger(cfg, data)`` makes the run's.
- Central DP (``CentralDP``): user-level DP of the released global models, composed over rounds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message
from omegaconf import DictConfig

from defenses.accounting import calibrate_noise, epsilon, local_dp_noise_multiplier, sampled_user_level_epsilon
from defenses.dpsgd import make_dp_compatible, resolve_grad_sample_mode, sample_rate, steps_per_epoch
from fl_sim.data import FederatedData
from fl_sim.sampling import num_sampled
from fl_sim.workspace import architecture

log = logging.getLogger("fl_sim")


def _finite(eps: float) -> float | None:
    return eps if math.isfinite(eps) else None


# --------------------------------------------------------------------------- the client's budget

def dp_mechanism(cfg: DictConfig) -> str | None:
    """The mechanism whose budget a client keeps: "dpsgd", "local_dp", or None."""
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


# --------------------------------------------------------------------------- the server's ledger

class PrivacyLedger:
    def __init__(self, *, mechanism: str, accountant: str, delta: float, max_epsilon: float | None,
                 model_changes: list[str] | None = None, notes: list[str] | None = None):
        self.mechanism, self.accountant, self.delta, self.max_epsilon = mechanism, accountant, delta, max_epsilon
        self.model_changes = list(model_changes or [])
        self.notes = list(notes or [])
        self.clients: dict[int, dict] = {}
        self.per_round: list[dict] = []
        self.stopped: list[dict] = []

    def observe(self, server_round: int, client: int, record) -> None:
        """One client's reply record (``epsilon`` < 0 means infinite)."""
        eps = float(record["epsilon"])
        eps = math.inf if eps < 0 else eps
        if bool(record["declined"]):
            if all(s["client"] != client for s in self.stopped):
                self.stopped.append({"client": client, "round": server_round, "epsilon": _finite(eps)})
                log.info("client %d stops training at round %d: its next round would take ε above max_epsilon "
                         "%.3g (ε so far %.3g)", client, server_round, self.max_epsilon or math.nan, eps)
            return
        self.clients[client] = {"epsilon": eps, "rounds": [int(r) for r in record["rounds"] if int(r) > 0],
                                "noise_multiplier": float(record["noise-multiplier"]),
                                "sample_rate": float(record["sample-rate"]),
                                "steps": [int(v) for v in record["steps"] if int(v) > 0] if "steps" in record else []}

    def state(self) -> dict:
        """For the checkpoint (JSON: ε may be Infinity)."""
        return {"clients": {str(c): v for c, v in self.clients.items()}, "per_round": self.per_round,
                "stopped": self.stopped}

    def restore(self, state: dict) -> None:
        self.clients = {int(c): v for c, v in state.get("clients", {}).items()}
        self.per_round = list(state.get("per_round", []))
        self.stopped = list(state.get("stopped", []))

    def end_round(self, server_round: int) -> None:
        worst = max((c["epsilon"] for c in self.clients.values()), default=None)
        self.per_round.append({"round": server_round, "epsilon": None if worst is None else _finite(worst),
                               "infinite": worst is not None and not math.isfinite(worst)})

    def summary(self) -> dict:
        worst = max((c["epsilon"] for c in self.clients.values()), default=None)
        return {
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": None if worst is None else _finite(worst),  # the worst client's
            "infinite": worst is not None and not math.isfinite(worst),
            "clients": {str(c): {**v, "epsilon": _finite(v["epsilon"])} for c, v in sorted(self.clients.items())},
            "max_epsilon": self.max_epsilon,
            "epsilon_per_round": self.per_round,
            "stopped": self.stopped,
            "model_changes": self.model_changes,
            "notes": self.notes,
        }


def privacy_ledger(cfg: DictConfig, data: FederatedData) -> PrivacyLedger | None:
    """The run's ledger for the client-side mechanism (DP-SGD or local DP), with notes that say what
    its ε covers; None without one."""
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
    base = architecture(cfg, data)
    if cfg.scenario.name == "split":  # say exactly what DP-SGD covers in split learning
        sigma = f"calibrated to target ε {d.target_epsilon}" if d.target_epsilon is not None else f"{d.noise_multiplier:g}"
        notes = [f"sample-level (ε, δ)-DP of the client-side model's weights only (DP-SGD through Opacus "
                 f"hooks, Poisson sampling, noise multiplier {sigma}, clipping norm "
                 f"{d.max_grad_norm}): the activations (and labels) sent at the cut carry no noise and "
                 "are not covered by ε; attacks on them are measured separately"]
    else:
        notes = ["sample-level (ε, δ)-DP of each client's examples, composed over every round the client trained in; "
                 f"Poisson sampling, noise multiplier {'calibrated to target ε ' + str(d.target_epsilon) + ' over ' + str(cfg.num_rounds) + ' rounds' if d.target_epsilon is not None else d.noise_multiplier}, "
                 f"clipping norm {d.max_grad_norm}, Opacus grad_sample_mode "
                 f"{resolve_grad_sample_mode(str(d.grad_sample_mode), cfg.model.name)}"]
    return PrivacyLedger(mechanism="dpsgd", accountant=str(d.accountant), delta=float(d.delta),
                         max_epsilon=None if d.max_epsilon is None else float(d.max_epsilon),
                         model_changes=make_dp_compatible(base)[1], notes=notes)


# --------------------------------------------------------------------------- central DP

class CentralDP:
    """User-level DP of the released global models (Flower's DP wrappers add the noise). Each round
    with updates is one Gaussian mechanism on the clipped sum of the aggregated updates, composed over
    the rounds with RDP. Two bounds are reported. ``epsilon``: add/remove-one neighbours, no
    amplification by client sampling (as Flower's accountant's "no-amplification"), an upper bound
    that holds whoever knows which clients were sampled. ``epsilon_sampled`` (when fewer than all
    clients are sampled a round): the amplification by drawing them uniformly without replacement,
    under the replace-one relation that fixed-size sampling is analysed in; it holds for whoever sees
    only the released models, not for the server that drew the sample.

    Flower's noise is calibrated to the number of *sampled* clients (std z·C/m on the mean) while the
    mean is over the replies actually aggregated (r ≤ m: failures, rejected or out-of-budget updates),
    so a round with r replies has noise multiplier z·r/m on their sum; ε is accounted with that.
    Adaptive clipping also spends budget on the clipped-count estimate (Andrew et al. 2021): its ε is
    not accounted here and reported as such."""

    def __init__(self, cfg: DictConfig):
        d, st = cfg.defense, cfg.strategy
        self.z, self.delta = float(d.central_noise_multiplier), float(d.delta)
        self.adaptive = d.central_clipping == "adaptive"
        self.side, self.clipping_norm = str(d.central_side), float(d.clipping_norm)
        self.population = int(cfg.num_clients)
        self.num_sampled = num_sampled(cfg.num_clients, st.fraction_train, st.min_train_clients)
        self.rounds: list[int] = []
        self.per_round: list[dict] = []

    @property
    def amplified(self) -> bool:
        return not self.adaptive and self.num_sampled < self.population

    def released(self, server_round: int, aggregated: int) -> None:
        """Round ``server_round`` released a model averaged over ``aggregated`` clipped updates."""
        self.rounds.append(server_round)
        z = self.z * min(aggregated, self.num_sampled) / self.num_sampled
        zs = [r.get("noise_multiplier", self.z) for r in self.per_round] + [z]
        counts = {zi: zs.count(zi) for zi in set(zs)}  # one accountant entry per distinct noise level
        eps = None if self.adaptive else epsilon([(zi, 1.0, n) for zi, n in counts.items()], self.delta, "rdp")
        entry = {"round": server_round, "aggregated": aggregated, "noise_multiplier": z,
                 "epsilon": _finite(eps) if eps is not None else None,
                 "infinite": eps is not None and not math.isfinite(eps)}
        if self.amplified:
            entry["epsilon_sampled"] = _finite(sampled_user_level_epsilon(zs, self.population, self.num_sampled,
                                                                          self.delta))
            # the same replace-one relation without amplification: what the sampling gains
            entry["epsilon_without_sampling"] = _finite(sampled_user_level_epsilon(zs, self.population,
                                                                                   self.population, self.delta))
        self.per_round.append(entry)

    def summary(self) -> dict:
        last = self.per_round[-1] if self.per_round else {"epsilon": None, "infinite": False}
        short = [r for r in self.per_round if r.get("aggregated", self.num_sampled) < self.num_sampled]
        return {
            "mechanism": "central_dp", "accountant": None if self.adaptive else "rdp", "delta": self.delta,
            "epsilon": last["epsilon"], "infinite": last["infinite"], "clients": {}, "max_epsilon": None,
            "epsilon_sampled": last.get("epsilon_sampled") if self.amplified else None,
            "sampling": {"population": self.population, "sample_size": self.num_sampled,
                         "method": "uniform without replacement", "relation": "replace-one",
                         "epsilon_without_sampling": last.get("epsilon_without_sampling")}
            if self.amplified else None,
            "epsilon_per_round": self.per_round, "stopped": [], "model_changes": [],
            "notes": [f"user-level DP of each client's whole update, {self.side}-side "
                      f"{'adaptive' if self.adaptive else 'fixed'} clipping (norm {self.clipping_norm:g}"
                      f"{' initially' if self.adaptive else ''}), noise multiplier {self.z:g} on the clipped sum of "
                      f"{self.num_sampled} sampled clients (Flower's DP wrapper); ε composes the released rounds "
                      "(add/remove-one neighbours) with no amplification by sampling (an upper bound)"
                      + ("; ε not accounted: adaptive clipping's count noise is not modelled here"
                         if self.adaptive else "")]
            + ([f"ε_sampled: amplified by drawing {self.num_sampled} of {self.population} clients uniformly without "
                "replacement each round (RDP, replace-one neighbours, noise multiplier z/2 against the sum's "
                "replace-one sensitivity 2C; Wang, Balle & Kasiviswanathan 2019, through dp-accounting); it holds "
                "against whoever sees only the released models, not the server that knows the sample. Replace-one "
                "neighbours differ by a removal and an addition, so compare it with ε_without_sampling of the same "
                "relation, not with the add/remove ε: at high sampling rates it can exceed the add/remove bound"]
               if self.amplified else [])
            + ([f"{len(short)} round(s) aggregated fewer updates than were sampled (failed, rejected, out of budget): "
                "Flower's noise is calibrated to the sampled count, so those rounds are accounted with the lower "
                "noise multiplier z·aggregated/sampled"] if short else []),
        }
