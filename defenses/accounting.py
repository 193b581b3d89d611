"""Privacy accounting for DP-SGD across rounds, through Opacus' accountants.

A client trains with DP-SGD in several rounds; each round is ``steps`` noisy steps at Poisson
sample rate ``q`` and noise multiplier ``sigma``. Its guarantee composes over *all* of them, so the
client keeps one history ``[(sigma, q, steps), ...]`` for the whole run — the format of Opacus'
``IAccountant.history`` — and ε is computed from that history, never from one round alone (a
fresh ``PrivacyEngine`` per round, as in Flower's own Opacus example, reports the ε of one round).

>>> history = [(1.0, 0.01, 100)] * 5           # five rounds of 100 steps
>>> round(epsilon(history, delta=1e-5, accountant="rdp"), 3) > round(epsilon(history[:1], 1e-5), 3)
True
"""

from __future__ import annotations

import math
from typing import Sequence


Step = tuple[float, float, int]  # (noise multiplier, sample rate, number of steps)
ACCOUNTANTS = ("rdp", "prv")
PRV_EPS_ERROR = 0.01  # Opacus' default: the PRV accountant's ε is exact to ±0.01


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composition of every entry of ``history`` (∞ when a step has no noise)."""
    steps = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    from opacus.accountants import create_accountant  # imported when used: Opacus takes seconds to import

    acc = create_accountant(accountant)
    acc.history = list(steps)
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """The noise multiplier σ that spends ``target_epsilon`` over ``steps`` steps at ``sample_rate``
    (Opacus' ``get_noise_multiplier``, to its tolerance of 0.01 in ε, never above the target)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


def local_dp_noise_multiplier(epsilon_per_release: float, delta: float) -> float:
    """The noise multiplier (std / sensitivity) of the classic Gaussian mechanism for (ε, δ) per
    release, σ/Δ = sqrt(2 ln(1.25/δ)) / ε (Dwork & Roth 2014, Thm A.1) — what Flower's LocalDpMod adds.
    Its composition over rounds is then accounted like any Gaussian: ``epsilon([(z, 1.0, rounds)])``."""
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon_per_release


def sampled_user_level_epsilon(noise_multipliers: Sequence[float], population: int, sample_size: int,
                               delta: float) -> float:
    """ε(δ) of user-level rounds that each draw ``sample_size`` of ``population`` users uniformly without
    replacement and release their clipped sum plus Gaussian noise of multiplier z (std z·C, one z per
    round in ``noise_multipliers``): amplification by subsampling under the *replace-one* relation, the
    one fixed-size sampling is analysed in (Wang, Balle & Kasiviswanathan, AISTATS 2019; dp-accounting's
    RDP accountant). Replacing one user moves the sum by up to 2C, so each round is a Gaussian of
    multiplier z/2 relative to that sensitivity. ∞ when a round has no noise."""
    import dp_accounting

    counts: dict[float, int] = {}
    for z in noise_multipliers:
        counts[float(z)] = counts.get(float(z), 0) + 1
    if not counts:
        return 0.0
    if min(counts) <= 0:
        return math.inf
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            int(population), int(sample_size), dp_accounting.GaussianDpEvent(z / 2)), n) for z, n in counts.items()])
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return float(acc.compose(event).get_epsilon(delta))


def dp_accounting_epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """The same ε from Google's ``dp-accounting`` (an independent implementation, for cross-checks):
    Poisson-subsampled Gaussian events composed over the history; ``accountant`` "rdp" or "pld"."""
    import dp_accounting

    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), int(n))
        for s, q, n in history if int(n) > 0])
    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return float(acc.compose(event).get_epsilon(delta))

