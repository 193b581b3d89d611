"""Config: the packaged Hydra tree composes; bad values and bad overrides give one clear line."""

import subprocess
import sys

import pytest

from fl_sim.cli import precheck
from fl_sim.config import ConfigError
from fl_sim.validation import validate


def test_default_config_is_cnn_on_mnist_10_clients_5_rounds_with_a_malicious_server_robbing_client_0(compose):
    cfg = compose()
    assert (cfg.dataset.name, cfg.model.name, cfg.num_clients, cfg.num_rounds) == ("mnist", "cnn", 10, 5)
    assert cfg.strategy.name == "fedavg" and cfg.defense.name == "none" and cfg.client.local_epochs == 3
    a = cfg.attack
    assert (a.name, a.bins, a.gain, list(a.target_clients), list(a.rounds)) == ("imprint", 4096, 0.03, [0], [1])
    assert compose(["attack=imprint"]).attack.gain == 1e-7  # the one-step / SecAgg+ setting keeps its own
    assert compose(["attack=inverting_gradients_short"]).attack.iterations == 20
    assert compose(["attack=inverting_gradients"]).attack.iterations == 1000  # the full attack keeps its default
    # the learning rate is the model's unless set
    assert cfg.client.lr == cfg.model.lr == 0.1 and compose(["model=mlp"]).client.lr == 0.05
    assert compose(["client.lr=0.01"]).client.lr == 0.01
    validate(cfg)


@pytest.mark.parametrize("group,options", [
    ("dataset", ["mnist", "digits", "cifar10_samples", "cifar_pickle", "mnist_idx", "huggingface"]),
    ("model", ["mlp", "lenet", "convnet", "resnet18", "cnn"]),
    ("partition", ["iid", "dirichlet", "pathological"]),
    ("strategy", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum"]),
    ("attack", ["none", "dlg", "idlg", "inverting_gradients", "analytic", "imprint"]),
    ("defense", ["none", "dpsgd", "central_dp", "local_dp", "prune", "quantize", "noise", "secagg"]),
])
def test_every_documented_group_option_composes(compose, group, options):
    for opt in options:
        assert compose([f"{group}={opt}"])[group].name == opt


@pytest.mark.parametrize("override,message", [
    ("num_clients=0", "num_clients must be at least 1"),
    ("num_rounds=0", "num_rounds must be at least 1"),
    ("strategy.fraction_train=1.5", r"strategy.fraction_train must be in \(0, 1\]"),
    ("strategy.fraction_train=0", r"strategy.fraction_train must be in \(0, 1\]"),
    ("client.batch_size=0", "client.batch_size must be at least 1"),
    ("client.lr=0", "client.lr must be > 0"),
    ("backend.client_resources.num_cpus=0", "backend.client_resources.num_cpus must be > 0"),
    ("backend.client_resources.num_gpus=-1", "backend.client_resources.num_gpus must be >= 0"),
    ("device=tpu", "device='tpu' is not known"),
    ("dataset.test_fraction=1.0", r"dataset.test_fraction must be in \(0, 1\)"),
    ("client.optimizer=lbfgs", "client.optimizer='lbfgs' is not known"),
    ("strategy.min_train_clients=11", "strategy.min_train_clients=11 exceeds num_clients=10"),
    ("attack.target_clients=[10]", r"attack.target_clients=\[10\]: \[10\] are not clients \(clients are 0..9\)"),
    ("attack.rounds=[6]", r"attack.rounds=\[6\]: \[6\] are not rounds"),
    ("attack.iterations=0", "attack.iterations must be at least 1"),
    ("attack.workers=-1", "attack.workers must be >= 0"),
    ("attack=analytic", "attack=analytic needs a model whose first layer is fully connected; use model=mlp"),
    ("defense=prune defense.prune_ratio=1.0", r"defense.prune_ratio must be in \[0, 1\)"),
    ("defense=[dpsgd,prune] defense.accountant=gdp", "defense.accountant='gdp' is not known"),
    ("defense=dpsgd defense.delta=0", r"defense.delta must be in \(0, 1\)"),
    ("defense=dpsgd defense.grad_sample_mode=fast", "defense.grad_sample_mode='fast' is not known"),
    ("defense=dpsgd attack=none strategy=fedprox strategy.proximal_mu=0.1", "use strategy.proximal_mu=0"),
    ("defense=quantize defense.quantize_bits=0", "defense.quantize_bits must be in 1..16"),
    ("defense=central_dp strategy=krum", "defense=central_dp needs an averaging strategy"),
    ("defense=[secagg,dpsgd]", "defense=secagg stacks with prune, quantize and noise only"),
    ("defense=secagg strategy=fedmedian", "defense=secagg runs Flower's FedAvg under SecAgg"),
    ("defense=secagg defense.secagg_num_shares=2", "defense.secagg_num_shares as a count must be at least 3"),
    ("defense=secagg defense.secagg_reconstruction_threshold=2.5", "must be a count"),
    ("defense=[local_dp,dpsgd]", "protect different neighbours"),
    ("defense=local_dp defense.local_epsilon=0", "defense.local_epsilon must be > 0"),
    ("client.dropout=1.0", r"client.dropout must be in \[0, 1\)"),
])
def test_bad_value_gives_error_naming_the_key(compose, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(override.split()))


def test_defenses_stack_and_name_themselves(compose):
    from fl_sim.validation import active_defenses, defense_name

    cfg = compose(["defense=[prune,dpsgd]", "defense.prune_ratio=0.2"])
    assert active_defenses(cfg) == ["dpsgd", "prune"] and defense_name(cfg) == "dpsgd+prune"
    assert cfg.defense.prune_ratio == 0.2 and cfg.defense.noise_multiplier == 1.0
    assert defense_name(compose([])) == "none"


@pytest.mark.parametrize("override,fragment", [
    ("model=foo", "Could not find 'model/foo'; available options in 'model': cnn; convnet"),
    ("num_clients=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("foo=1", "Key 'foo' not in 'Config'"),
    ("client.batchsize=3", "Key 'batchsize' not in 'ClientConfig'"),
])
def test_unknown_option_key_or_type_is_one_line(override, fragment):
    err = precheck([override])
    assert err is not None and fragment in err and "\n" not in err


def test_cli_bad_input_exits_nonzero_with_one_line_and_no_traceback(tmp_path):
    for args in (["model=foo"], ["num_clients=0"]):
        p = subprocess.run([sys.executable, "-m", "fl_sim", *args, f"hydra.run.dir={tmp_path}/r"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("fl-sim: error:"), p.stderr
        assert "Traceback" not in p.stderr + p.stdout
    # a value error is caught after the run directory exists: it records the failure
    import json

    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "failed" and "num_clients" in s["error"]


def test_importing_fl_sim_turns_telemetry_off_unless_the_user_set_it():
    code = ("import os; import fl_sim; "
            "print(os.environ['FLWR_TELEMETRY_ENABLED'], os.environ['RAY_USAGE_STATS_ENABLED'], "
            "os.environ['FLWR_DISABLE_UPDATE_CHECK'], os.environ['HF_HUB_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED", "FLWR_DISABLE_UPDATE_CHECK",
                        "HF_HUB_DISABLE_TELEMETRY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["0", "0", "1", "1"]
    env["RAY_USAGE_STATS_ENABLED"] = "1"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split()[1] == "1"
