"""Training-time defenses against model inversion (issue 12): signed label smoothing, MID's bottleneck and
BiDO's dependency term, on small real cases (sklearn's digits), alone and (the per-example ones) under DP-SGD."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

from defenses.dpsgd import dp_local_train
from defenses.inversion import (BiDO, VariationalBottleneck, add_bottleneck, bottlenecks, centred_kernel, coco,
                                inversion_defense_loss, seed_bottlenecks, smoothed_cross_entropy)
from fl_sim.models import build_model
from fl_sim.training import evaluate, local_train


def test_label_smoothing_is_pytorchs_for_positive_alpha_and_keeps_its_sign_when_negative():
    logits, y = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, 0.1).mean(),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
    # negative alpha: the other classes' log-probabilities enter with a positive sign
    log_p = F.log_softmax(logits, 1)
    own, others = log_p.gather(1, y[:, None]).squeeze(1), log_p.sum(1)
    expected = -(1 + 0.05) * own - (-0.05 / 10) * others
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, -0.05), expected)


def test_negative_smoothing_trains_a_more_confident_model_than_positive(digits):
    """The paper's mechanism: negative smoothing pushes the other classes' probabilities towards zero."""
    x, y = digits
    confidence = {}
    for alpha in (-0.05, 0.1):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        local_train(model, x, y, epochs=5, batch_size=32, lr=0.1, generator=torch.Generator().manual_seed(0),
                    loss_fn=lambda m, out, t, a=alpha: inversion_defense_loss(m, out, t, alpha=a))
        with torch.no_grad():
            confidence[alpha] = float(F.softmax(model(x), 1).max(1).values.mean())
    assert confidence[-0.05] > confidence[0.1] + 0.05


def test_mid_puts_a_bottleneck_in_place_of_the_classifier_of_every_model():
    for name, shape in (("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("convnet", (3, 32, 32)), ("lenet", (1, 28, 28))):
        torch.manual_seed(0)
        model = build_model(name, shape, 10, width=8, hidden=(32,))
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        add_bottleneck(model)
        (b,) = bottlenecks(model)
        assert b.dim == last.in_features // 2 and b.classifier.out_features == 10
        assert not any(m is last for m in model.modules())
        x = torch.randn(4, *shape)
        assert model(x).shape == (4, 10)


def test_the_bottlenecks_kl_is_the_gaussians_in_bits_and_eval_mode_uses_the_mean():
    torch.manual_seed(0)
    b = VariationalBottleneck(6, 3, dim=4)
    h = torch.randn(5, 6)
    b.train()
    out_a, kl = b(h), b.kl
    stats = b.encoder(h)
    mu, std = stats[:, :4], F.softplus(stats[:, 4:] - 5)
    exact = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(1) / math.log(2)
    torch.testing.assert_close(kl, exact)
    assert not torch.allclose(out_a, b(h))  # training: z is drawn
    b.eval()
    torch.testing.assert_close(b(h), b.classifier(mu))
    assert b.kl is None  # the deployed model carries no KL (and no graph)
    torch.testing.assert_close(b(h), b(h))


def test_the_deployed_bottleneck_draws_z_afresh_for_each_input_and_the_same_for_the_same_input():
    """``sample_at_eval`` (the product's default, as the authors' code): eval mode draws z ~ N(μ, σ²) with noise
    seeded by the input, so an attacker's every new query gets a fresh draw while a repeated one (a resumed
    run's evaluation) gets the same answer; ``mean`` is the deterministic z = μ."""
    torch.manual_seed(0)
    b = VariationalBottleneck(6, 3, dim=4, sample_at_eval=True).eval()
    with torch.no_grad():
        b.encoder.bias[4:] = 5.0  # σ = softplus(0) ≈ 0.69: noise worth seeing
    h = torch.randn(5, 6)
    near = h + 1e-6
    mean = b.classifier(b.encoder(h)[:, :4])
    torch.testing.assert_close(b(h), b(h))  # the same input, the same draw
    assert (b(h) - mean).abs().max() > 0.05  # a draw, not the mean
    assert (b(near) - b(h)).abs().max() > 0.05  # a new input, a new draw (the mean moved by ~1e-6)
    assert b.kl is None
    b.sample_at_eval = False
    torch.testing.assert_close(b(h), mean)
    draws = torch.stack([VariationalBottleneck.forward(b.train(), h + 1e-4 * i) for i in range(200)]).detach()
    b.eval().sample_at_eval = True
    evals = torch.stack([b(h + 1e-4 * i) for i in range(200)]).detach()
    # the deployed draws spread as training's do (same σ), around the same mean
    torch.testing.assert_close(evals.std(0), draws.std(0), rtol=0.25, atol=0.02)
    torch.testing.assert_close(evals.mean(0), mean.detach(), rtol=0, atol=0.15)


def bits_through(model, x) -> float:
    """The bottleneck's mean KL (bits) on ``x``: training mode computes it, without gradients."""
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    return float(bottlenecks(model)[0].kl.mean())


@pytest.mark.parametrize("dp", [False, True])
def test_mid_lowers_the_information_in_the_bottleneck_and_stacks_with_dpsgd(digits, dp):
    """β·KL in the loss: a larger β leaves less KL (bits through the bottleneck) after training, with plain
    SGD and with DP-SGD (per-example loss, so per-example clipping bounds it); the same seed, the same model."""
    x, y = digits
    kl, accuracy, states = {}, {}, {}
    for beta in (0.0, 0.01):
        torch.manual_seed(0)
        model = add_bottleneck(build_model("mlp", (1, 8, 8), 10, hidden=(64,)))

        def loss_fn(m, out, t, beta=beta):
            return inversion_defense_loss(m, out, t, beta=beta)

        if dp:
            state, *_ = dp_local_train(model, x, y, epochs=3, batch_size=64, lr=0.5, noise_multiplier=0.5,
                                       max_grad_norm=1.0, generator=torch.Generator().manual_seed(0), loss_fn=loss_fn)
            model.load_state_dict(state)
        else:
            seed_bottlenecks(model, torch.Generator().manual_seed(1))
            local_train(model, x, y, epochs=5, batch_size=32, lr=0.1, generator=torch.Generator().manual_seed(0),
                        loss_fn=loss_fn)
            seed_bottlenecks(model, None)
        _, accuracy[beta] = evaluate(model, x, y)
        kl[beta] = bits_through(model, x)
        states[beta] = model.state_dict()
    assert kl[0.01] < 0.5 * kl[0.0]
    assert accuracy[0.01] > 0.5  # still a classifier
    if not dp:  # seeded bottleneck noise: the same run again gives the same weights
        torch.manual_seed(0)
        again = add_bottleneck(build_model("mlp", (1, 8, 8), 10, hidden=(64,)))
        seed_bottlenecks(again, torch.Generator().manual_seed(1))
        local_train(again, x, y, epochs=5, batch_size=32, lr=0.1, generator=torch.Generator().manual_seed(0),
                    loss_fn=lambda m, out, t: inversion_defense_loss(m, out, t, beta=0.01))
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in states[0.01].items())


def test_bidos_term_is_lambda_x_coco_with_the_input_minus_lambda_y_coco_with_the_label_over_hidden_layers(digits):
    x, y = digits
    xb, yb = x[:64], y[:64]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16))
    bido = BiDO(model, lambda_x=1.0, lambda_y=50.0, sigma=5.0)
    logits = model(xb)
    loss = inversion_defense_loss(model, logits, yb, bido=bido)
    # by hand: the two hidden ReLU outputs
    h1 = torch.relu(model.net[1](xb.flatten(1)))
    h2 = torch.relu(model.net[3](h1))
    kx, ky = centred_kernel(xb, 5.0), centred_kernel(F.one_hot(yb, 10).float(), None)
    term = sum(coco(kx, centred_kernel(h, 5.0)) - 50.0 * coco(centred_kernel(h, 5.0), ky) for h in (h1, h2))
    torch.testing.assert_close(loss, F.cross_entropy(logits, yb, reduction="none") + term)
    bido.close()
    model(xb)
    assert bido.hidden == []  # the hooks are gone


def test_bido_training_raises_the_features_dependence_on_the_label_relative_to_the_input(digits):
    """What BiDO optimises, after training: COCO(Z, Y) / COCO(X, Z) of the last hidden layer is higher
    than with plain cross-entropy, and the model still classifies."""
    x, y = digits
    ratio, accuracy = {}, {}
    for use in (False, True):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        bido = BiDO(model, 1.0, 50.0, 5.0) if use else None
        local_train(model, x, y, epochs=5, batch_size=64, lr=0.1, generator=torch.Generator().manual_seed(0),
                    loss_fn=(lambda m, out, t: inversion_defense_loss(m, out, t, bido=bido)) if use else None)
        if bido is not None:
            bido.close()
        with torch.no_grad():
            xb, yb = x[:256], y[:256]
            z = torch.relu(model.net[1](xb.flatten(1)))
            kz = centred_kernel(z, 5.0)
            ratio[use] = float(coco(kz, centred_kernel(F.one_hot(yb, 10).float(), None))
                               / coco(centred_kernel(xb, 5.0), kz))
        accuracy[use] = evaluate(model, x, y)[1]
    assert ratio[True] > ratio[False]
    assert accuracy[True] > 0.8


def test_defense_mid_trains_fedavgs_cnn_with_its_defaults_where_the_cnns_sgd_does_not():
    """``defense=mid`` sets the clients' optimiser to Adam at 0.001 (conf/defense/mid.yaml) unless client.* is
    given: one epoch of FedAvg's CNN on the 2,000 private MNIST digits with β 0.01 then classifies the test
    digits, while the CNN's own SGD at 0.1 leaves the bottleneck at chance."""
    from fl_sim.config import compose
    from fl_sim.data import build_federated_data

    cfg = compose(["attack=gmi", "defense=mid"])
    assert (cfg.client.optimizer, cfg.client.lr) == ("adam", 0.001)
    assert compose(["defense=mid", "client.lr=0.01"]).client.lr == 0.01  # what the user gives wins
    assert (compose([]).client.optimizer, compose([]).client.lr) == ("sgd", 0.1)  # no defense: as before
    assert compose(["defense=[dpsgd,mid]"]).client.optimizer == "adam"  # stacked
    d = build_federated_data(cfg.dataset, cfg.partition, 10, 0)
    from fl_sim.workspace import initial_model  # every party's model: the deployed one draws z (the authors')

    assert [b.sample_at_eval for b in bottlenecks(initial_model(cfg, d))] == [True]
    mean = compose(["attack=gmi", "defense=mid", "defense.mid_eval=mean"])
    assert [b.sample_at_eval for b in bottlenecks(initial_model(mean, d))] == [False]
    x, y, xt, yt = (torch.as_tensor(a) for a in (d.x_train, d.y_train, d.x_test, d.y_test))
    x, y, xt, yt = x[y < 5], y[y < 5], xt[yt < 5], yt[yt < 5]  # the private classes
    accuracy = {}
    for optimizer, lr in (("adam", float(cfg.client.lr)), ("sgd", 0.1)):
        model = initial_model(cfg, d)  # the run's own model, evaluated as deployed (z drawn)
        seed_bottlenecks(model, torch.Generator().manual_seed(1))
        local_train(model, x, y, epochs=1, batch_size=32, lr=lr, optimizer=optimizer,
                    generator=torch.Generator().manual_seed(0),
                    loss_fn=lambda m, out, t: inversion_defense_loss(m, out, t, beta=float(cfg.defense.mid_beta)))
        seed_bottlenecks(model, None)
        accuracy[optimizer] = evaluate(model, xt, yt)[1]
    assert accuracy["adam"] > 0.9, accuracy
    assert accuracy["sgd"] < 0.5, accuracy
