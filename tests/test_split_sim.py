"""scenario=split on the real Flower simulation (Ray), and its config checks (no Ray)."""

import numpy as np
import pytest
import torch

from fl_sim.config import ConfigError
from fl_sim.validation import validate
from fl_sim.runner import run

SPLIT = ["dataset=digits", "scenario=split", "client.lr=0.1", "client.local_epochs=1", "attack=none"]


@pytest.mark.e2e
def test_splitfed_with_dpsgd_learns_accounts_epsilon_and_rmle_still_inverts_the_activations(compose, tmp_path):
    """Clients in parallel, client-side models averaged by FedAvg, the client-side model trained with
    DP-SGD (Opacus): the loss falls and each client's ε composes its Poisson steps. What DP-SGD does not
    cover: the activations, which rMLE inverts from the weights the server averaged."""
    from defenses.accounting import epsilon

    s = run(compose(SPLIT + ["model=cnn", "num_clients=2", "num_rounds=2", "scenario.mode=splitfed",
                             "defense=dpsgd", "defense.noise_multiplier=1.0", "attack=rmle", "attack.iterations=300",
                             "attack.rounds=[2]", "attack.workers=0"]), tmp_path / "run")
    assert s["status"] == "completed" and s["config"]["scenario"]["cut_layer"] == "body.1"
    losses = [r["train_loss"] for r in s["rounds"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert s["rounds"][-1]["test_accuracy"] > 0.5
    (attack,) = s["attacks"]
    assert attack["observed"] == "activations" and attack["round"] == 2 and attack["batch_size"] > 0
    assert attack["psnr"] > 30, attack  # the cnn's first conv+ReLU: 2,048 numbers for 64 pixels
    assert (tmp_path / "run" / attack["picture"]).exists()
    n = len(s["data"]["clients"])
    for cid, c in s["privacy"]["clients"].items():
        size = s["data"]["clients"][int(cid)]["size"]
        steps = -(-size // 32)  # one epoch of Poisson draws a round
        assert c["rounds"] == [1, 2]
        assert c["epsilon"] == pytest.approx(epsilon([(1.0, c["sample_rate"], steps)] * 2, 1e-5, "rdp"), rel=1e-6)
    assert n == 2 and s["privacy"]["mechanism"] == "dpsgd"


@pytest.mark.parametrize("overrides, says", [
    (["scenario=split", "scenario.mode=ring"], "scenario.mode"),
    (["scenario=split", "attack=dlg"], "attack=dlg"),
    (["attack=rmle"], "scenario=split"),
    (["defense=cut_noise"], "scenario=split"),
    (["scenario=split", "defense=prune"], "split learning does not send"),
    (["scenario=split", "defense=[dpsgd,nopeek]"], "nopeek"),
    (["scenario=split", "attack=inverse_network", "attack.auxiliary_fraction=0"], "attack.auxiliary_fraction"),
    (["scenario=split", "defense=cut_dropout", "defense.cut_dropout_p=1"], "defense.cut_dropout_p"),
])
def test_split_configs_that_cannot_work_are_refused_naming_the_key(compose, overrides, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[")):
        validate(compose(["attack=none"] + overrides))


def test_an_invalid_cut_fails_before_ray_with_one_line_naming_the_valid_cuts(compose, tmp_path):
    cfg = compose(SPLIT + ["model=lenet", "scenario.cut_layer=conv9"])
    with pytest.raises(ConfigError, match=r"scenario.cut_layer='conv9'.*choose one of body.0, body.1"):
        run(cfg, tmp_path / "run")
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "failed" and "conv9" in s["error"] and "\n" not in s["error"]


def test_cut_defenses_are_seeded_per_step_so_the_client_recomputes_what_it_sent(compose):
    from fl_sim.split.cut import at_the_cut

    cfg = compose(SPLIT + ["defense=[cut_noise,cut_dropout]"])
    a = torch.ones(4, 3, 5, 5)
    sent = at_the_cut(cfg, a, 1, 0, 7)
    assert torch.equal(sent, at_the_cut(cfg, a, 1, 0, 7))
    assert not torch.equal(sent, at_the_cut(cfg, a, 1, 0, 8))
    only_dropout = at_the_cut(compose(SPLIT + ["defense=cut_dropout"]), a, 1, 0, 7)
    assert 0.3 < (only_dropout == 0).float().mean() < 0.7  # p = 0.5
    assert set(only_dropout.unique().tolist()) <= {0.0, 2.0}  # kept entries scaled by 1/(1-p)


def test_default_cut_is_after_the_first_non_linearity():
    from fl_sim.models import build_model
    from fl_sim.split.cut import default_cut

    assert default_cut(build_model("lenet", (1, 8, 8), 10)) == "body.1"
    assert default_cut(build_model("mlp", (1, 8, 8), 10, hidden=(16,))) == "net.2"
    assert default_cut(build_model("cnn", (1, 28, 28), 10)) == "body.1"


def test_the_split_server_hands_activation_attacks_what_they_need_and_the_evaluator_scores_the_batch(compose):
    """The server side without Ray: the observed batch goes to inverse_network with the attacker's own
    data (attack.auxiliary_fraction) and the client-side weights sent; the evaluator scores it against
    exactly that batch of the client's data."""
    from fl_sim.evaluator import evaluate_outcome
    from fl_sim.metrics import psnr
    from fl_sim.split.cut import batch_plan
    from fl_sim.split.server import SplitServer
    from fl_sim.workspace import initial_model, workspace
    from strategies.adversarial import run_jobs_sequentially

    cfg = compose(SPLIT + ["model=lenet", "scenario.cut_layer=body.1", "num_clients=2", "attack=inverse_network",
                           "attack.iterations=100"])
    validate(cfg)
    data = workspace(cfg, "server").data
    assert data.x_aux is not None and len(data.x_aux) > 100  # set aside, held by no client
    server = SplitServer(cfg, initial_model(cfg, data), data, recorder=None)
    x, y = (torch.from_numpy(a) for a in data.client(0))
    batch = batch_plan(len(x), 1, 32, cfg.seed, 1, 0)[0]
    with torch.no_grad():
        a = server.bottom(x[torch.from_numpy(batch)])
    assert server.attacked(1, 0, 0) and not server.attacked(1, 1, 0) and not server.attacked(1, 0, 1)
    server.observe(1, 0, 0, a, y[torch.from_numpy(batch)], server.client_side.state_dict(), batch)
    (job,) = server.jobs
    assert job.knowledge.auxiliary_inputs is not None and job.observed == "activations"
    entry = evaluate_outcome(run_jobs_sequentially(server.attack, server.jobs)[0], data, "inverse_network", None)
    truth = (x[torch.from_numpy(batch)].numpy() * data.std[0] + data.mean[0]).clip(0, 1)
    baseline = psnr(truth, np.broadcast_to(truth.mean(0, keepdims=True), truth.shape))
    assert entry["batch_size"] == 32 and entry["psnr"] > baseline + 3, (entry["psnr"], baseline)


def test_fsha_through_the_split_server_hijacks_the_client_and_its_decoder_improves_over_steps(compose):
    """The malicious split server: its gradient() is FSHA's hijacking gradient; the client trains its
    bottom on it (as client_split_step does); the targeted batch is decoded at once, better with steps."""
    from fl_sim.evaluator import evaluate_outcome
    from fl_sim.split.cut import split
    from fl_sim.split.server import SplitServer
    from fl_sim.workspace import initial_model, workspace

    cfg = compose(SPLIT + ["model=lenet", "scenario.cut_layer=body.1", "num_clients=2", "attack=fsha"])
    validate(cfg)
    data = workspace(cfg, "server").data
    server = SplitServer(cfg, initial_model(cfg, data), data, recorder=None)
    client = initial_model(cfg, data)
    bottom = split(cfg, client)[0]["bottom"]
    opt = torch.optim.Adam(bottom.parameters(), lr=1e-3)
    x, y = (torch.from_numpy(a) for a in data.client(0))
    probe = torch.arange(32)
    scores = []
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for step in range(601):
        if step % 300 == 0:
            with torch.no_grad():
                a = bottom(x[probe])
            server.observe(1, 0, 0, a, y[probe], {f"bottom.{k}": v for k, v in bottom.state_dict().items()},
                           probe.numpy())
            scores.append(evaluate_outcome(server.outcomes.pop(), data, "fsha", None)["psnr"])
        idx = torch.randint(len(x), (64,), generator=gen)
        a = bottom(x[idx])
        g = server.gradient(a, y[idx])
        assert g.shape == a.shape and server.attack.steps == step + 1
        opt.zero_grad()
        a.backward(g)
        opt.step()
    assert scores[-1] > scores[1] > scores[0] + 3, scores  # measured 8.6, 14.9, 19.4 dB at steps 0, 300, 600


@pytest.mark.e2e
def test_u_shaped_split_keeps_labels_on_the_client_trains_exactly_and_still_leaks_them(compose, tmp_path):
    """Label-private U-shape: the client keeps the head and its labels; per batch the server returns its
    output and receives the gradient there. Still plain SGD's arithmetic; yet those gradients reveal the
    classes (direction scoring, Li et al. 2022)."""
    from fl_sim.sampling import round_seed
    from fl_sim.workspace import initial_model, workspace
    from fl_sim.training import evaluate, local_train

    cfg = compose(SPLIT + ["model=mlp", "model.hidden=[32,16]", "scenario.cut_layer=net.2",
                           "scenario.head_layer=net.4", "num_clients=1", "num_rounds=1", "client.batch_size=64",
                           "attack=label_leakage"])
    s = run(cfg, tmp_path / "run")
    assert s["status"] == "completed"
    ws = workspace(cfg, "server")
    model = initial_model(cfg, ws.data)
    x, y = (torch.from_numpy(a) for a in ws.data.client(0))
    local_train(model, x, y, epochs=1, batch_size=64, lr=0.1,
                generator=torch.Generator().manual_seed(round_seed(cfg.seed, 1, 0)))
    test_loss, _ = evaluate(model, *(torch.from_numpy(a) for a in (ws.data.x_test, ws.data.y_test)))
    assert s["rounds"][0]["test_loss"] == pytest.approx(test_loss, abs=1e-5)
    (attack,) = s["attacks"]
    assert attack["observed"] == "cut_gradients" and attack["psnr"] is None and attack["batch_size"] == 64
    assert attack["label_accuracy"] >= 0.8, attack  # chance (one cluster) is about 0.1


def test_the_u_shape_is_three_parts_that_compose_to_the_model_and_a_bad_head_layer_is_refused(compose):
    from fl_sim.models import build_model
    from fl_sim.split.cut import split

    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16))
    client, middle = split(compose(SPLIT + ["scenario.cut_layer=net.2", "scenario.head_layer=net.4"]), model)
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(client["head"](middle(client["bottom"](x))), model(x))
    with pytest.raises(ConfigError, match=r"scenario.head_layer='net.1'.*choose one of net.3, net.4"):
        split(compose(SPLIT + ["scenario.cut_layer=net.2", "scenario.head_layer=net.1"]), model)
    with pytest.raises(ConfigError, match="scenario.head_layer"):
        validate(compose(SPLIT + ["attack=label_leakage"]))
