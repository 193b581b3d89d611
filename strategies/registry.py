"""Flower's own server strategies by config name: ``make_strategy("fedavg", ...)``.

The simulator samples clients itself (seeded) and hands each strategy only the sampled nodes,
so every strategy is built to train on all nodes it is given and to skip federated evaluation
(the global model is evaluated centrally).
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from strategies import aggregation

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum")


def make_strategy(
    name: str,
    *,
    proximal_mu: float = 0.0,
    eta: float = 0.1,
    eta_l: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
    trim_beta: float = 0.2,
    num_malicious_clients: int = 0,
    weighted_by_key: str = "num-examples",
) -> Strategy:
    """Build the Flower strategy ``name`` that trains on every node it is handed.

    Examples
    --------
    >>> make_strategy("fedprox", proximal_mu=0.01).proximal_mu
    0.01
    """
    aggregation.install()  # Flower's weighted mean, reading the replies' arrays in place (same result)
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                  min_evaluate_nodes=0, min_available_nodes=0, weighted_by_key=weighted_by_key)
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)
    if name == "fedyogi":
        return FedYogi(**common, eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=server_learning_rate, server_momentum=server_momentum)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=num_malicious_clients)
    raise ValueError(f"strategy={name} is not known; choose one of {', '.join(STRATEGIES)}")


def with_central_dp(
    strategy: Strategy,
    *,
    side: str,
    clipping: str,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
) -> Strategy:
    """Wrap ``strategy`` in Flower's user-level DP wrapper (McMahan et al. 2018; adaptive clipping:
    Andrew et al. 2021). ``side="client"`` needs the matching Flower client mod
    (``fixedclipping_mod`` / ``adaptiveclipping_mod``) on the clients."""
    from flwr.serverapp.strategy import (  # only central DP needs them
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    if clipping == "fixed":
        cls = DifferentialPrivacyServerSideFixedClipping if side == "server" else DifferentialPrivacyClientSideFixedClipping
        return cls(strategy, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                   num_sampled_clients=num_sampled_clients)
    cls = DifferentialPrivacyServerSideAdaptiveClipping if side == "server" else DifferentialPrivacyClientSideAdaptiveClipping
    return cls(strategy, noise_multiplier=noise_multiplier, num_sampled_clients=num_sampled_clients,
               initial_clipping_norm=clipping_norm)
