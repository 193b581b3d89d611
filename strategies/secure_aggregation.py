"""The server side of secure aggregation: Flower's SecAgg+ protocol (Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Complexity", CCS 2020) through its legacy workflow.

``SecAggPlusWorkflow`` runs on Flower's legacy ``Strategy`` API. ``ObservedFedAvg`` is Flower's legacy
FedAvg with two changes: it samples the clients the simulator chose (seeded), and it shows an observer
exactly what the server holds after the protocol — the unmasked *aggregate* (every ``FitRes`` it gets
carries the same weighted mean) — before aggregating as usual. That is what an adversarial server
attacks under secure aggregation (``observed: "aggregate"``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg

# (round, node ids aggregated, weights sent, aggregate received, their FitRes) -> None
Observer = Callable[[int, list[int], list[np.ndarray], list[np.ndarray], list[FitRes]], None]


class ObservedFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg for the SecAgg+ workflow, seeded sampling, aggregate observed.

    Parameters
    ----------
    initial : list of ndarray
        The initial global model (state-dict order).
    sample : callable (round) -> node ids
        The nodes to train this round.
    fit_config : callable (round) -> dict
        The train config sent to the clients.
    observe : callable
        Called with what the server holds after secure aggregation (see ``Observer``).
    evaluate_fn : callable
        Flower's central evaluation hook ``(round, ndarrays, config) -> (loss, metrics) | None``.
    rewrite : callable or None
        A malicious server's change to the model before sending it (e.g. restoring an imprint block).
    """

    def __init__(self, *, initial: list[np.ndarray], sample: Callable[[int], list[int]],
                 fit_config: Callable[[int], dict], observe: Observer, evaluate_fn,
                 rewrite: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=0,
                         min_available_clients=1, initial_parameters=ndarrays_to_parameters(initial),
                         evaluate_fn=evaluate_fn, accept_failures=True)
        self.sample, self.fit_config, self.observe, self.rewrite = sample, fit_config, observe, rewrite
        self._sent: dict[int, list[np.ndarray]] = {}

    def __repr__(self) -> str:
        return "ObservedFedAvg(legacy FedAvg under SecAgg+, aggregate observed)"

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        proxies = {p.node_id: p for p in client_manager.all().values()}
        nodes = [n for n in self.sample(server_round) if n in proxies]
        if self.rewrite is not None:
            parameters = ndarrays_to_parameters(self.rewrite(parameters_to_ndarrays(parameters)))
        self._sent[server_round] = parameters_to_ndarrays(parameters)
        fit_ins = FitIns(parameters, self.fit_config(server_round))
        return [(proxies[n], fit_ins) for n in nodes]

    def aggregate_fit(self, server_round, results, failures):
        sent = self._sent.pop(server_round, None)
        if results and sent is not None:
            aggregate = parameters_to_ndarrays(results[0][1].parameters)
            self.observe(server_round, [proxy.node_id for proxy, _ in results], sent, aggregate,
                         [res for _, res in results])
        return super().aggregate_fit(server_round, results, failures)
