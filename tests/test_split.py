"""Split learning building blocks: cutting a model, and rMLE on what the server sees at the cut."""

import numpy as np
import pytest
import torch

from attacks import Knowledge
from attacks.registry import make_attack
from attacks.rmle import ActivationObservation
from fl_sim.metrics import score
from fl_sim.models import build_model, cut_points, split_model


@pytest.mark.parametrize("name,kw", [("mlp", {"hidden": (32,)}), ("cnn", {}), ("lenet", {}),
                                     ("convnet", {"width": 4}), ("resnet18", {"width": 4})])
def test_bottom_then_top_is_the_whole_model_at_every_cut(name, kw):
    torch.manual_seed(0)
    shape = (3, 32, 32) if name in ("convnet", "resnet18") else (1, 28, 28)
    model = build_model(name, shape, 10, **kw).eval()
    x = torch.rand(2, *shape)
    for cut in cut_points(model):
        bottom, top = split_model(model, cut)
        assert torch.allclose(top(bottom(x)), model(x), atol=1e-6), cut
        assert set(map(id, bottom.parameters())) <= set(map(id, model.parameters()))  # shared, not copied


def test_an_invalid_cut_is_one_clear_error():
    model = build_model("lenet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"scenario.cut_layer='fc' is not a layer .* choose one of body.0, body.1"):
        split_model(model, "fc")
    with pytest.raises(ValueError, match="scenario.cut_layer='conv9'"):
        split_model(model, "conv9")


def _rmle_psnr(digits, model, cut, iterations=1000):
    x, y = digits
    x, y = x[:8], y[:8]
    bottom, _ = split_model(model, cut)
    with torch.no_grad():
        a = bottom(x)
    rec = make_attack("rmle", iterations=iterations).reconstruct(ActivationObservation(a), Knowledge(bottom, (1, 8, 8), 10))
    return score(x.numpy(), rec.inputs.numpy(), y.numpy(), None, labels_given=True)["psnr_mean"]


def test_rmle_inverts_a_shallow_cut_and_does_worse_deeper(digits):
    """He et al. 2019: white-box rMLE is near exact after the first layer (their LeNet conv1: 39.7 dB)
    and degrades with depth. Here: DLG's LeNet on 8x8 digits, 8 images."""
    torch.manual_seed(0)
    lenet = build_model("lenet", (1, 8, 8), 10)
    shallow, deep = _rmle_psnr(digits, lenet, "body.1"), _rmle_psnr(digits, lenet, "body.3")
    assert shallow > 40 and deep < shallow - 10, (shallow, deep)
    x = digits[0][:8]
    mean_image = x.mean(0, keepdim=True).expand_as(x)  # the baseline an attacker has without the activations
    baseline = score(x.numpy(), mean_image.numpy(), digits[1][:8].numpy(), None, labels_given=True)["psnr_mean"]
    assert deep > baseline, (deep, baseline)


def _lenet_first_layer(digits):
    """8 digits, DLG's LeNet cut after its first layer, and the activations the server receives."""
    x, y = digits
    torch.manual_seed(0)
    bottom, _ = split_model(build_model("lenet", (1, 8, 8), 10), "body.1")
    with torch.no_grad():
        return x[:8], y[:8], bottom, bottom(x[:8])


def test_inverse_network_and_unsplit_beat_the_mean_image_at_a_shallow_cut(digits):
    """He et al.'s inverse network (decoder trained on the attacker's own digits) and UnSplit (client
    weights unknown) on DLG's LeNet cut after its first layer: both above the mean-image baseline."""
    x, y = digits
    xv, yv, bottom, a = _lenet_first_layer(digits)
    baseline = score(xv.numpy(), x[500:].mean(0, keepdim=True).expand_as(xv).numpy(), yv.numpy(), None,
                     labels_given=True)["psnr_mean"]
    inv = make_attack("inverse_network", epochs=100).reconstruct(
        ActivationObservation(a), Knowledge(bottom, (1, 8, 8), 10, auxiliary_inputs=x[500:]))
    uns = make_attack("unsplit", rounds=50).reconstruct(ActivationObservation(a), Knowledge(bottom, (1, 8, 8), 10))
    for rec in (inv, uns):
        psnr = score(xv.numpy(), rec.inputs.numpy(), yv.numpy(), None, labels_given=True)["psnr_mean"]
        assert psnr > baseline + 3, (psnr, baseline)


def test_noise_at_the_cut_lowers_rmles_psnr(digits):
    from defenses.cut import noisy_activations

    xv, yv, bottom, a = _lenet_first_layer(digits)
    psnr = {}
    for scale in (0.0, 0.5):
        sent = noisy_activations(a, scale, generator=torch.Generator().manual_seed(0))
        rec = make_attack("rmle", iterations=1000).reconstruct(ActivationObservation(sent), Knowledge(bottom, (1, 8, 8), 10))
        psnr[scale] = score(xv.numpy(), rec.inputs.numpy(), yv.numpy(), None, labels_given=True)["psnr_mean"]
    assert psnr[0.5] < psnr[0.0] - 20, psnr


def test_nopeek_distance_correlation_is_one_for_a_copy_and_low_for_independent_data():
    from defenses.cut import distance_correlation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-5)
    independent = float(distance_correlation(x, torch.randn(200, 7, generator=g)))  # biased up: ~0.3 at n=200
    noisy_copy = float(distance_correlation(x, x + 0.5 * torch.randn(200, 5, generator=g)))
    assert independent < 0.4 and noisy_copy > independent + 0.4, (independent, noisy_copy)
    z = x.clone().requires_grad_(True)
    distance_correlation(x, z).backward()  # differentiable: usable as a training loss term
    assert torch.isfinite(z.grad).all()


def test_direction_scoring_recovers_labels_from_cut_gradients(digits):
    """U-shaped split: the client keeps its head and labels; the server sees d loss / d (its output)
    per example. Their directions cluster by class (Li et al. 2022)."""
    from attacks.label_leakage import direction_scoring, label_accuracy_up_to_renaming

    x, y = digits
    xb, yb = x[:64], y[:64]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16))
    server_part, head = split_model(model, "net.4")  # the client's head: the last linear layer
    z = server_part(xb).detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(head(z), yb, reduction="sum").backward()
    acc = label_accuracy_up_to_renaming(direction_scoring(z.grad, 10), yb.numpy())
    assert acc >= 0.9, acc
    assert label_accuracy_up_to_renaming(np.zeros(64, dtype=int), yb.numpy()) < 0.2  # one cluster: chance
