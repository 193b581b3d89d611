"""The run's privacy summary: what the clients' DP accountants report, gathered on the server side.

Each DP-SGD client composes its own history (``fl_sim.apps.DPBudget``) and reports ε with its reply;
the ledger keeps the latest ε of every client, the worst client's ε after each round, and the clients
that stopped because their next round would exceed ``max_epsilon``. ``summary()`` is ``summary.json``'s
``privacy``. ε is ``null`` in JSON when it is infinite (no noise).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("fl_sim")


def _finite(eps: float) -> float | None:
    return eps if math.isfinite(eps) else None


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
