"""Model inversion of a trained model: the attacks on small real targets (sklearn's 8x8 digits, private
classes 0-4, public 5-9), the class division, the evaluator's protocol, the cache, and that nothing an
attack receives holds private data."""

import numpy as np
import pytest
import torch
from torch import nn

from attacks import Knowledge, ModelObservation, make_attack
from attacks.base import Reconstruction
from fl_sim.models import build_model
from fl_sim.training import evaluate, local_train


@pytest.fixture(scope="module")
def setting(digits):
    """A 5-class target trained on classes 0-4, the attacker's public classes 5-9, and a judge trained on
    all ten classes (an MLP: another architecture than the targets)."""
    x, y = digits
    mean, std = float(x.mean()), float(x.std())
    xn = (x - mean) / std
    private = y < 5
    xp, yp, xa = xn[private], y[private], xn[~private]
    perm = torch.randperm(len(yp), generator=torch.Generator().manual_seed(0))
    train, test = perm[: int(0.8 * len(perm))], perm[int(0.8 * len(perm)):]
    torch.manual_seed(0)
    target = build_model("cnn", (1, 8, 8), 5, hidden=(64,))
    local_train(target, xp[train], yp[train], epochs=25, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    judge = build_model("mlp", (1, 8, 8), 10, hidden=(128,))
    local_train(judge, xn, y, epochs=30, batch_size=32, lr=0.1, generator=torch.Generator().manual_seed(1))
    know = Knowledge(model=target, input_shape=(1, 8, 8), num_classes=5, mean=(mean,), std=(std,),
                     auxiliary_inputs=xa)
    return {"target": target, "know": know, "judge": judge, "mean": mean, "std": std,
            "accuracy": evaluate(target, xp[test], yp[test])[1]}


def judge_accuracy(s, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((s["judge"]((images - s["mean"]) / s["std"]).argmax(1) == labels).float().mean())


def observe(model: nn.Module) -> ModelObservation:
    return ModelObservation({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_the_tiny_target_learns_its_five_private_classes(setting):
    assert setting["accuracy"] > 0.95


def test_mi_face_reconstructions_beat_random_images_under_the_judge(setting):
    rec = make_attack("mi_face", iterations=300, per_class=4).reconstruct(observe(setting["target"]), setting["know"])
    assert rec.inputs.shape == (20, 1, 8, 8) and rec.labels.tolist() == [c for c in range(5) for _ in range(4)]
    assert 0 <= rec.inputs.min() and rec.inputs.max() <= 1
    noise = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    assert judge_accuracy(setting, rec.inputs, rec.labels) >= judge_accuracy(setting, noise, rec.labels) + 0.3


def test_gmi_with_its_gan_prior_beats_random_latents_of_the_same_generator(setting):
    gmi = make_attack("gmi", iterations=200, restarts=2, per_class=4, width=16, gan_steps=150, gan_batch_size=32)
    losses = gmi.fit_prior(setting["know"])
    assert np.isfinite(losses["critic_loss"]) and np.isfinite(losses["generator_loss"])
    rec = gmi.reconstruct(observe(setting["target"]), setting["know"])
    assert rec.inputs.shape == (20, 1, 8, 8)
    with torch.no_grad():
        random_images = gmi.generator(torch.randn(20, gmi.latent_dim, generator=torch.Generator().manual_seed(3)))
    assert judge_accuracy(setting, rec.inputs, rec.labels) >= judge_accuracy(setting, random_images, rec.labels) + 0.2


@pytest.mark.parametrize("name, kwargs", [
    ("kedmi", dict(iterations=200, per_class=4, width=16, gan_steps=100, gan_batch_size=32, critic_steps=3)),
    ("plgmi", dict(iterations=150, restarts=2, per_class=4, width=16, gan_steps=100, gan_batch_size=32, critic_steps=2)),
])
def test_target_aware_gan_attacks_beat_random_latents_of_their_generator(setting, name, kwargs):
    """KEDMI's and PLG-MI's priors are trained with the target (soft labels, pseudo-labels): they take it."""
    attack = make_attack(name, **kwargs)
    assert attack.prior_uses_target
    attack.fit_prior(setting["know"], setting["target"])
    rec = attack.reconstruct(observe(setting["target"]), setting["know"])
    assert rec.inputs.shape == (20, 1, 8, 8) and rec.labels.tolist() == [c for c in range(5) for _ in range(4)]
    z = torch.randn(20, attack.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        random_images = attack.generator(z, rec.labels) if name == "plgmi" else attack.generator(z)
    assert judge_accuracy(setting, rec.inputs, rec.labels) >= judge_accuracy(setting, random_images, rec.labels) + 0.2


def test_bfloat16_precision_computes_the_forward_passes_in_bfloat16_and_the_attack_still_works(setting):
    """``precision="bfloat16"``: the target's convolutions (and the GAN's) run in bfloat16 under autocast, the
    latents stay float32, the prior's cache key says so (a float32 key is as before), and GMI with its
    bfloat16-trained prior still beats random latents of its generator by the float32 test's margin."""
    gmi = make_attack("gmi", iterations=200, restarts=2, per_class=4, width=16, gan_steps=150, gan_batch_size=32,
                      precision="bfloat16")
    assert gmi.prior_key()["precision"] == "bfloat16"
    assert "precision" not in make_attack("gmi").prior_key()
    gmi.fit_prior(setting["know"])
    critic_dtypes, target_dtypes = [], []
    critic_hook = gmi.discriminator.body[0].register_forward_hook(lambda m, i, o: critic_dtypes.append(o.dtype))
    # the attack copies the architecture in knowledge.model (frozen_model_at): the hook goes with the copy
    target_hook = next(m for m in setting["know"].model.modules() if isinstance(m, nn.Conv2d)).register_forward_hook(
        lambda m, i, o: target_dtypes.append(o.dtype))
    try:
        rec = gmi.reconstruct(observe(setting["target"]), setting["know"])
    finally:
        critic_hook.remove()
        target_hook.remove()
    # every step in bfloat16; the final pass that picks the best restart in float32
    assert target_dtypes and set(target_dtypes[:-1]) == {torch.bfloat16} and target_dtypes[-1] == torch.float32
    assert critic_dtypes and critic_dtypes[0] == torch.bfloat16
    assert rec.inputs.dtype == torch.float32 and torch.isfinite(rec.inputs).all()
    with torch.no_grad():
        random_images = gmi.generator(torch.randn(20, gmi.latent_dim, generator=torch.Generator().manual_seed(3)))
    assert judge_accuracy(setting, rec.inputs, rec.labels) >= judge_accuracy(setting, random_images, rec.labels) + 0.2


def test_the_config_check_knows_the_attacks_precisions():
    """fl_sim.validation keeps its own copy (it imports no torch): the two lists must agree."""
    from attacks.base import PRECISIONS
    from fl_sim.validation import PRECISIONS as CHECKED
    assert CHECKED == PRECISIONS


def test_an_unknown_precision_is_refused_by_the_attack():
    with pytest.raises(ValueError, match="precision='float16': one of float32, bfloat16"):
        make_attack("mi_face", iterations=2, precision="float16").reconstruct(
            ModelObservation(build_model("mlp", (1, 8, 8), 5, hidden=(8,)).state_dict()),
            Knowledge(model=build_model("mlp", (1, 8, 8), 5, hidden=(8,)), input_shape=(1, 8, 8), num_classes=5))


def test_plgmi_augmentations_are_drawn_per_image_and_stay_images():
    """PLG-MI's augmentations (crop, rotation, brightness/contrast): each image its own draw, in [0, 1],
    the same draws for the same seed; digits are never mirrored."""
    from attacks.plgmi import augment

    digit = torch.zeros(1, 1, 28, 28)
    digit[..., 4:24, 18:22] = 1.0  # a stroke on the right: a mirror image would put it on the left
    batch = digit.repeat(16, 1, 1, 1)
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    assert len({tuple(o.flatten().tolist()) for o in out}) == 16  # no two images got the same draw
    assert torch.equal(out, augment(batch, torch.Generator().manual_seed(0)))
    left, right = out[..., :14].sum(dim=(1, 2, 3)), out[..., 14:].sum(dim=(1, 2, 3))
    assert bool((right > 3 * left).all())  # crops and rotations of at most 5 degrees keep the stroke right


def test_deepinversion_needs_batchnorm_and_beats_noise_on_a_batchnorm_target(setting, digits):
    with pytest.raises(ValueError, match="BatchNorm"):
        make_attack("deepinversion", iterations=2).reconstruct(observe(setting["target"]), setting["know"])
    x, y = digits
    xn = (x - setting["mean"]) / setting["std"]
    torch.manual_seed(0)
    bn_target = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 64, 5))
    local_train(bn_target, xn[y < 5], y[y < 5], epochs=10, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    know = Knowledge(model=bn_target, input_shape=(1, 8, 8), num_classes=5, mean=(setting["mean"],),
                     std=(setting["std"],))
    rec = make_attack("deepinversion", iterations=300, per_class=4).reconstruct(observe(bn_target), know)
    noise = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    assert judge_accuracy(setting, rec.inputs, rec.labels) >= judge_accuracy(setting, noise, rec.labels) + 0.3


def test_target_classes_limit_what_is_reconstructed(setting):
    know = Knowledge(**{**setting["know"].__dict__, "target_classes": (1, 3)})
    rec = make_attack("mi_face", iterations=20, per_class=2).reconstruct(observe(setting["target"]), know)
    assert rec.labels.tolist() == [1, 1, 3, 3]


# --------------------------------------------------------------------------- fl_sim: division, evaluator, cache

def _cfg(compose, tmp_path, *extra):
    cfg = compose(["dataset=digits", "model=cnn", "model.hidden=[64]", "num_clients=3", "num_rounds=1",
                   "attack=gmi", "attack.gan_steps=20", "attack.gan_width=8", "attack.gan_batch_size=16",
                   "attack.iterations=10", "attack.restarts=1", "attack.per_class=2", f"cache_dir={tmp_path / 'cache'}",
                   *extra])
    from fl_sim.validation import validate

    validate(cfg)
    return cfg


def test_disjoint_classes_give_clients_the_private_classes_and_the_attacker_the_rest(compose, tmp_path):
    from fl_sim.workspace import workspace

    data = workspace(_cfg(compose, tmp_path, "attack.private_classes=[2,5,7]"), "server").data
    assert data.num_classes == 3 and data.dataset_labels == (2, 5, 7)
    assert set(np.unique(data.y_train)) == {0, 1, 2} and set(np.unique(data.y_test)) == {0, 1, 2}
    assert set(np.unique(data.y_aux)) == {0, 1, 3, 4, 6, 8, 9}
    assert set(np.unique(data.y_test_all)) == set(range(10))
    rows = {r.tobytes() for r in data.x_train}
    assert not any(r.tobytes() in rows for r in data.x_aux)  # the attacker holds none of the clients' images
    default = workspace(_cfg(compose, tmp_path), "server").data
    assert default.dataset_labels == (0, 1, 2, 3, 4) and set(np.unique(default.y_aux)) == {5, 6, 7, 8, 9}


class FakeRecorder:
    def __init__(self, run_dir):
        self.run_dir, self.rounds, self.attacks, self.extra_timing = run_dir, [{"test_accuracy": 0.9}], [], {}
        self.model_inversion = None

    def attack(self, entry):
        self.attacks.append(entry)


def test_the_final_model_stage_scores_with_the_protocol_and_never_hands_private_data_to_the_attack(
        compose, tmp_path, monkeypatch):
    """A spy attack records what it is given: nothing of it is a private training image; the evaluator's
    entry carries the protocol's fields, one picture per class; a second run loads the cached prior."""
    import fl_sim.inversion as inversion
    from fl_sim.workspace import initial_model, workspace

    cfg = _cfg(compose, tmp_path)
    ws = workspace(cfg, "server")
    private_rows = {r.tobytes() for r in ws.data.x_train}
    seen = []
    real_make = inversion.attack_from_config

    def spying(a):
        attack = real_make(a)
        real_reconstruct, real_fit = attack.reconstruct, attack.fit_prior

        def reconstruct(observation, knowledge, progress=None):
            seen.append(("reconstruct", observation, knowledge))
            return real_reconstruct(observation, knowledge, progress)

        def fit_prior(knowledge, target=None, progress=None):
            seen.append(("fit_prior", None, knowledge))
            return real_fit(knowledge, target, progress)

        attack.reconstruct, attack.fit_prior = reconstruct, fit_prior
        return attack

    monkeypatch.setattr(inversion, "attack_from_config", spying)
    state = initial_model(cfg, ws.data).state_dict()
    rec1 = FakeRecorder(tmp_path)
    inversion.attack_final_model(cfg, ws, state, rec1)
    assert [s[0] for s in seen] == ["fit_prior", "reconstruct"]
    for _, observation, knowledge in seen:
        aux = knowledge.auxiliary_inputs.numpy()
        assert not any(r.tobytes() in private_rows for r in aux)
        assert knowledge.labels is None and knowledge.target_classes == (0, 1, 2, 3, 4)
        if observation is not None:
            assert set(observation.state) == set(state)  # the model's weights, nothing else
    entry = rec1.attacks[0]
    assert entry["observed"] == "model" and entry["target_classes"] == [0, 1, 2, 3, 4] and entry["batch_size"] == 10
    for key in ("attack_accuracy", "attack_accuracy_top5", "knn_distance", "feature_fid", "nearest_psnr",
                "nearest_ssim"):
        assert np.isfinite(entry[key]), key
    assert 0 <= entry["attack_accuracy"] <= entry["attack_accuracy_top5"] <= 1
    assert len(entry["pictures"]) == 5 and all((tmp_path / p).stat().st_size > 1000 for p in entry["pictures"])
    mi = rec1.model_inversion
    assert mi["division"]["public_classes"] == [5, 6, 7, 8, 9] and mi["prior"]["cached"] is False
    assert mi["evaluation_classifier"]["test_accuracy"] > 0.8 and mi["evaluation_classifier"]["classes"] == 10
    assert rec1.extra_timing["prior_training_seconds"] > 0

    seen.clear()
    rec2 = FakeRecorder(tmp_path)
    inversion.attack_final_model(cfg, ws, state, rec2)
    assert [s[0] for s in seen] == ["reconstruct"]  # the prior came from the cache: no training
    assert rec2.model_inversion["prior"]["cached"] is True and rec2.extra_timing["prior_training_seconds"] == 0
    assert rec2.model_inversion["evaluation_classifier"]["cached"] is True
    assert rec2.attacks[0]["attack_accuracy"] == entry["attack_accuracy"]  # same prior, same seed: same result


def test_a_participant_attacks_the_classes_it_lacks_in_the_rounds_it_is_sampled(compose, tmp_path, monkeypatch):
    """attack.on=client: client 1 of a pathological partition holds two private classes and attacks the three
    it lacks, only in the attacked rounds it is sampled, from the public data (never a client's image)."""
    import fl_sim.inversion as inversion
    from fl_sim.workspace import initial_model, workspace

    cfg = _cfg(compose, tmp_path, "attack.on=client", "attack.attacker_client=1", "partition=pathological",
               "partition.classes_per_client=2", "num_rounds=3", "attack.rounds=[2,3]")
    ws = workspace(cfg, "server")
    own = inversion.attacker_holds(cfg, ws.data)
    assert own == sorted(set(ws.data.y_train[ws.data.partitions[1]].tolist())) and len(own) == 2
    lacking = [c for c in range(5) if c not in own]
    private_rows = {r.tobytes() for r in ws.data.x_train}
    seen = []
    real_make = inversion.attack_from_config

    def spying(a):
        attack = real_make(a)
        real_reconstruct = attack.reconstruct

        def reconstruct(observation, knowledge, progress=None):
            seen.append(knowledge)
            return real_reconstruct(observation, knowledge, progress)

        attack.reconstruct = reconstruct
        return attack

    monkeypatch.setattr(inversion, "attack_from_config", spying)
    rec = FakeRecorder(tmp_path)
    spy = inversion.participant_attack(cfg, ws, rec)
    assert rec.model_inversion["on"] == "client" and rec.model_inversion["division"]["attacker_classes"] == own
    assert not spy.wants(1, [0, 1, 2])  # not an attacked round
    assert not spy.wants(2, [0, 2])  # not sampled: it receives nothing
    assert spy.wants(2, [1, 2]) and spy.wants(3, [1])
    state = initial_model(cfg, ws.data).state_dict()
    first = spy.attack(2, state)
    assert first["round"] == 2 and first["model_round"] == 1 and first["attacker_client"] == 1
    assert first["target_classes"] == lacking and first["batch_size"] == 2 * len(lacking)
    assert 0 <= first["target_test_accuracy"] <= 1 and 0 <= first["attack_accuracy"] <= 1
    assert first["pictures"] == [f"inversion_gmi_round2_class{c}.png" for c in lacking]
    assert all((tmp_path / p).stat().st_size > 1000 for p in first["pictures"])
    spy.attack(3, state)
    assert [e["round"] for e in rec.attacks] == [2, 3] and rec.model_inversion["rounds_attacked"] == [2, 3]
    assert rec.model_inversion["prior"]["cached"] is True  # GMI's prior is the public data's: trained once
    for knowledge in seen:  # what the attacker holds: the public classes, no client's image
        assert knowledge.target_classes == tuple(lacking)
        assert not any(r.tobytes() in private_rows for r in knowledge.auxiliary_inputs.numpy())
    spy.finish()
    assert rec.model_inversion["target"]["test_accuracy"] == 0.9  # the last round's (FakeRecorder)
    assert rec.extra_timing["model_inversion_seconds"] == pytest.approx(sum(e["seconds"] for e in rec.attacks))


def test_hitaj_s_generator_learns_the_target_s_classes_and_keeps_learning_from_round_to_round(setting):
    """Hitaj et al.'s generator against the trained target: before training the target puts its samples in
    the wanted classes at about chance; after a round of steps almost always; the generator is kept."""
    target, know = setting["target"], Knowledge(**{**setting["know"].__dict__, "target_classes": (2, 3, 4)})
    attack = make_attack("hitaj", iterations=150, lr=1e-3, per_class=10, width=8, seed=0)

    def hit_rate(images, labels):
        with torch.no_grad():
            return float((target((images - setting["mean"]) / setting["std"]).argmax(1) == labels).float().mean())

    before = hit_rate(*attack.samples(10, know))
    rec = attack.reconstruct(observe(target), know)
    assert rec.labels.tolist() == [2] * 10 + [3] * 10 + [4] * 10 and 0 <= rec.inputs.min() <= rec.inputs.max() <= 1
    after = hit_rate(rec.inputs, rec.labels)
    assert before < 0.6 and after > 0.9, (before, after)
    g = attack.generator
    attack.reconstruct(observe(target), know)
    assert attack.generator is g and attack.steps == 300  # the same generator, trained on


def test_a_resumed_active_participant_goes_on_exactly_as_an_uninterrupted_one(compose, tmp_path):
    """Hitaj's generator, its optimiser and its step count go into the round's checkpoint (through
    ``checkpoint.save``/``load``, weights only): the attacker rebuilt from it in a resumed run attacks and
    injects in the next round exactly as the one that was never interrupted."""
    from fl_sim import checkpoint, inversion
    from fl_sim.workspace import initial_model, workspace

    cfg = _cfg(compose, tmp_path, "attack=hitaj", "partition=pathological", "partition.classes_per_client=2",
               "attack.attacker_client=1", "attack.injected=3", "num_rounds=2")
    ws = workspace(cfg, "server")
    state = initial_model(cfg, ws.data).state_dict()
    for d in ("whole", "resumed", "fresh", "ck"):
        (tmp_path / d).mkdir()
    whole = inversion.participant_attack(cfg, ws, FakeRecorder(tmp_path / "whole"))
    whole.attack(1, state)
    checkpoint.save(tmp_path / "ck", server_round=1, config={}, model=state, extra={"participant": whole.state()})
    resumed = inversion.participant_attack(cfg, ws, FakeRecorder(tmp_path / "resumed"))
    resumed.restore(checkpoint.load(tmp_path / "ck")["extra"]["participant"])
    assert resumed.persistent.steps == whole.persistent.steps == 10
    a, b = whole.attack(2, state), resumed.attack(2, state)
    assert a["generator_steps"] == b["generator_steps"] == 20
    assert (a["attack_accuracy"], a["knn_distance"]) == (b["attack_accuracy"], b["knn_distance"])
    ga, gb = whole.persistent.generator.state_dict(), resumed.persistent.generator.state_dict()
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    (xa, ya), (xb, yb) = whole.injection(), resumed.injection()
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and len(ya) == 3 * len(a["target_classes"])
    fresh = inversion.participant_attack(cfg, ws, FakeRecorder(tmp_path / "fresh"))  # what resume did before
    fresh.attack(2, state)
    gf = fresh.persistent.generator.state_dict()
    assert any(not torch.equal(ga[k], gf[k]) for k in ga)


@pytest.mark.usefixtures("task_identity")  # tests/conftest.py: Messages need one
def test_the_active_participant_s_samples_change_what_it_uploads(compose, tmp_path):
    """The client trains on its own data plus the injected, fake-labelled samples: another update."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fl_sim.client import client_train
    from fl_sim.malicious import INJECTED_KEY
    from fl_sim.protocol import train_config
    from fl_sim.workspace import initial_model, workspace

    cfg = _cfg(compose, tmp_path, "attack=hitaj", "partition=pathological", "partition.classes_per_client=2")
    ws = workspace(cfg, "client")
    state = initial_model(cfg, ws.data).state_dict()
    content = {"arrays": ArrayRecord(state), "config": ConfigRecord(dict(train_config(cfg, 1)))}

    def upload(extra: dict) -> tuple[dict, int]:
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
        reply = client_train(cfg, Message(RecordDict({**content, **extra}), dst_node_id=1, message_type="train"), ctx)
        return reply.content["arrays"].to_torch_state_dict(), int(reply.content["metrics"]["num-examples"])

    plain, n = upload({})
    again, _ = upload({})
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # the same seed: the same update
    x = torch.rand(6, 1, 8, 8)
    injected, n_injected = upload({INJECTED_KEY: ArrayRecord({"inputs": x, "labels": torch.zeros(6, dtype=torch.int64)})})
    assert n_injected == n + 6
    assert any(not torch.equal(plain[k], injected[k]) for k in plain)


def test_knn_distance_and_feature_fid_are_zero_for_the_private_images_themselves():
    from fl_sim.metrics import frechet_distance, nearest

    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 6))
    d2, idx = nearest(f[:10], f)
    assert np.allclose(d2, 0) and idx.tolist() == list(range(10))
    assert frechet_distance(f, f) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(f, f + 3.0) == pytest.approx(6 * 9.0, rel=1e-6)  # ||Δμ||² with equal covariances


def test_a_reconstruction_that_looks_like_a_public_class_is_a_miss(compose, tmp_path):
    """The judge knows every class: public images offered as reconstructions of private classes score ~0."""
    from fl_sim.evaluation_classifier import evaluation_classifier
    from fl_sim.evaluator import evaluate_model_inversion
    from fl_sim.workspace import workspace

    data = workspace(_cfg(compose, tmp_path), "server").data
    judge = evaluation_classifier(data, 0, str(tmp_path / "cache"))
    public = data.x_aux[:20] * data.std[None, :, None, None] + data.mean[None, :, None, None]
    fake = Reconstruction(torch.from_numpy(np.clip(public, 0, 1)), torch.arange(5).repeat_interleave(4))
    entry = evaluate_model_inversion(fake, data, judge, attack_name="copy_public", server_round=1, seconds=0.0,
                                     run_dir=None)
    assert entry["attack_accuracy"] <= 0.1
    own = np.flatnonzero(data.y_train == 2)[:4]  # and private images of their own class score as hits
    real = Reconstruction(torch.from_numpy(np.clip(data.x_train[own] * data.std[None, :, None, None]
                                                   + data.mean[None, :, None, None], 0, 1)), torch.full((4,), 2))
    entry = evaluate_model_inversion(real, data, judge, attack_name="copy_private", server_round=1, seconds=0.0,
                                     run_dir=None)
    assert entry["attack_accuracy"] == 1.0 and entry["knn_distance"] == pytest.approx(0, abs=1e-6)
    assert entry["nearest_psnr"] == 100.0


@pytest.mark.e2e
def test_a_participant_inverts_each_round_s_global_model_in_the_simulation(compose, tmp_path):
    """attack.on=client on the real simulation: one entry per round, the report's round-by-round table."""
    from fl_sim.runner import run

    cfg = compose(["dataset=digits", "model=mlp", "model.hidden=[32]", "num_clients=3", "num_rounds=2",
                   "client.local_epochs=1", "partition=pathological", "partition.classes_per_client=2",
                   "attack=gmi", "attack.on=client", "attack.attacker_client=2", "attack.gan_steps=20",
                   "attack.gan_width=8", "attack.gan_batch_size=16", "attack.iterations=20", "attack.restarts=1",
                   "attack.per_class=1", f"cache_dir={tmp_path / 'c'}"])
    s = run(cfg, tmp_path / "run")
    held = s["data"]["division"]["attacker_classes"]
    assert held == [c for c in range(5) if s["data"]["clients"][2]["labels"][c] > 0]
    assert [e["round"] for e in s["attacks"]] == [1, 2] and all(e["attacker_client"] == 2 for e in s["attacks"])
    assert all(e["target_classes"] == [c for c in range(5) if c not in held] for e in s["attacks"])
    # round 2's entry scores the model after round 1: its test accuracy is round 1's
    assert s["attacks"][1]["target_test_accuracy"] == pytest.approx(s["rounds"][0]["test_accuracy"])
    assert s["model_inversion"]["rounds_attacked"] == [1, 2]
    assert all(r["attack_seconds"] > 0 for r in s["rounds"])  # the participant's attack is part of its round
    assert s["model_inversion"]["target"]["test_accuracy"] == s["rounds"][-1]["test_accuracy"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "model inversion by a participant, round by round" in report
    assert all(f"inversion_gmi_round2_class{c}.png" in report for c in s["attacks"][1]["target_classes"])


@pytest.mark.e2e
def test_an_active_participant_trains_its_generator_round_after_round_in_the_simulation(compose, tmp_path):
    """attack=hitaj on the real simulation: its generator goes on learning across rounds, its samples reach
    its own training, and every round is scored."""
    from fl_sim.runner import run

    cfg = compose(["dataset=digits", "model=mlp", "model.hidden=[32]", "num_clients=3", "num_rounds=2",
                   "client.local_epochs=1", "partition=pathological", "partition.classes_per_client=2",
                   "attack=hitaj", "attack.attacker_client=1", "attack.iterations=10", "attack.gan_width=8",
                   "attack.per_class=2", "attack.injected=4", f"cache_dir={tmp_path / 'c'}"])
    s = run(cfg, tmp_path / "run")
    held, entries = s["data"]["division"]["attacker_classes"], s["attacks"]
    assert [e["round"] for e in entries] == [1, 2] and [e["generator_steps"] for e in entries] == [10, 20]
    lacking = [c for c in range(5) if c not in held]
    assert all(e["target_classes"] == lacking and e["injected"] == 4 * len(lacking) for e in entries)
    assert s["model_inversion"]["fake_class"] == held[0] and "an active participant" in s["model_inversion"]["attacker"]
    assert s["status"] == "completed" and len(s["rounds"]) == 2


@pytest.mark.e2e
def test_fl_sim_attack_gmi_inverts_the_final_global_model_of_a_federated_run(compose, tmp_path):
    """The real simulation on Ray, then GMI on the final global model: summary.json, report and pictures."""
    import json

    from fl_sim.runner import run

    cfg = compose(["dataset=digits", "model=cnn", "model.hidden=[64]", "num_clients=3", "num_rounds=2",
                   "attack=gmi", "attack.gan_steps=30", "attack.gan_width=8", "attack.gan_batch_size=16",
                   "attack.iterations=30", "attack.restarts=1", "attack.per_class=2", f"cache_dir={tmp_path / 'c'}",
                   "save_model=true"])
    s = run(cfg, tmp_path / "run")
    from fl_sim.training import evaluate
    from fl_sim.workspace import initial_model, workspace

    ws = workspace(cfg, "server")  # final_model.pt is the final global model: its accuracy is the last round's
    model = initial_model(cfg, ws.data)
    model.load_state_dict(torch.load(tmp_path / "run" / "final_model.pt", weights_only=True))
    x_test, y_test = ws.test_tensors()
    assert evaluate(model, x_test.cpu(), y_test.cpu())[1] == s["rounds"][-1]["test_accuracy"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["status"] == "completed" and [r["round"] for r in s["rounds"]] == [1, 2]
    assert s["data"]["division"] == {"auxiliary": "disjoint_classes", "private_classes": [0, 1, 2, 3, 4],
                                     "public_classes": [5, 6, 7, 8, 9],
                                     "auxiliary_examples": s["model_inversion"]["division"]["auxiliary_examples"]}
    assert all(sum(c["labels"][5:]) == 0 for c in s["data"]["clients"] if len(c["labels"]) > 5) \
        and all(len(c["labels"]) == 5 for c in s["data"]["clients"])  # clients hold private classes only
    [entry] = s["attacks"]  # no attack on client updates: only the final model is attacked
    assert entry["observed"] == "model" and entry["round"] == 2 and entry["attack"] == "gmi"
    assert 0 <= entry["attack_accuracy"] <= 1 and entry["knn_distance"] >= 0
    assert s["model"]["classes"] == [0, 1, 2, 3, 4]
    assert s["model_inversion"]["target"]["test_accuracy"] == s["rounds"][-1]["test_accuracy"]
    assert {"prior_training_seconds", "model_inversion_seconds", "evaluation_classifier_seconds"} <= set(s["timing"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "model inversion of the final model" in report and "inversion_gmi_class0.png" in report
    assert all((tmp_path / "run" / p).stat().st_size > 1000 for p in entry["pictures"])


def test_a_target_aware_prior_is_cached_per_target_behaviour_not_only_its_weights(tmp_path):
    """MID's deployed model answers differently when it draws z than with its mean, with the same weights:
    a prior trained on its answers (KEDMI, PLG-MI) is not reused across the two."""
    from omegaconf import OmegaConf

    from defenses.inversion import add_bottleneck
    from fl_sim.inversion import prepare_prior

    class Stub:
        name, prior_uses_target, gan_steps = "stub", True, 1
        fits = 0

        def prior_key(self):
            return {"v": 1}

        def fit_prior(self, know, target, progress=None):
            Stub.fits += 1
            return {}

        def prior_state_dict(self):
            return {"w": torch.zeros(1)}

        def load_prior_state_dict(self, state, know):
            pass

    cfg = OmegaConf.create({"cache_dir": str(tmp_path)})
    torch.manual_seed(0)
    model = add_bottleneck(build_model("mlp", (1, 8, 8), 5, hidden=(16,)), sample_at_eval=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    know = Knowledge(model=model, input_shape=(1, 8, 8), num_classes=5, mean=(0.0,), std=(1.0,),
                     auxiliary_inputs=torch.zeros(4, 1, 8, 8))
    records = [prepare_prior(Stub(), know, state, cfg)]
    records.append(prepare_prior(Stub(), know, state, cfg))  # the same target: cached
    next(m for m in model.modules() if hasattr(m, "sample_at_eval")).sample_at_eval = False
    records.append(prepare_prior(Stub(), know, state, cfg))  # the same weights, answering with the mean
    assert [r["cached"] for r in records] == [False, True, False] and Stub.fits == 2
