"""FSHA (Pasquini et al., CCS 2021): a malicious split-learning server hijacks the client's training."""

import copy

import pytest
import torch

from attacks import Knowledge
from attacks.fsha import FSHA
from attacks.registry import make_attack
from attacks.rmle import ActivationObservation
from fl_sim.metrics import score
from fl_sim.models import build_model, split_model

# Faster than the paper's MNIST setting (server lr 1e-5 / 1e-4, gradient penalty 500, client lr 1e-5,
# 10,000 iterations), which here is still at the mean-image baseline (11.5 dB) after 2,000 steps.
FAST = dict(lr_encoder=1e-3, lr_discriminator=1e-3, gradient_penalty=10.0, hidden=256, seed=0)


@pytest.fixture
def one_thread():
    """The numbers below were measured on one thread; restore the caller's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _psnr(truth: torch.Tensor, images: torch.Tensor) -> float:
    return score(truth.numpy(), images.numpy(), torch.zeros(len(truth)).numpy(), None, labels_given=True)["psnr_mean"]


def test_fsha_hijacked_client_is_inverted_by_the_servers_decoder(digits, one_thread):
    """DLG's LeNet on 8x8 digits, cut after its first layer (12x4x4 activations). The client trains only
    on what the server sends back (Adam, lr 1e-3, batches of 64 from 800 private digits); the server
    holds 897 other digits. After 1,000 steps the decoder inverts fresh private activations.

    Measured (1 thread, FSHA seed 0): mean-image baseline 11.5 dB; step 0 (untrained decoder) 6.6 dB;
    after 1,000 steps 17.5 dB (FSHA seeds 1-3: 16.7, 16.6, 17.1 dB; after 800 steps, seeds 0-1: 16.7,
    15.4 dB); the same trained decoder on the client's activations before the hijack 7.8 dB; ~15 s of
    CPU (10-40 s wall on a shared 2-core machine)."""
    x, _ = digits
    private, auxiliary = x[:800], x[900:]
    fresh = x[800:832]  # private digits the client never trained on
    torch.manual_seed(0)
    bottom, _ = split_model(build_model("lenet", (1, 8, 8), 10), "body.1")
    before_hijack = copy.deepcopy(bottom)  # the client as it was: to show it is the hijack that leaks
    knowledge = Knowledge(bottom, (1, 8, 8), 10)

    def reconstruct(client):
        with torch.no_grad():
            return fsha.reconstruct(ActivationObservation(client(fresh)), knowledge)

    fsha = FSHA(**FAST)
    fsha.setup(bottom, (1, 8, 8), auxiliary)
    step0 = _psnr(fresh, reconstruct(bottom).inputs)
    opt = torch.optim.Adam(bottom.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(1000):  # the client's side of split learning, with a malicious server
        a = bottom(private[torch.randint(len(private), (64,), generator=gen)])
        g = fsha.hijack(a)
        assert g.shape == a.shape
        opt.zero_grad()
        a.backward(g)
        opt.step()
    rec = reconstruct(bottom)
    after = _psnr(fresh, rec.inputs)
    unhijacked = _psnr(fresh, reconstruct(before_hijack).inputs)
    baseline = _psnr(fresh, auxiliary.mean(0, keepdim=True).expand_as(fresh))

    assert fsha.steps == 1000 and rec.info["hijack_steps"] == 1000
    assert rec.inputs.shape == fresh.shape and 0 <= rec.inputs.min() and rec.inputs.max() <= 1
    assert after >= baseline + 4, (after, baseline)
    assert after >= step0 + 8, (after, step0)
    assert after >= unhijacked + 5, (after, unhijacked)


def test_fsha_reconstruct_before_setup_is_one_clear_error():
    fsha = make_attack("fsha")
    obs = ActivationObservation(torch.zeros(2, 12, 4, 4))
    with pytest.raises(ValueError, match=r"fsha.reconstruct\(\) needs fsha.setup"):
        fsha.reconstruct(obs, Knowledge(torch.nn.Identity(), (1, 8, 8), 10))
    with pytest.raises(ValueError, match=r"fsha.hijack\(\) needs fsha.setup"):
        fsha.hijack(obs.activations)


@pytest.mark.parametrize("name,shape,cut", [("mlp", (1, 8, 8), "net.2"),  # 2-D activations (B, 200)
                                            ("cnn", (1, 28, 28), "body.2")])  # 4-D (B, 32, 14, 14), MNIST-sized
def test_fsha_handles_flat_and_convolutional_activations_and_is_deterministic(name, shape, cut, one_thread):
    torch.manual_seed(0)
    bottom, _ = split_model(build_model(name, shape, 10), cut)
    aux = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(2):
        fsha = FSHA(**{**FAST, "hidden": 32, "batch_size": 8})
        fsha.setup(bottom, shape, aux)
        pilot = list(fsha._pilot.parameters())
        assert all(not torch.equal(p, q) for p, q in zip(pilot, bottom.parameters()))  # re-initialised, not copied
        a = bottom(x)
        grads.append([fsha.hijack(a) for _ in range(3)])
        rec = fsha.reconstruct(ActivationObservation(a.detach()), Knowledge(bottom, shape, 10))
        assert rec.inputs.shape == x.shape and rec.info["hijack_steps"] == 3
    for g0, g1 in zip(*grads):
        assert g0.shape == a.shape and torch.equal(g0, g1)  # same seed, same gradients sent back (CPU)
    assert grads[0][1].abs().sum() > 0


def test_fsha_continues_from_its_state_dict_exactly(digits):
    """A checkpointed hijacker resumes as if never stopped: same gradients after the restore."""
    import io

    x, _ = digits
    bottom, _ = split_model(build_model("lenet", (1, 8, 8), 10), "body.1")
    a = bottom(x[:16]).detach()
    first = FSHA(lr_encoder=1e-3, lr_discriminator=1e-3, gradient_penalty=10.0)
    first.setup(bottom, (1, 8, 8), x[100:400])
    for _ in range(3):
        first.hijack(a)
    buffer = io.BytesIO()  # through a checkpoint's file format: no pickled objects, only tensors and numbers
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    second = FSHA(lr_encoder=1e-3, lr_discriminator=1e-3, gradient_penalty=10.0)
    second.setup(bottom, (1, 8, 8), x[100:400])
    second.load_state_dict(state)
    for _ in range(2):
        assert torch.equal(first.hijack(a), second.hijack(a))
    assert second.steps == first.steps == 5
