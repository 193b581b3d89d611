"""Each attack on the smallest real case, with an asserted number (real digits / CIFAR images)."""

import numpy as np
import torch
from torch.nn import functional as F

from attacks import Knowledge, Observation, make_attack
from attacks.imprint import ImprintBlock, ImprintedModel, measurement_thresholds, random_measurement
from attacks.labels import batch_labels, idlg_label
from attacks.matching import UpdateSimulator, cosine_distance
from fl_sim.metrics import score
from fl_sim.models import build_model
from fl_sim.training import local_train


def fedsgd(model, x, y):
    """Observation of one SGD step (lr 1) on (x, y), data in [0,1] used as is (mean 0, std 1)."""
    loss = F.cross_entropy(model(x), y)
    return Observation.from_gradients(model, torch.autograd.grad(loss, list(model.parameters())))


def know(model, x, **kw):
    return Knowledge(model, tuple(x.shape[1:]), 10, num_examples=len(x), batch_size=len(x), **kw)


def test_analytic_recovers_one_example_exactly_from_a_fully_connected_model(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(64, 32))
    obs = fedsgd(model, x[:1], y[:1])
    rec = make_attack("analytic").reconstruct(obs, know(model, x[:1]))
    assert torch.allclose(rec.inputs, x[:1], atol=1e-4)


def test_idlg_recovers_label_exactly_for_batch_of_one(digits):
    x, y = digits
    for name in ("lenet", "mlp"):
        torch.manual_seed(1)
        model = build_model(name, (1, 8, 8), 10)
        for i in range(20):
            obs = fedsgd(model, x[i:i + 1], y[i:i + 1])
            update = {k: obs.before[k] - obs.after[k] for k in obs.before}
            assert idlg_label(model, update) == int(y[i])


def test_batch_label_recovery_gets_at_least_90_percent_of_a_batch(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, hidden=(64,))
    hits = total = 0
    for start in range(0, 64, 8):
        xb, yb = x[start:start + 8], y[start:start + 8]
        obs = fedsgd(model, xb, yb)
        update = {k: obs.before[k] - obs.after[k] for k in obs.before}
        rec = batch_labels(model, update, 8, (1, 8, 8), 10)
        s = score(xb.numpy(), xb.numpy(), yb.numpy(), rec.numpy())
        hits += s["label_accuracy"] * 8
        total += 8
    assert hits / total >= 0.9


def test_dlg_inverts_a_tiny_mlp_within_seconds(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32,), activation="sigmoid")
    obs = fedsgd(model, x[3:4], y[3:4])
    rec = make_attack("dlg", max_evaluations=300).reconstruct(obs, know(model, x[:1]))
    s = score(x[3:4].numpy(), rec.inputs.numpy(), y[3:4].numpy(), rec.labels.numpy())
    assert s["psnr"][0] > 30 and s["label_accuracy"] == 1.0 and rec.evaluations <= 300


def test_idlg_fixes_the_recovered_label(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32,), activation="sigmoid")
    obs = fedsgd(model, x[5:6], y[5:6])
    rec = make_attack("idlg", max_evaluations=300).reconstruct(obs, know(model, x[:1]))
    s = score(x[5:6].numpy(), rec.inputs.numpy(), y[5:6].numpy(), rec.labels.numpy())
    assert rec.labels.tolist() == [int(y[5])] and s["psnr"][0] > 30


def test_imprint_recovers_a_batch_exactly(digits):
    x, y = digits
    torch.manual_seed(0)
    m = random_measurement(64)
    block = ImprintBlock((1, 8, 8), num_bins=64, thresholds=measurement_thresholds(x[500:], 64, m), measurement=m)
    model = ImprintedModel(build_model("mlp", (1, 8, 8), 10, hidden=(32,)), block)
    xb, yb = x[:8], y[:8]
    obs = fedsgd(model, xb, yb)
    rec = make_attack("imprint").reconstruct(obs, know(model, xb))
    s = score(xb.numpy(), rec.inputs.numpy(), yb.numpy(), None, labels_given=True)
    exact = sum(p > 60 for p in s["psnr"])  # exact up to float precision
    assert exact >= 6, s["psnr"]


def test_update_replay_matches_the_clients_multi_step_update(digits):
    """Fed the client's own data in its own order, the replay reproduces the real update."""
    x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    client.load_state_dict(before)
    xb, yb = x[:12], y[:12]
    # the client: 3 steps of batch 4 in order (no shuffling), lr 0.1
    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    for s in range(0, 12, 4):
        opt.zero_grad()
        F.cross_entropy(client(xb[s:s + 4]), yb[s:s + 4]).backward()
        opt.step()
    obs = Observation(before, {k: v.detach().clone() for k, v in client.state_dict().items()})
    k = Knowledge(model, (1, 8, 8), 10, lr=0.1, batch_size=4, num_examples=12)
    assert k.local_steps == 3
    sim = UpdateSimulator(model, k)
    replay = sim(xb, yb)
    assert float(cosine_distance(replay, sim.target(obs))) < 1e-6
    for a, b in zip(replay, sim.target(obs)):
        assert torch.allclose(a, b, atol=1e-5)


def test_inverting_gradients_beats_the_mean_image_on_a_multi_step_update(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
    client = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
    client.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xb, yb = x[:4], y[:4]
    local_train(client, xb, yb, epochs=2, batch_size=2, lr=0.1, generator=torch.Generator().manual_seed(0))
    obs = Observation(before, {k: v.detach().clone() for k, v in client.state_dict().items()})
    k = Knowledge(model, (1, 8, 8), 10, lr=0.1, local_epochs=2, batch_size=2, num_examples=4, labels=yb)
    rec = make_attack("inverting_gradients", iterations=300, tv=0.01).reconstruct(obs, k)
    attacked = score(xb.numpy(), rec.inputs.numpy(), yb.numpy(), None, labels_given=True)["psnr_mean"]
    mean_image = x[500:].mean(0, keepdim=True).expand(4, -1, -1, -1).numpy()
    baseline = score(xb.numpy(), mean_image, yb.numpy(), None, labels_given=True)["psnr_mean"]
    assert attacked > baseline + 3, (attacked, baseline)


def test_batchnorm_targets_recover_the_clients_batch_statistics_after_one_step(digits):
    from attacks.matching import batchnorm_targets

    x, y = digits
    torch.manual_seed(0)
    model = build_model("convnet", (1, 28, 28), 10, width=2)
    client = build_model("convnet", (1, 28, 28), 10, width=2)
    client.load_state_dict(model.state_dict())
    xb = torch.nn.functional.interpolate(x[:16], size=28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local_train(client, xb, y[:16], epochs=1, batch_size=16, lr=0.1)
    obs = Observation(before, {k: v.detach().clone() for k, v in client.state_dict().items()})
    (mean, var), *_ = batchnorm_targets(model, obs, steps=1)
    first_bn_input = model.body[0](xb)  # the conv before the first BatchNorm, at the weights sent
    torch.testing.assert_close(mean, first_bn_input.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(var, first_bn_input.var((0, 2, 3)), atol=1e-4, rtol=1e-3)  # unbiased, as BN stores


def test_inverting_gradients_with_batchnorm_prior_runs_and_reports(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model("convnet", (1, 28, 28), 10, width=2)
    xb = torch.nn.functional.interpolate(x[:2], size=28)
    model.train()
    obs = fedsgd(model, xb, y[:2])
    rec = make_attack("inverting_gradients", iterations=5, bn_prior=0.01).reconstruct(obs, know(model, xb))
    assert rec.inputs.shape == (2, 1, 28, 28) and rec.evaluations == 6 and np.isfinite(rec.loss)


def test_batch_label_counts_from_a_multi_step_fedavg_update(digits):
    """16 examples, batch 4, 2 epochs = 8 local steps: the counts come from the summed update."""
    x, y = digits
    hits = total = 0
    for start in range(0, 96, 16):
        torch.manual_seed(start)
        model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        client = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        client.load_state_dict(model.state_dict())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        xb, yb = x[start:start + 16], y[start:start + 16]
        local_train(client, xb, yb, epochs=2, batch_size=4, lr=0.05, generator=torch.Generator().manual_seed(0))
        update = {k: (before[k] - v.detach()) / 0.05 for k, v in client.state_dict().items()}
        rec = batch_labels(model, update, 16, (1, 8, 8), 10, local_batch_size=4, epochs=2)
        hits += score(xb.numpy(), xb.numpy(), yb.numpy(), rec.numpy())["label_accuracy"] * 16
        total += 16
    assert hits / total >= 0.8, hits / total


def test_the_batchnorm_prior_gets_the_clients_exact_batch_statistics_from_a_one_step_update():
    """running_new = (1 - m)·running_old + m·batch_stat: after one local step the update gives every BatchNorm
    layer's batch mean and (unbiased) variance exactly, so the prior is zero at the client's true input and
    not at another."""
    from attacks.matching import BatchNormPrior, batchnorm_targets

    torch.manual_seed(0)
    model = build_model("convnet", (3, 32, 32), 10, width=4)
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = build_model("convnet", (3, 32, 32), 10, width=4)
    client.load_state_dict(before)
    local_train(client, x, y, epochs=1, batch_size=1, lr=0.005, generator=torch.Generator().manual_seed(0))
    targets = batchnorm_targets(model, Observation(before, client.state_dict()), 1)
    prior = BatchNormPrior(model.train(), targets)
    losses = []
    for candidate in (x, torch.randn(1, 3, 32, 32)):
        prior.reset()
        with torch.no_grad():
            model(candidate)
        losses.append(float(prior.loss()))
    prior.remove()
    assert len(targets) == 8 and losses[0] < 1e-3 < 0.1 < losses[1]


def test_attack_bn_mode_sets_how_the_replay_runs_batchnorm(compose):
    from fl_sim.attacking import attack_from_config

    for mode, train in (("train", True), ("eval", False)):
        for name in ("inverting_gradients", "dlg", "idlg"):
            assert attack_from_config(compose([f"attack={name}", f"attack.bn_mode={mode}"]).attack).train_mode is train
