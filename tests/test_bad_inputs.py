"""Bad input, as a user types it: every bad configuration or data file below gets one line on stderr
naming the key or the file, a non-zero exit, no traceback, and never starts Ray.

The cases go through the real CLI entry point (``fl_sim.cli.main``: the one-line precheck of the
composition, then the Hydra app around ``fl_sim.runner.run``) in this process, which is cheap; a
few at the end run ``python -m fl_sim`` in a subprocess to pin the real exit code and stderr.
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY = ["dataset=digits", "model=mlp", "model.hidden=[8]", "num_clients=3", "num_rounds=1", "attack=none"]


# --------------------------------------------------------------------------- bad files, written here

def _cifar_batch(path: Path, data=None, labels=None, n=4, **extra) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data
    labels = rng.integers(0, 10, n).tolist() if labels is None else labels
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, **extra}, f)


def _idx(path: Path, arr: np.ndarray, magic: bytes = b"\x00\x00\x08", gz: bool = False) -> None:
    raw = magic + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def _mnist_folder(root: Path, n=6, size=28, labels=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _idx(root / "train-images-idx3-ubyte", np.arange(n * size * size).reshape(n, size, size) % 256)
    _idx(root / "train-labels-idx1-ubyte", np.arange(n) % 3 if labels is None else labels)
    return root


def cifar(tmp: Path, make) -> list[str]:
    root = tmp / "cifar"
    root.mkdir()
    make(root / "data_batch_1")
    return ["dataset=cifar_pickle", f"dataset.path={root}", "model=mlp", "num_clients=2", "attack=none"]


def mnist(tmp: Path, spoil) -> list[str]:
    root = _mnist_folder(tmp / "mnist")
    spoil(root)
    return ["dataset=mnist_idx", f"dataset.path={root}", "model=mlp", "num_clients=2", "attack=none"]


def _truncate(path: Path, keep: int | None = None, drop: int = 0) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep is not None else raw[:-drop])


def _pickle_of(obj):
    return lambda p: p.write_bytes(pickle.dumps(obj))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


FILE_CASES = {  # name: (how to build the overrides in tmp_path, fragment of the error line)
    "cifar_not_a_pickle": (lambda t: cifar(t, lambda p: p.write_bytes(b"\x89PNG not a pickle at all")),
                           "data_batch_1 is not a readable CIFAR python batch"),
    "cifar_truncated_pickle": (lambda t: cifar(t, lambda p: (_cifar_batch(p), _truncate(p, drop=500))),
                               "data_batch_1 is not a readable CIFAR python batch"),
    "cifar_empty_file": (lambda t: cifar(t, lambda p: p.write_bytes(b"")),
                         "data_batch_1 is not a readable CIFAR python batch (EOFError"),
    "cifar_code_in_pickle": (lambda t: cifar(t, _pickle_of({b"data": _Evil(), b"labels": [1]})),
                             "data_batch_1 is not a readable CIFAR python batch (UnpicklingError: refusing to load "
                             "builtins.print)"),
    "cifar_not_a_dict": (lambda t: cifar(t, _pickle_of([1, 2, 3])), "data_batch_1 is not a readable CIFAR python batch "
                                                                     "(expected a dict, got list)"),
    "cifar_no_labels": (lambda t: cifar(t, _pickle_of({b"data": np.zeros((2, 3072), np.uint8)})), "no 'labels'"),
    "cifar_wrong_image_size": (lambda t: cifar(t, lambda p: _cifar_batch(p, data=np.zeros((4, 784), np.uint8))),
                               "data_batch_1 is not a readable CIFAR python batch (expected 'data' of shape (N, 3072)"),
    "cifar_label_count_mismatch": (lambda t: cifar(t, lambda p: _cifar_batch(p, labels=[1, 2])),
                                   "got (4, 3072) and 2"),
    "cifar_float_pixels": (lambda t: cifar(t, lambda p: _cifar_batch(p, data=np.full((4, 3072), 0.5))),
                           "data_batch_1 is not a readable CIFAR python batch ('data' must hold pixel values 0..255"),
    "cifar_string_labels": (lambda t: cifar(t, lambda p: _cifar_batch(p, labels=["cat", "dog", "cat", "cat"])),
                            "labels must be a list of integers"),
    "cifar_negative_labels": (lambda t: cifar(t, lambda p: _cifar_batch(p, labels=[0, -1, 2, 3])),
                              "data_batch_1 is not a readable CIFAR python batch (labels must be non-negative"),
    "idx_truncated": (lambda t: mnist(t, lambda r: _truncate(r / "train-images-idx3-ubyte", drop=100)),
                      "train-images-idx3-ubyte has 4604 data bytes, its header says 4704 (truncated"),
    "idx_header_truncated": (lambda t: mnist(t, lambda r: _truncate(r / "train-labels-idx1-ubyte", keep=6)),
                             "train-labels-idx1-ubyte is truncated (header incomplete)"),
    "idx_wrong_magic": (lambda t: mnist(t, lambda r: _idx(r / "train-images-idx3-ubyte", np.zeros((6, 28, 28)),
                                                          magic=b"\x1f\x8b\x08")),
                        "train-images-idx3-ubyte is not an unsigned-byte IDX file (bad magic number)"),
    "idx_float_dtype": (lambda t: mnist(t, lambda r: _idx(r / "train-images-idx3-ubyte", np.zeros((6, 28, 28)),
                                                          magic=b"\x00\x00\x0d")),
                        "train-images-idx3-ubyte is an IDX file of type 0x0D; fl-sim reads unsigned-byte"),
    "idx_label_count_mismatch": (lambda t: mnist(t, lambda r: _idx(r / "train-labels-idx1-ubyte", np.arange(5))),
                                 "holds (6, 28, 28)"),
    "idx_files_swapped": (lambda t: mnist(t, lambda r: _idx(r / "train-labels-idx1-ubyte", np.zeros((6, 28, 28)))),
                          "expected (N, H, W) images and N labels"),
    "idx_truncated_gzip": (lambda t: mnist(t, lambda r: (
        _idx(r / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28)), gz=True),
        (r / "train-images-idx3-ubyte").unlink(), _truncate(r / "train-images-idx3-ubyte.gz", drop=8))),
        "cannot read IDX file"),
    "idx_test_images_of_another_size": (lambda t: mnist(t, lambda r: (
        _idx(r / "t10k-images-idx3-ubyte", np.zeros((4, 20, 20))), _idx(r / "t10k-labels-idx1-ubyte", np.arange(4)))),
        "t10k-images-idx3-ubyte holds 20x20 images"),
    "idx_images_too_small_for_the_model": (lambda t: ["dataset=mnist_idx", "model=cnn", "model.hidden=[8]",
                                                      f"dataset.path={_mnist_folder(t / 'tiny', size=2)}",
                                                      "num_clients=2", "attack=none"],
                                           "model=cnn does not fit inputs of shape 1x2x2"),
    "data_path_missing": (lambda t: ["dataset=mnist_idx", f"dataset.path={t / 'nowhere'}", "attack=none"],
                          "dataset.path=" ),
    "data_path_not_given": (lambda t: ["dataset=cifar_pickle", "attack=none"], "dataset.path"),
    "data_folder_without_batches": (lambda t: ["dataset=cifar_pickle", f"dataset.path={t}", "attack=none"],
                                    "holds no CIFAR training batches"),
}

# --------------------------------------------------------------------------- bad configurations

CONFIG_CASES = {  # name: (overrides, fragment of the error line)
    # cross-device scale: FedProx's synthetic devices, cohorts
    "synthetic_image_model": (["dataset=synthetic"], "dataset=synthetic holds vectors of 60 features, not images"),
    "synthetic_attack": (["experiment=cross_device", "attack=dlg"], "use attack=none"),
    "synthetic_min_size": (["experiment=cross_device", "dataset.min_size=1"], "dataset.min_size must be at least 2"),
    "natural_partition_of_images": (["partition=natural", "attack=none"], "dataset=mnist has none"),
    "negative_pictures": (["attack.pictures=-1"], "attack.pictures must be >= 0"),
    "cohorts_under_secagg": (["defense=secagg", "backend.clients_per_node=2"], "cohorts are for federated runs"),
    # unknown group options, keys and types: refused while composing
    "unknown_dataset": (["dataset=nope"], "Could not find 'dataset/nope'; available options in 'dataset'"),
    "unknown_model": (["model=nope"], "Could not find 'model/nope'"),
    "unknown_attack": (["attack=nope"], "Could not find 'attack/nope'"),
    "unknown_defense": (["defense=nope"], "Could not find 'defense/nope'"),
    "unknown_strategy": (["strategy=nope"], "Could not find 'strategy/nope'"),
    "unknown_scenario": (["scenario=nope"], "Could not find 'scenario/nope'"),
    "unknown_key": (["nonexistent_key=1"], "Key 'nonexistent_key' not in 'Config'"),
    "unknown_nested_key": (["client.batchsize=3"], "Key 'batchsize' not in 'ClientConfig'"),
    "appended_key": (["+foo=1"], "foo is not a key of fl-sim's config"),
    "appended_nested_key": (["+client.bar=2"], "client.bar is not a key of fl-sim's config"),
    "int_given_text": (["num_clients=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    "float_given_text": (["client.lr=fast"], "Value 'fast' of type 'str' could not be converted to Float"),
    "smoothing_out_of_range": (TINY + ["defense=label_smoothing", "defense.smoothing=1.5"],
                               "defense.smoothing must be in [-1, 1)"),
    "mid_negative_beta": (TINY + ["defense=mid", "defense.mid_beta=-1"], "defense.mid_beta must be >= 0"),
    "mid_eval_unknown": (TINY + ["defense=mid", "defense.mid_eval=median"], "defense.mid_eval must be sample or mean"),
    "mid_with_ghost_clipping": (TINY + ["defense=[dpsgd,mid]", "defense.grad_sample_mode=ghost"],
                                "defense.grad_sample_mode=ghost computes Opacus' own cross-entropy"),
    "bido_with_dpsgd": (TINY + ["defense=[dpsgd,bido]"], "defense=bido's dependency term mixes the examples"),
    "bido_zero_sigma": (TINY + ["defense=bido", "defense.bido_sigma=0"], "defense.bido_sigma must be > 0"),
    "mid_in_split_learning": (["scenario=split", "dataset=digits", "model=mlp", "attack=none", "defense=mid"],
                              "defense=mid acts on the federated model"),
    "negative_seed": (TINY + ["seed=-1"], "seed=-1 is not a seed"),
    "negative_attack_seed": (TINY + ["attack.seed=-3"], "attack.seed=-3 is not a seed"),
    "zero_connect_timeout": (TINY + ["backend.connect_timeout=0"], "backend.connect_timeout must be > 0"),
    "list_given_int": (["attack.target_clients=3"], "target_clients"),
    # counts
    "zero_clients": (["num_clients=0"], "num_clients must be at least 1"),
    "negative_clients": (["num_clients=-3"], "num_clients must be at least 1"),
    "zero_rounds": (["num_rounds=0"], "num_rounds must be at least 1"),
    "zero_batch_size": (["client.batch_size=0"], "client.batch_size must be at least 1"),
    "zero_local_epochs": (["client.local_epochs=0"], "client.local_epochs must be at least 1"),
    "zero_eval_batch": (["eval_batch_size=0"], "eval_batch_size must be at least 1"),
    "zero_attack_iterations": (["attack=dlg", "attack.iterations=0"], "attack.iterations must be at least 1"),
    "more_clients_than_examples": (TINY + ["num_clients=5000"], "num_clients=5000 exceeds the"),
    # ranges
    "fraction_train_above_1": (["strategy.fraction_train=1.5"], "strategy.fraction_train must be in (0, 1]"),
    "dropout_certain": (["client.dropout=1"], "client.dropout must be in [0, 1)"),
    "no_test_split": (["dataset.test_fraction=0"], "dataset.test_fraction must be in (0, 1)"),
    "dirichlet_alpha_zero": (["partition=dirichlet", "partition.alpha=0"], "partition.alpha must be > 0"),
    "nan_lr": (["client.lr=nan"], "client.lr=nan is not a finite number"),
    "inf_lr": (["client.lr=inf"], "client.lr=inf is not a finite number"),
    "nan_noise": (["defense=dpsgd", "defense.noise_multiplier=nan"], "defense.noise_multiplier=nan is not a finite"),
    "negative_momentum": (["attack=none", "client.momentum=-0.5"], "client.momentum must be >= 0 (got -0.5)"),
    "negative_weight_decay": (["attack=none", "client.weight_decay=-1"], "client.weight_decay must be >= 0"),
    "zero_client_cpus": (["backend.client_resources.num_cpus=0"], "backend.client_resources.num_cpus must be > 0"),
    "negative_attack_gpus": (["attack=dlg", "attack.num_gpus=-0.5"], "attack.num_gpus must be >= 0"),
    "attack_gpus_on_cpu": (["attack=dlg", "attack.num_gpus=0.5", "device=cpu"],
                           "attack.num_gpus=0.5 with device=cpu: the attack workers would hold GPUs they do not use"),
    "client_cpus_above_ray_cpus": (["backend.num_cpus=1", "backend.client_resources.num_cpus=2"],
                                   "backend.client_resources.num_cpus=2.0 exceeds backend.num_cpus=1"),
    "unknown_device": (["device=tpu"], "device='tpu' is not known"),
    "unknown_activation": (TINY + ["model.activation=swish"], "model.activation='swish' is not known"),
    "unknown_optimizer": (["client.optimizer=lbfgs"], "client.optimizer='lbfgs' is not known"),
    "dp_delta_one": (["defense=dpsgd", "defense.delta=1"], "defense.delta must be in (0, 1)"),
    "prune_everything": (["defense=prune", "defense.prune_ratio=1"], "defense.prune_ratio must be in [0, 1)"),
    # attack targets and rounds
    "target_not_a_client": (["num_clients=3", "attack.target_clients=[7]"],
                            "attack.target_clients=[7]: [7] are not clients (clients are 0..2)"),
    "negative_target": (["attack.target_clients=[-1]"], "attack.target_clients=[-1]"),
    "attack_round_after_the_last": (["num_rounds=2", "attack.rounds=[3]"],
                                    "attack.rounds=[3]: [3] are not rounds (1..2)"),
    "attack_round_zero": (["attack.rounds=[0]"], "attack.rounds=[0]: [0] are not rounds"),
    # combinations of groups
    "split_cut_layer_missing": (TINY + ["scenario=split", "scenario.cut_layer=nope"],
                                "scenario.cut_layer='nope' is not a layer this model can be cut after"),
    "split_with_update_attack": (["scenario=split", "attack=dlg"], "attack=dlg attacks model updates"),
    "split_mode_unknown": (["scenario=split", "scenario.mode=relay"], "scenario.mode='relay' is not known"),
    "activation_attack_in_federated": (["attack=rmle"], "attack=rmle inverts split-learning activations"),
    "cut_defense_in_federated": (["defense=cut_noise"], "defense=cut_noise acts on split-learning activations"),
    "update_defense_in_split": (["scenario=split", "attack=none", "defense=prune"],
                                "defense=prune acts on model updates"),
    "analytic_on_a_cnn": (["attack=analytic", "model=cnn"], "attack=analytic needs a model whose first layer"),
    "replay_attack_with_adam": (["attack=dlg", "client.optimizer=adam"], "set client.optimizer=sgd"),
    "central_dp_with_median": (["defense=central_dp", "strategy=fedmedian"], "defense=central_dp needs an averaging"),
    "secagg_one_client": (["defense=secagg", "attack=none", "num_clients=1"],
                          "defense=secagg needs at least 2 clients sampled each round"),
    "secagg_one_sampled": (["defense=secagg", "attack=none", "num_clients=4", "strategy.fraction_train=0.25"],
                           "defense=secagg needs at least 2 clients sampled each round (got 1"),
    "secagg_threshold_above_clients": (["defense=secagg", "attack=none", "num_clients=5",
                                        "defense.secagg_reconstruction_threshold=6"],
                                       "defense.secagg_reconstruction_threshold=6 exceeds"),
    "secagg_shares_above_clients": (["defense=secagg", "attack=none", "num_clients=5", "defense.secagg_num_shares=7"],
                                    "defense.secagg_num_shares=7 exceeds the 5 clients sampled each round"),
    "secagg_with_dpsgd": (["defense=[secagg,dpsgd]"], "defense=secagg stacks with prune, quantize and noise only"),
    "dpsgd_with_fedprox": (["defense=dpsgd", "attack=none", "strategy=fedprox", "strategy.proximal_mu=0.1"],
                           "use strategy.proximal_mu=0"),
    "pathological_more_classes_than_exist": (TINY + ["partition=pathological", "partition.classes_per_client=11"],
                                             "partition.classes_per_client=11 exceeds the 10 classes"),
    "hf_without_a_name": (["dataset=huggingface", "attack=none"], "dataset=huggingface needs dataset.hf_name"),
    # model inversion of the trained model
    "model_inversion_without_public_classes": (TINY + ["attack=gmi", "attack.private_classes=[0,1,2,3,4,5,6,7,8,9]"],
                                               "leaves the attacker no public class of the 10"),
    "model_inversion_private_class_unknown": (TINY + ["attack=mi_face", "attack.private_classes=[3,12]"],
                                              "attack.private_classes=[3, 12] names classes the dataset does not have"),
    "model_inversion_target_not_private": (TINY + ["attack=mi_face", "attack.target_classes=[1,7]"],
                                           "attack.target_classes=[1, 7]: [7] are not private classes"),
    "deepinversion_without_batchnorm": (TINY + ["attack=deepinversion"],
                                        "attack=deepinversion matches the statistics stored in BatchNorm layers"),
    "deepinversion_under_dpsgd": (TINY + ["attack=deepinversion", "model=convnet", "defense=dpsgd"],
                                  "under defense=dpsgd (GroupNorm) has none"),
    "model_inversion_in_split": (["scenario=split", "attack=gmi"], "attack=gmi inverts the trained global model"),
    "model_inversion_split_auxiliary_without_fraction": (TINY + ["attack=gmi", "attack.auxiliary=split"],
                                                         "set attack.auxiliary_fraction in (0, 1)"),
    "model_inversion_on_unknown": (TINY + ["attack=gmi", "attack.on=rounds"], "attack.on='rounds' is not known"),
    "model_inversion_precision_unknown": (TINY + ["attack=gmi", "attack.precision=float16"],
                                          "attack.precision='float16' is not known; choose one of float32, bfloat16"),
    "precision_of_an_update_attack": (TINY + ["attack=dlg", "attack.precision=bfloat16"],
                                      "attack.precision=bfloat16 is for the model-inversion attacks"),
    "model_inversion_zero_per_class": (TINY + ["attack=mi_face", "attack.per_class=0"],
                                       "attack.per_class must be at least 1"),
    # a participant attacker (attack.on=client)
    "participant_that_is_not_a_client": (TINY + ["attack=gmi", "attack.on=client", "attack.attacker_client=7"],
                                         "attack.attacker_client=7 is not a client (clients are 0..2)"),
    "participant_holding_every_class": (TINY + ["attack=gmi", "attack.on=client"],
                                        "attack.on=client: client 0 holds every private class [0, 1, 2, 3, 4]"),
    "participant_targeting_its_own_class": (
        TINY + ["attack=gmi", "attack.on=client", "partition=pathological", "partition.classes_per_client=2",
                "attack.target_classes=[0,1,2,3,4]"], "itself; a participant attacks the classes it lacks"),
    "active_participant_relabelling_into_a_class_it_lacks": (
        TINY + ["attack=hitaj", "partition=pathological", "partition.classes_per_client=1", "attack.fake_class=4"],
        "attack.fake_class=4: client 0 does not hold it; an active participant labels its generated samples with a "
        "class of its own"),
    "hitaj_as_the_final_model_attack": (TINY + ["attack=hitaj", "attack.on=final"],
                                        "attack=hitaj is a participant that trains a GAN against each round's"),
    "active_participant_under_secagg": (TINY + ["attack=hitaj", "defense=secagg"],
                                        "fl-sim's SecAgg+ path does not carry"),
}


# --------------------------------------------------------------------------- the driver

@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every case must fail before the simulation: starting it (or Ray) fails the test."""
    import flwr.simulation
    import ray

    def refuse(*_a, **_k):
        raise AssertionError("a bad input reached the simulation")

    monkeypatch.setattr(flwr.simulation, "run_simulation", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def fl_sim_cli(args: list[str], run_dir: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """``fl-sim ARGS hydra.run.dir=RUN_DIR`` in this process: (exit code, stdout, stderr)."""
    from fl_sim import cli

    monkeypatch.setattr(sys, "argv", ["fl-sim", *args, f"hydra.run.dir={run_dir}"])
    # the Hydra app configures logging for its run; give the tests after this one their logging back
    loggers = [logging.getLogger(), logging.getLogger("fl_sim")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        for lg, handlers, level, propagate in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, fragment: str, run_dir: Path) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0, f"exit code 0; stdout: {out[-500:]}"
    assert len(lines) == 1, err
    assert lines[0].startswith("fl-sim: error:"), err
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err
    summary = run_dir / "summary.json"
    if summary.exists():  # the run started (its directory exists): the failure is recorded there too
        s = json.loads(summary.read_text())
        assert s["status"] == "failed" and s["error"] in lines[0], (s["error"], lines[0])
        assert s["rounds"] == []


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_configuration_is_one_line_naming_the_key(name, tmp_path, capsys, monkeypatch):
    overrides, fragment = CONFIG_CASES[name]
    run_dir = tmp_path / "run"
    assert_one_line_error(*fl_sim_cli(overrides, run_dir, capsys, monkeypatch), fragment, run_dir)


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_bad_data_file_is_one_line_naming_the_file(name, tmp_path, capsys, monkeypatch):
    make, fragment = FILE_CASES[name]
    overrides = make(tmp_path)
    run_dir = tmp_path / "run"
    code, out, err = fl_sim_cli(overrides, run_dir, capsys, monkeypatch)
    assert_one_line_error(code, out, err, fragment, run_dir)
    assert "this must never run" not in out + err  # cifar_code_in_pickle: the pickle's code did not run


def test_a_run_directory_that_cannot_be_created_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    run_dir = Path("/proc/fl_sim_cannot_be_here/run")  # not even root can create folders under /proc
    code, out, err = fl_sim_cli(TINY, run_dir, capsys, monkeypatch)
    assert_one_line_error(code, out, err, f"hydra.run.dir={run_dir}: cannot be created", run_dir)


def test_the_table_holds_at_least_30_cases():
    assert len(CONFIG_CASES) + len(FILE_CASES) >= 30


def test_no_module_unpickles_arbitrary_objects():
    """torch.load only with weights_only=True; pickles only through fl_sim.data's restricted unpickler."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offences = []
    for package in ("fl_sim", "attacks", "defenses", "strategies", "benchmarks"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(root)}:{node.lineno}"
                if (owner, node.func.attr) == ("torch", "load"):
                    safe = kw.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        offences.append(f"{where}: torch.load without weights_only=True")
                elif owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads"):
                    offences.append(f"{where}: {owner}.{node.func.attr}")
                elif (owner, node.func.attr) == ("np", "load") and "allow_pickle" in kw:
                    offences.append(f"{where}: np.load(allow_pickle=...)")
    assert offences == []


@pytest.mark.parametrize("name", ["cifar_truncated_pickle"])  # one real process; the table runs main() in-process
def test_real_cli_process_exits_2_with_one_line_and_no_traceback(name, tmp_path):
    """The console script's own process (``python -m fl_sim``), for a sample of the table."""
    make, fragment = FILE_CASES[name]
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "fl_sim", *make(tmp_path), f"hydra.run.dir={run_dir}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert_one_line_error(p.returncode, p.stdout, p.stderr, fragment, run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
