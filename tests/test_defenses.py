"""Defenses: DP accounting (against Opacus, dp-accounting, a closed form and a published value),
DP-SGD training, and the update mods (pruning, quantisation, noise)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from attacks.registry import make_attack
from defenses.accounting import (PRV_EPS_ERROR, calibrate_noise, dp_accounting_epsilon, epsilon,
                                 local_dp_noise_multiplier)
from defenses.dpsgd import dp_local_train, make_dp_compatible
from defenses.mods import noise_mod, prune_mod, prune_update, quantize_mod, quantize_update
from fl_sim.metrics import score
from fl_sim.models import build_model
from fl_sim.training import local_train
from attacks.base import Knowledge, Observation


# --------------------------------------------------------------------------- accounting

def test_reported_epsilon_equals_opacus_accountant_stepped_the_same_way():
    sigma, q, steps = 1.1, 0.02, 150
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon([(sigma, q, steps)], 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_opacus_published_value_is_reproduced():
    """Opacus' own reference value: σ 1.5, q 0.04, 90 epochs (2,250 steps), δ 1e-5 -> ε 7.32911117143."""
    assert epsilon([(1.5, 0.04, int(90 / 0.04))], 1e-5, "rdp") == pytest.approx(7.32911117143, rel=1e-9)


def test_prv_matches_the_exact_epsilon_of_composed_gaussians():
    """Without subsampling, T Gaussian steps of noise σ are one Gaussian of noise σ/√T, whose exact
    δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2), μ = √T/σ (Balle & Wang 2018). Opacus' PRV estimate
    (eps_error 0.01) is its upper end, within 2 × 0.01 above the exact value; RDP is an upper bound."""
    sigma, steps, delta = 5.0, 10, 1e-5
    mu = math.sqrt(steps) / sigma
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 1e-6, 50)
    assert exact <= epsilon([(sigma, 1.0, steps)], delta, "prv") <= exact + 2 * PRV_EPS_ERROR
    assert epsilon([(sigma, 1.0, steps)], delta, "rdp") >= exact


def test_rdp_prv_and_dp_accounting_agree():
    history = [(1.0, 0.05, 40)] * 3
    rdp, prv = epsilon(history, 1e-5, "rdp"), epsilon(history, 1e-5, "prv")
    assert dp_accounting_epsilon(history, 1e-5, "rdp") == pytest.approx(rdp, rel=1e-3)  # same analysis
    pld = dp_accounting_epsilon(history, 1e-5, "pld")
    assert abs(prv - pld) < 0.03  # both near-exact: PRV ±0.01, PLD pessimistic by its discretisation
    assert prv < rdp and pld < rdp  # RDP's conversion to (ε, δ) is an upper bound


def test_epsilon_composes_over_rounds_like_one_accountant_over_all_steps():
    one_round = (0.8, 0.1, 30)
    eps1, eps5 = epsilon([one_round], 1e-5), epsilon([one_round] * 5, 1e-5)
    assert eps5 > eps1
    assert eps5 == pytest.approx(epsilon([(0.8, 0.1, 150)], 1e-5), rel=1e-9)
    assert epsilon([(0.0, 0.1, 30)], 1e-5) == math.inf


def test_local_dp_noise_of_flowers_mod_gives_at_most_its_nominal_epsilon_per_release():
    """Flower's LocalDpMod: std = Δ sqrt(2 ln(1.25/δ)) / ε, valid for ε < 1 (Dwork & Roth, Thm A.1)."""
    z = local_dp_noise_multiplier(0.5, 1e-5)
    assert z == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert epsilon([(z, 1.0, 1)], 1e-5, "prv") <= 0.5
    assert epsilon([(z, 1.0, 3)], 1e-5, "prv") > epsilon([(z, 1.0, 1)], 1e-5, "prv")


def test_noise_calibrated_to_a_target_epsilon_spends_at_most_the_target():
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 300)
    eps = epsilon([(sigma, 0.05, 300)], 1e-5)
    assert 2.9 <= eps <= 3.0


# --------------------------------------------------------------------------- DP-SGD training

def test_batchnorm_is_replaced_for_opacus():
    model = build_model("convnet", (3, 32, 32), 10, width=4)
    fixed, changes = make_dp_compatible(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert changes == ["8 BatchNorm layer(s) replaced by GroupNorm (Opacus ModuleValidator.fix)"]
    assert make_dp_compatible(build_model("lenet", (1, 28, 28), 10))[1] == []


def test_dpsgd_update_is_clipped_and_noised_as_configured(digits):
    """One step over the whole client (q = 1): without noise the update is the mean of clipped
    per-example gradients, so its norm is at most lr * C; with noise it moves by about
    lr * σ * C / n * sqrt(parameters) more."""
    x, y = digits
    x, y = x[:50], y[:50]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(16,))
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def update(sigma, seed=0):
        state, _, steps, q = dp_local_train(model, x, y, epochs=1, batch_size=50, lr=1.0, noise_multiplier=sigma,
                                            max_grad_norm=0.01, generator=torch.Generator().manual_seed(seed))
        assert steps == 1 and q == 1.0
        return torch.cat([state[k].flatten() for k, _ in model.named_parameters()]) - w0

    clean = update(0.0)
    assert 0.001 < clean.norm() <= 0.01 + 1e-6
    noisy = update(1.0)
    expected = 1.0 * 0.01 / 50 * math.sqrt(clean.numel())
    assert (noisy - clean).norm() == pytest.approx(expected, rel=0.1)
    assert torch.equal(update(1.0, seed=3), update(1.0, seed=3))  # reproducible with a seed


def test_an_empty_poisson_batch_is_a_noise_step_in_every_grad_sample_mode():
    """Poisson sampling of 4 examples at batch 1 draws empty batches (seed 0 does). functorch's and expanded
    weights' forward passes cannot take one (Opacus raised "expected groups to be greater than 0"); each
    mode now takes the same pure-noise step as the hooks, so all three give the same model. The initialisation
    is seeded: the modes sum per-example gradients in different orders, and on some initialisations a ReLU
    near its kink flips in float rounding within the 12 steps (5 of 40 seeds differ by up to 4e-4)."""
    torch.manual_seed(0)
    model, _ = make_dp_compatible(build_model("convnet", (3, 32, 32), 10, width=4))
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    states = {}
    for mode in ("hooks", "functorch", "ew"):
        states[mode], _, steps, _ = dp_local_train(model, x, y, epochs=3, batch_size=1, lr=0.01, noise_multiplier=1.0,
                                                   max_grad_norm=1.0, grad_sample_mode=mode,
                                                   generator=torch.Generator().manual_seed(0))
        assert steps == 12
    for mode in ("functorch", "ew"):
        for k, v in states["hooks"].items():
            torch.testing.assert_close(states[mode][k], v, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in states["hooks"].items())


def test_dpsgd_with_noise_lowers_the_attacks_psnr(digits):
    """The same client step attacked by inverting gradients: plain SGD vs DP-SGD (σ 1, C 1)."""
    x, y = digits
    xb, yb = x[3:4], y[3:4]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
    plain.load_state_dict(before)
    local_train(plain, xb, yb, epochs=1, batch_size=1, lr=0.1)
    private, *_ = dp_local_train(model, xb, yb, epochs=1, batch_size=1, lr=0.1, noise_multiplier=1.0,
                                 max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    attack = make_attack("inverting_gradients", iterations=300, tv=1e-4, seed=0)
    know = Knowledge(model, (1, 8, 8), 10, lr=0.1, local_epochs=1, batch_size=1, num_examples=1)
    psnr = {}
    for name, after in (("plain", plain.state_dict()), ("dpsgd", private)):
        rec = attack.reconstruct(Observation(before=before, after={k: v.clone() for k, v in after.items()}), know)
        psnr[name] = score(xb.numpy(), rec.inputs.numpy(), yb.numpy(), None, labels_given=True)["psnr_mean"]
    assert psnr["plain"] > 20 and psnr["dpsgd"] < psnr["plain"] - 5, psnr


# --------------------------------------------------------------------------- update mods

def test_pruning_zeroes_the_stated_fraction_of_each_layer_and_keeps_the_largest():
    rng = np.random.default_rng(0)
    update = {"a": rng.normal(size=(10, 20)), "b": rng.normal(size=7)}
    out = prune_update(update, 0.7)
    for k, u in update.items():
        zeros = int(np.sum(out[k] == 0))
        assert zeros == int(np.floor(0.7 * u.size))
        kept = np.abs(u[out[k] != 0])
        assert kept.min() >= np.abs(u[out[k] == 0]).max()  # the largest magnitudes survive, unchanged
        assert np.array_equal(out[k][out[k] != 0], u[out[k] != 0])


def test_quantisation_leaves_at_most_two_to_the_bits_levels():
    u = {"w": np.random.default_rng(1).normal(size=1000)}
    for bits in (1, 2, 4):
        q = quantize_update(u, bits)["w"]
        assert len(np.unique(q)) <= 2 ** bits
        assert np.abs(q - u["w"]).max() <= (u["w"].max() - u["w"].min()) / (2 ** bits - 1) / 2 + 1e-12


def _fake_round_trip(mod, sent: dict, returned: dict):
    """Run a mod on a stand-in message (Flower's Message needs a running app): our logic only."""
    msg = SimpleNamespace(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                             "config": ConfigRecord({"server-round": 1})}))
    reply = SimpleNamespace(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in returned.items()})}),
                            has_error=lambda: False)
    out = mod(msg, SimpleNamespace(node_config={"partition-id": 0}), lambda m, c: reply)
    return {k: v.numpy() for k, v in out.content["arrays"].items()}


def test_update_mods_act_on_the_update_not_the_weights():
    rng = np.random.default_rng(2)
    sent = {"w": rng.normal(size=(50, 4)).astype(np.float32), "steps": np.array([3], dtype=np.int64)}
    returned = {"w": sent["w"] + rng.normal(scale=0.1, size=(50, 4)).astype(np.float32), "steps": np.array([5])}
    pruned = _fake_round_trip(prune_mod(0.9), sent, returned)
    assert np.sum(pruned["w"] == sent["w"]) == 180  # 90% of the update is zero: those weights are as sent
    assert pruned["steps"][0] == 5  # integer buffers pass unchanged
    levels = _fake_round_trip(quantize_mod(2), sent, returned)["w"] - sent["w"]
    assert len(np.unique(np.round(levels, 5))) <= 4
    noisy = _fake_round_trip(noise_mod(1.0, lambda m, c: 0), sent, returned)["w"] - returned["w"]
    assert noisy.std() == pytest.approx(1.0, rel=0.15)


def test_auto_grad_sample_mode_is_the_benchmarks_fastest_correct_mode():
    import json
    from pathlib import Path

    from defenses.dpsgd import FASTEST_MODE, resolve_grad_sample_mode

    measured = json.loads((Path(__file__).parents[1] / "benchmarks/results/dp_overhead.json").read_text())
    assert FASTEST_MODE == measured["fastest_correct_mode"]
    assert resolve_grad_sample_mode("auto", "mlp") == "hooks" and resolve_grad_sample_mode("ghost", "lenet") == "ghost"


def test_sampled_user_level_epsilon_is_the_replace_one_gaussian_without_sampling_and_smaller_with_it():
    from defenses.accounting import sampled_user_level_epsilon

    # every client sampled: no amplification, a Gaussian of multiplier z/2 (replace-one sensitivity 2C)
    full = sampled_user_level_epsilon([2.0] * 10, 50, 50, 1e-5)
    assert full == pytest.approx(epsilon([(1.0, 1.0, 10)], 1e-5), rel=0.02)  # two libraries, their own RDP orders
    few = sampled_user_level_epsilon([1.0] * 100, 1000, 10, 1e-5)  # 10 of 1,000 a round, 100 rounds
    assert few < epsilon([(1.0, 1.0, 100)], 1e-5) / 4  # far below the add/remove bound without amplification
    assert sampled_user_level_epsilon([1.0] * 200, 1000, 10, 1e-5) > few  # composes over rounds
    assert sampled_user_level_epsilon([1.0] * 100, 1000, 20, 1e-5) > few  # a larger sample spends more
    assert sampled_user_level_epsilon([1.0, 0.0], 1000, 10, 1e-5) == math.inf
    mixed = sampled_user_level_epsilon([1.0] * 50 + [0.5] * 50, 1000, 10, 1e-5)
    assert few < mixed < sampled_user_level_epsilon([0.5] * 100, 1000, 10, 1e-5)


def _central(overrides):
    from fl_sim.config import compose
    from fl_sim.privacy import CentralDP

    return CentralDP(compose(["dataset=digits", "model=mlp", "attack=none", "defense=central_dp",
                              "defense.central_noise_multiplier=1.0", *overrides]))


def test_central_dp_reports_the_sampled_bound_and_accounts_short_rounds_with_less_noise():
    from fl_sim.report import privacy_section

    c = _central(["num_clients=100", "strategy.fraction_train=0.1", "strategy.min_train_clients=1"])
    assert c.num_sampled == 10 and c.amplified
    for rnd in (1, 2, 3):
        c.released(rnd, 10)
    s = c.summary()
    assert s["epsilon"] == pytest.approx(epsilon([(1.0, 1.0, 3)], 1e-5), rel=1e-9)  # the add/remove upper bound
    assert s["epsilon_sampled"] == pytest.approx(
        dp_accounting_sampled(1.0, 100, 10, 3, 1e-5), rel=1e-9)
    unsampled = s["sampling"].pop("epsilon_without_sampling")  # the same relation, every client every round
    assert unsampled == pytest.approx(dp_accounting_sampled(1.0, 100, 100, 3, 1e-5), rel=1e-9)
    assert s["epsilon_sampled"] < unsampled  # drawing 10 of 100 gains under replace-one (weakly at z/2 = 0.5)
    assert s["sampling"] == {"population": 100, "sample_size": 10, "method": "uniform without replacement",
                             "relation": "replace-one"}
    s = c.summary()
    assert "without it" in "\n".join(privacy_section(s))
    c.released(4, 5)  # half the sampled updates aggregated: Flower's std z·C/10 on a mean of 5 is z/2 on the sum
    s = c.summary()
    assert s["epsilon_per_round"][-1]["noise_multiplier"] == 0.5
    assert s["epsilon"] == pytest.approx(epsilon([(1.0, 1.0, 3), (0.5, 1.0, 1)], 1e-5), rel=1e-9)
    assert s["epsilon"] > epsilon([(1.0, 1.0, 4)], 1e-5)
    assert any("fewer updates than were sampled" in n for n in s["notes"])
    report = "\n".join(privacy_section(s))
    assert "ε with sampling" in report and f"| 4 | {s['epsilon']:.3f} | {s['epsilon_sampled']:.3f} |" in report

    everyone = _central(["num_clients=4"])  # all clients every round: nothing to amplify
    everyone.released(1, 4)
    s = everyone.summary()
    assert s["epsilon_sampled"] is None and s["sampling"] is None
    assert "ε with sampling" not in "\n".join(privacy_section(s))
    adaptive = _central(["num_clients=100", "strategy.fraction_train=0.1", "defense.central_clipping=adaptive"])
    adaptive.released(1, 10)
    assert adaptive.summary()["epsilon"] is None and adaptive.summary()["epsilon_sampled"] is None


def dp_accounting_sampled(z, n, m, rounds, delta):
    """Independent of fl_sim's helper: dp-accounting's RDP of ``rounds`` fixed-size samples, Gaussian z/2."""
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    return acc.get_epsilon(delta)
