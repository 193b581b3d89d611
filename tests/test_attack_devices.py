"""Every attack honours ``Knowledge.device``: it computes there, and what it hands back (the
``Reconstruction``, the knowledge it was given, a GAN prior's state) is on the CPU, so that the evaluator and
Ray, which pickles an attack task's outcome (job and knowledge included) back to the driver, never see a
CUDA tensor.

Runnable here: each attack on a tiny case with ``device="cpu"`` (the plumbing: CPU results, knowledge left
as it was), and each attack and the device-moving helpers on PyTorch's ``meta`` device: no data, so a run
stops where it first needs a number, but up to there a CPU tensor meeting a meta one raises the same
device-mismatch error as on CUDA (CPU scalars and CPU index tensors are allowed on both). On a machine with
a GPU the same tiny cases run with ``device="cuda"``.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attacks import ATTACKS, Knowledge, ModelObservation, Observation, make_attack
from attacks.fsha import FSHA
from attacks.imprint import ImprintBlock, ImprintedModel, measurement_thresholds, random_measurement
from attacks.label_leakage import direction_scoring, norm_scoring
from attacks.rmle import ActivationObservation
from fl_sim.models import build_model, split_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is many times faster than two on a busy machine; the caller's setting back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fedsgd(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return Observation.from_gradients(model, torch.autograd.grad(loss, list(model.parameters())))


def _bn_model(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, classes))


def _case(name: str, x: torch.Tensor, y: torch.Tensor, device: str):
    """(attack, observation, knowledge) of a tiny case of ``name``, the models and data on the CPU (as the
    simulator hands them over) and ``knowledge.device = device``; GAN priors already fitted."""
    torch.manual_seed(0)
    xb, yb = x[:2], y[:2]
    if name in ("dlg", "idlg", "inverting_gradients"):
        model = _bn_model(10)  # BatchNorm: inverting_gradients' BN prior takes its targets from the observation
        obs = fedsgd(model, xb, yb)
        kw = {"dlg": dict(max_evaluations=6), "idlg": dict(max_evaluations=6),
              "inverting_gradients": dict(iterations=3, bn_prior=0.1)}[name]
        return make_attack(name, **kw), obs, Knowledge(model, (1, 8, 8), 10, num_examples=2, batch_size=2,
                                                       device=device)
    if name == "analytic":
        model = build_model("mlp", (1, 8, 8), 10, hidden=(16,))
        return make_attack(name), fedsgd(model, xb, yb), Knowledge(model, (1, 8, 8), 10, num_examples=2,
                                                                    batch_size=2, device=device)
    if name == "imprint":
        m = random_measurement(64)
        block = ImprintBlock((1, 8, 8), 16, thresholds=measurement_thresholds(x[100:300], 16, m), measurement=m)
        model = ImprintedModel(build_model("mlp", (1, 8, 8), 10, hidden=(16,)), block)
        return make_attack(name), fedsgd(model, x[:4], y[:4]), Knowledge(model, (1, 8, 8), 10, num_examples=4,
                                                                          batch_size=4, device=device)
    if name in ("rmle", "inverse_network", "unsplit"):
        bottom, _ = split_model(build_model("lenet", (1, 8, 8), 10), "body.1")
        with torch.no_grad():
            obs = ActivationObservation(bottom(xb), yb.clone())
        kw = {"rmle": dict(iterations=3), "inverse_network": dict(epochs=1, hidden=16, batch_size=32),
              "unsplit": dict(rounds=1, input_steps=2, model_steps=2)}[name]
        return make_attack(name, **kw), obs, Knowledge(bottom, (1, 8, 8), 10, auxiliary_inputs=x[300:364],
                                                       device=device)
    if name == "fsha":
        bottom, _ = split_model(build_model("lenet", (1, 8, 8), 10), "body.1")
        attack = FSHA(hidden=16, batch_size=8)
        attack.setup(copy.deepcopy(bottom), (1, 8, 8), x[300:332], device=device)
        attack.hijack(bottom(x[:8]))  # activations on the client's (CPU) side
        with torch.no_grad():
            obs = ActivationObservation(bottom(xb), None)
        return attack, obs, Knowledge(bottom, (1, 8, 8), 10, device=device)
    # model inversion: a 3-class target, the attacker's public data from the other classes
    target = _bn_model(3)  # BatchNorm: deepinversion matches its statistics
    with torch.no_grad():
        target.train()(x[:64])  # running statistics of real data
    target.eval()
    know = Knowledge(target, (1, 8, 8), 3, mean=(0.3,), std=(0.4,), auxiliary_inputs=(x[y >= 3][:48] - 0.3) / 0.4,
                     device=device)
    kw = {"mi_face": dict(iterations=3, per_class=1), "deepinversion": dict(iterations=3, per_class=1),
          "gmi": dict(iterations=2, restarts=2, per_class=1, width=4, latent_dim=8, gan_steps=1, gan_batch_size=8,
                      critic_steps=1),
          "kedmi": dict(iterations=2, samples=2, per_class=1, width=4, latent_dim=8, gan_steps=1, gan_batch_size=8),
          "plgmi": dict(iterations=2, restarts=2, per_class=1, width=4, latent_dim=8, gan_steps=1, gan_batch_size=8,
                        critic_steps=1, top_k=4),
          "hitaj": dict(iterations=2, per_class=1, width=4, latent_dim=8, batch_size=8)}[name]
    attack = make_attack(name, **kw)
    obs = ModelObservation({k: v.detach().clone() for k, v in target.state_dict().items()})
    if hasattr(attack, "fit_prior"):  # as fl_sim.inversion.prepare_prior: the target at the attack's device
        attack.fit_prior(know, know.model_at(obs.state).eval() if attack.prior_uses_target else None)
    return attack, obs, know


def _snapshot(model: nn.Module) -> dict:
    return {"training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "state": {k: (v.device, v.detach().clone().cpu()) for k, v in model.state_dict().items()}}


def _tensor_devices(obj, seen=None) -> set[str]:
    """The device types of every tensor reachable in ``obj`` (containers, dataclasses, modules)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, nn.Module):
        return {t.device.type for t in [*obj.parameters(), *obj.buffers()]}
    if isinstance(obj, dict):
        return set().union(*(_tensor_devices(v, seen) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(_tensor_devices(v, seen) for v in obj))
    if hasattr(obj, "__dataclass_fields__"):
        return set().union(*(_tensor_devices(getattr(obj, f), seen) for f in obj.__dataclass_fields__))
    return set()


def _run(name: str, digits, device: str):
    x, y = digits
    attack, obs, know = _case(name, x, y, device)
    before = _snapshot(know.model)
    rec = attack.reconstruct(obs, know)
    assert rec.inputs.device.type == "cpu" and (rec.labels is None or rec.labels.device.type == "cpu")
    assert _tensor_devices(rec) <= {"cpu"}, name
    assert torch.isfinite(rec.inputs).all() and 0 <= rec.inputs.min() and rec.inputs.max() <= 1
    # the knowledge travels back with the outcome: its model is where, and as, the caller left it
    assert _tensor_devices(know) <= {"cpu"}, name
    after = _snapshot(know.model)
    assert after["training"] == before["training"] and after["requires_grad"] == before["requires_grad"]
    for k, (dev, v) in before["state"].items():
        assert after["state"][k][0] == dev and torch.equal(after["state"][k][1], v), (name, k)
    if hasattr(attack, "prior_state_dict"):  # what the prior cache stores
        assert _tensor_devices(attack.prior_state_dict()) == {"cpu"}
    pickle.loads(pickle.dumps((rec, know)))  # what a Ray task sends back
    return rec


ALL = sorted(ATTACKS)


def test_every_registered_attack_has_a_tiny_case():
    assert set(ALL) == {"dlg", "idlg", "inverting_gradients", "analytic", "imprint", "rmle", "inverse_network",
                        "unsplit", "fsha", "mi_face", "gmi", "kedmi", "plgmi", "deepinversion", "hitaj"}


@pytest.mark.parametrize("name", ALL)
def test_attack_on_cpu_returns_cpu_tensors_and_leaves_the_knowledge_as_it_was(name, digits):
    _run(name, digits, "cpu")


#: what a computation on ``meta`` raises where it needs data (a number, a mask, a copy to the CPU): everything
#: before it ran on the knowledge's device without a device mismatch
NO_DATA = ("cannot be called on meta tensors", "Cannot copy out of meta tensor", "torch.nonzero()",
           "meta device type tensor to numpy")


@pytest.mark.parametrize("name, labels_known", [(n, False) for n in ALL] + [("inverting_gradients", True)])
def test_attack_on_another_device_mixes_in_no_cpu_tensor(name, labels_known, digits):
    """The tiny case built on the CPU, then ``knowledge.device`` set as fl_sim sets it for a GPU task
    (``fl_sim.attacking.run_on``), here to ``meta``: the attack runs until it first needs data, and no CPU
    tensor from the observation, the knowledge or its own draws meets a device tensor on the way (the error
    CUDA raises). With the labels known, inverting gradients runs its whole optimisation loop there."""
    x, y = digits
    attack, obs, know = _case(name, x, y, "cpu")
    know.device = "meta"
    if labels_known:
        know.labels = y[:2].clone()
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)) as raised:
        attack.reconstruct(obs, know)
    assert any(s in str(raised.value) for s in NO_DATA), f"{name}: {raised.value}"
    assert _tensor_devices(know) <= {"cpu"}, name  # the caller's model and data stay where they were


def test_device_moving_helpers_put_everything_on_the_knowledge_device():
    """On ``meta`` (no data, but any CPU tensor mixed in raises as CUDA would): the bounds, the model under
    attack, the replayed update against its target, GradInversion's BatchNorm prior with targets from the
    observation, and the GAN networks a prior trains."""
    from attacks.generative import Critic, Generator, gradient_penalty, train_wgan_gp
    from attacks.matching import BatchNormPrior, UpdateSimulator, batchnorm_targets, cosine_distance

    torch.manual_seed(0)
    model = _bn_model(10)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    obs = fedsgd(model.train(), x, y)  # on the CPU, as the server observed it
    know = Knowledge(model, (1, 8, 8), 10, num_examples=2, batch_size=2, device="meta")
    assert {t.device.type for t in know.bounds()} == {"meta"}
    attacked = know.model_at(obs.before)
    assert _tensor_devices(attacked) == {"meta"} and _tensor_devices(model) == {"cpu"}
    sim = UpdateSimulator(attacked, know)
    target = sim.target(obs)
    prior = BatchNormPrior(attacked, batchnorm_targets(attacked, obs, know.local_steps))
    xm = torch.randn(2, 1, 8, 8).to("meta").requires_grad_(True)
    loss = cosine_distance(sim(xm, y.to("meta")), target) + prior.loss()
    assert loss.device.type == "meta" and all(t.device.type == "meta" for t in target)
    g, d = Generator(8, (1, 8, 8), 4).to("meta"), Critic((1, 8, 8), 4).to("meta")
    fake = g(torch.randn(3, 8).to("meta"))
    assert gradient_penalty(d, fake.detach(), fake.detach(), torch.Generator().manual_seed(0)).device.type == "meta"
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):  # the losses it reports, at the end
        train_wgan_gp(g, d, torch.rand(8, 1, 8, 8).to("meta"), steps=1, batch_size=4, critic_steps=1)


def test_label_leakage_scores_gradients_from_any_device():
    g = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    assert direction_scoring(g, 3).shape == (12,) and set(norm_scoring(g)) <= {0, 1}


# ------------------------------------------------------------------------------------------- on a GPU

@cuda
@pytest.mark.parametrize("name", ALL)
def test_attack_on_cuda_computes_there_and_hands_back_cpu_tensors(name, digits):
    rec = _run(name, digits, "cuda")
    ref = _run(name, digits, "cpu")
    assert rec.inputs.shape == ref.inputs.shape
    if name in ("analytic", "imprint"):  # closed form: the same images up to float rounding
        torch.testing.assert_close(rec.inputs, ref.inputs, atol=1e-4, rtol=1e-4)


@cuda
def test_fsha_networks_live_on_the_setup_device_and_its_gradient_returns_to_the_client(digits):
    x, _ = digits
    bottom, _ = split_model(build_model("lenet", (1, 8, 8), 10), "body.1")
    fsha = FSHA(hidden=16, batch_size=8)
    fsha.setup(copy.deepcopy(bottom), (1, 8, 8), x[300:332], device="cuda")
    assert _tensor_devices(fsha._decoder) == {"cuda"} and _tensor_devices(fsha._pilot) == {"cuda"}
    a = bottom(x[:8])
    assert fsha.hijack(a).device.type == "cpu"  # back to the client's side
    assert fsha.hijack(a.cuda()).device.type == "cuda"


@cuda
def test_label_leakage_on_cuda_gradients_matches_the_cpu():
    g = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(direction_scoring(g.cuda(), 3), direction_scoring(g, 3))
    assert np.array_equal(norm_scoring(g.cuda()), norm_scoring(g))
