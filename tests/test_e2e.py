"""End to end on the real Flower simulation on Ray (kept few and small: each starts Ray)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LOOPBACK_NODE
from fl_sim.runner import run

pytestmark = pytest.mark.e2e

TINY = ["dataset=digits", "model=mlp", "model.hidden=[32]", "num_clients=3", "num_rounds=2", "client.lr=0.1",
        "client.local_epochs=1",
        "attack=none"]


TIMING = {"seconds", "attack_seconds"}


def _metrics(summary):
    """Everything a run measured, timing aside: with one seed on CPU it must be bit-identical (== on floats)."""
    rounds = [{k: v for k, v in r.items() if k not in TIMING} for r in summary["rounds"]]
    attacks = [{k: v for k, v in a.items() if k not in TIMING} for a in summary["attacks"]]
    return rounds, attacks, summary.get("attacks_skipped"), summary["privacy"]


def test_three_clients_two_rounds_write_summary_report_and_reproduce(compose, tmp_path):
    cfg = compose(TINY + ["backend.ray_address=null"])  # a local Ray instance of its own
    s1 = run(cfg, tmp_path / "a")
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["rounds"] == s1["rounds"]
    assert [r["round"] for r in s1["rounds"]] == [1, 2]
    for r in s1["rounds"]:
        assert set(r) >= {"round", "train_loss", "test_accuracy", "seconds"} and r["clients"] == [0, 1, 2]
    assert s1["rounds"][-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert s1["attacks"] == [] and s1["privacy"] is None
    assert set(s1["timing"]) >= {"total_seconds", "simulation_seconds", "attack_seconds"}
    assert s1["config"]["num_clients"] == 3 and len(s1["data"]["clients"]) == 3
    assert (tmp_path / "a" / "report.md").read_text().count("| 2 | 3 |") == 1
    assert (tmp_path / "a" / "training_curves.png").stat().st_size > 1000

    # same seed, run on another Ray instance (the shared cluster): same partitions, initial model, metrics
    s2 = run(compose(TINY), tmp_path / "b")
    assert s2["data"]["clients"] == s1["data"]["clients"]
    assert s2["model"]["initial_sha256"] == s1["model"]["initial_sha256"]
    # bit-identical summary.json metrics, every field but timing, as a user compares the two files
    m1 = _metrics(on_disk)
    assert set(m1[0][0]) >= {"round", "train_loss", "test_loss", "test_accuracy", "clients", "trained", "failures"}
    assert _metrics(json.loads((tmp_path / "b" / "summary.json").read_text())) == m1

    from fl_sim.recorder import RunRecorder
    from fl_sim.runner import prepare

    other = RunRecorder(compose(TINY + ["seed=1"]), tmp_path / "c")  # another seed: another initial model
    prepare(other.cfg, other)
    assert other.model_info["initial_sha256"] != s1["model"]["initial_sha256"]


def test_a_run_on_a_joined_cluster_crashing_midway_leaves_a_failed_summary_and_the_cluster(
        compose, ray_cluster, tmp_path, monkeypatch):
    """backend.ray_address: the run joins the cluster (`ray start --head` on loopback, tests' conftest).
    The server's central evaluation breaks in round 2: summary.json says failed, with the error, and
    keeps round 1; the cluster outlives the run (we joined it, not started our own)."""
    import fl_sim.server

    real = fl_sim.server.evaluate
    calls = []

    def evaluate_then_crash(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(fl_sim.server, "evaluate", evaluate_then_crash)
    with pytest.raises(Exception):
        run(compose(TINY + [f"backend.ray_address={ray_cluster}", "strategy=fedprox", "partition=dirichlet"]),
            tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and "disk on fire" in s["error"]
    assert [r["round"] for r in s["rounds"]] == [1]  # what finished is kept
    assert s["config"]["backend"]["ray_address"] == ray_cluster
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    status = subprocess.run([ray, "status", f"--address={ray_cluster}"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **LOOPBACK_NODE})  # the cluster listens on loopback only
    assert status.returncode == 0


def test_attack_inside_the_simulation_writes_entries_and_pictures(compose, tmp_path):
    """inverting_gradients on two clients per round, run in parallel as Ray tasks, each with half of the
    cluster's (declared) GPU: Ray schedules them on it, and each says which device it computed on."""
    cfg = compose(TINY + ["attack=inverting_gradients", "attack.iterations=20", "attack.target_clients=[0,2]",
                          "attack.workers=2", "attack.num_gpus=0.5"])
    s = run(cfg, tmp_path)
    entries = s["attacks"]
    assert [(a["round"], a["client"]) for a in entries] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    expected = {"round", "client", "attack", "observed", "batch_size", "psnr", "ssim", "label_accuracy",
                "iterations", "seconds"}
    for a in entries:
        assert expected <= set(a) and a["observed"] == "client_update" and a["iterations"] == 20
        assert a["batch_size"] == s["data"]["clients"][a["client"]]["size"]
        assert 5 < a["psnr"] < 40 and 0 <= a["label_accuracy"] <= 1
        assert (tmp_path / a["picture"]).stat().st_size > 1000
    assert s["timing"]["attack_seconds"] > 0
    assert "attack_round1_client0.png" in (tmp_path / "report.md").read_text()
    assert all(a["gpu_ids"] == ["0"] for a in entries)  # Ray gave each attack task its share of GPU 0
    assert all(a["threads"] == max(1, (os.cpu_count() or 1) // 2) for a in entries)  # two at once share the CPUs
    want = "cuda" if torch.cuda.is_available() else "cpu"  # device=auto: the GPU when torch sees one
    assert {a["device"] for a in entries} == {want} and s["devices"]["attacks"] == [want]
    assert s["devices"]["clients"] == ["cpu"] and s["devices"]["server"] == [want]
    assert f"| ran on | server {want}; clients cpu; attacks {want}" in (tmp_path / "report.md").read_text()


def test_dpsgd_budget_composes_over_rounds_and_stops_clients_at_max_epsilon(compose, tmp_path):
    """Each client's accountant history lives in its Flower context across rounds: ε after round 2
    composes both rounds; with max_epsilon between the 2- and 3-round ε, every client stops at round 3."""
    import math

    from defenses.accounting import epsilon

    cfg = compose(TINY + ["num_rounds=3", "defense=[dpsgd,prune]", "defense.max_epsilon=3.7", "client.batch_size=32"])
    s = run(cfg, tmp_path)
    p = s["privacy"]
    assert s["config"]["defense"]["name"] == "dpsgd+prune" and p["mechanism"] == "dpsgd" and p["delta"] == 1e-5
    eps_by_rounds = {}
    for c in s["data"]["clients"]:
        steps = math.ceil(c["size"] / 32)
        one = (1.0, 1 / steps, steps)
        eps_by_rounds[c["client"]] = [epsilon([one] * k, 1e-5) for k in (1, 2, 3)]
        assert eps_by_rounds[c["client"]][1] < 3.7 < eps_by_rounds[c["client"]][2]  # the test's premise
        reported = p["clients"][str(c["client"])]
        assert reported["rounds"] == [1, 2]
        assert reported["epsilon"] == pytest.approx(eps_by_rounds[c["client"]][1], rel=1e-6)
    per_round = [r["epsilon"] for r in p["epsilon_per_round"]]
    assert per_round[0] == pytest.approx(max(e[0] for e in eps_by_rounds.values()), rel=1e-6)
    assert per_round[1] > per_round[0] and per_round[2] == per_round[1]
    assert sorted(st["client"] for st in p["stopped"]) == [0, 1, 2] and {st["round"] for st in p["stopped"]} == {3}
    assert [r["trained"] for r in s["rounds"]] == [3, 3, 0]
    assert s["rounds"][2]["test_accuracy"] == s["rounds"][1]["test_accuracy"]  # nobody trained: model unchanged
    report = (tmp_path / "report.md").read_text()
    assert "stopped training at round 3" in report and "| 2 | 3.4" in report


def test_central_dp_through_flowers_wrappers_reports_flowers_epsilon(compose, tmp_path):
    """Client-side clipping (Flower's fixedclipping_mod in our mod chain, with quantisation), noise added
    by Flower's DifferentialPrivacyClientSideFixedClipping; ε equals Flower's own RDP accountant's."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    cfg = compose(TINY + ["num_clients=4", "defense=[central_dp,quantize]", "defense.central_side=client",
                          "defense.central_noise_multiplier=2.0", "defense.clipping_norm=5"])
    s = run(cfg, tmp_path)
    p = s["privacy"]
    assert s["status"] == "completed" and p["mechanism"] == "central_dp" and len(p["epsilon_per_round"]) == 2
    flower = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=4,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for r in p["epsilon_per_round"]:
        flower.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=4, population_size=4))
        assert r["epsilon"] == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)
    assert p["epsilon_per_round"][1]["epsilon"] > p["epsilon_per_round"][0]["epsilon"]


def test_cli_sweep_over_dp_noise_ends_with_a_report_across_runs(ray_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    task = [*TINY, "num_rounds=1", "defense=dpsgd", f"backend.ray_address={ray_cluster}"]
    p = subprocess.run([sys.executable, "-m", "fl_sim", "-m", *task, "defense.noise_multiplier=0,1.0",
                        f"hydra.sweep.dir={sweep}"],
                       capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr  # the CLI, from another folder: a table and the run folder per run
    assert "train loss" in p.stdout and "test acc" in p.stdout and f"run directory: {(sweep / '1').resolve()}" in p.stdout
    assert f"sweep report: {(sweep / 'sweep_report.md').resolve()}" in p.stdout
    runs = json.loads((sweep / "sweep.json").read_text())["runs"]
    eps = {r["params"]["defense.noise_multiplier"]: r["epsilon"] for r in runs}
    summaries = {float(json.loads((sweep / d / "summary.json").read_text())["config"]["defense"]["noise_multiplier"]):
                 json.loads((sweep / d / "summary.json").read_text())["privacy"]["epsilon"] for d in ("0", "1")}
    assert summaries[0.0] is None and summaries[1.0] > 0  # σ 0: ε infinite (null in summary.json)
    assert eps == {0.0: "inf", 1.0: summaries[1.0]}
    assert (sweep / "sweep_epsilon.png").stat().st_size > 1000

    again = subprocess.run([sys.executable, "-m", "fl_sim", "-m", *task, "defense.noise_multiplier=0,1.0",
                            f"hydra.sweep.dir={sweep}"],
                           capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already completed with this config: skipped") == 2  # no run is repeated
    assert "clients ready" not in again.stdout


def test_imprint_recovers_examples_exactly_from_each_client_and_still_from_a_secagg_aggregate(compose, tmp_path):
    """attack=imprint: the malicious server sends a model with an imprint block to the clients it attacks,
    one local step per client (FedSGD), and recovers examples of each client exactly; the global model
    stays the honest architecture and still learns.
    Under Flower's SecAgg+ (legacy workflow + secaggplus_mod) the global models equal plain FedAvg's
    within the protocol's quantisation; the server sees only the aggregate of the sampled clients and
    imprint still recovers examples of their union exactly (Fowl et al. 2022)."""
    from fl_sim.faults import drops_out

    common = TINY + ["num_clients=3", "attack=imprint", "attack.bins=1024", "attack.target_clients=[]",
                     "attack.rounds=[1]", "client.batch_size=1000", "attack.workers=0", "client.lr=0.5",
                     "client.dropout=0.3"]
    # seed 0: client 0 drops out of round 1, client 1 of round 2 (in SecAgg+ after the key sharing:
    # the protocol unmasks the aggregate of the others from the secret shares)
    dropped = {r: [c for c in range(3) if drops_out(0, r, c, 0.3)] for r in (1, 2)}
    assert dropped == {1: [0], 2: [1]}
    plain = run(compose(common), tmp_path / "plain")
    secure = run(compose(common + ["defense=secagg"]), tmp_path / "secagg")
    # round 1 (attacked): every client trains behind the same block in both; round 2: without SecAgg+ the
    # server sends the block to the rounds it attacks only, under SecAgg+ every round's model carries it
    for a, b, tol in zip(plain["rounds"], secure["rounds"], (1e-4, 1e-3)):
        assert b["test_loss"] == pytest.approx(a["test_loss"], abs=tol) and b["trained"] == a["trained"]
    assert [r["trained"] for r in secure["rounds"]] == [2, 2]
    # without SecAgg+ the global model is the honest architecture; under it the block is part of it
    assert plain["model"]["parameters"] < secure["model"]["parameters"]
    assert [(a["observed"], a["client"]) for a in plain["attacks"]] == [("client_update", 1), ("client_update", 2)]
    for a in plain["attacks"]:
        assert a["attack"] == "imprint" and a["label_accuracy"] is None
        exact = sum(p > 50 for p in a["psnr_per_image"])  # recovered to float precision
        assert exact >= 0.3 * a["batch_size"], (exact, a["batch_size"])
    acc = [r["test_accuracy"] for r in plain["rounds"]]
    assert acc[1] > acc[0], acc  # the clients' model still learns through the block
    (agg,) = secure["attacks"]
    assert agg["observed"] == "aggregate" and agg["client"] == [1, 2]
    sizes = {c["client"]: c["size"] for c in secure["data"]["clients"]}
    assert agg["batch_size"] == sizes[1] + sizes[2]  # scored against the union of the aggregated clients
    exact = sum(p > 50 for p in agg["psnr_per_image"])
    # ~960 examples in 1,024 bins: at most ~380 sit alone in a bin
    assert exact >= 0.15 * agg["batch_size"], (exact, agg["batch_size"])


def test_local_dp_with_flowers_mod_accounts_each_release_and_stops_at_the_budget(compose, tmp_path):
    """Flower's LocalDpMod clips and noises each update; every release is one Gaussian mechanism in the
    client's ledger; a client whose next release would exceed max_epsilon sends nothing (and the run
    does not hang on Flower's mod, which would malform that reply)."""
    from defenses.accounting import epsilon, local_dp_noise_multiplier

    cfg = compose(TINY + ["defense=[local_dp,prune]", "defense.local_epsilon=50", "defense.clipping_norm=2",
                          "defense.max_epsilon=150"])
    s = run(cfg, tmp_path)
    p = s["privacy"]
    z = local_dp_noise_multiplier(50, 1e-5)
    assert epsilon([(z, 1.0, 1)], 1e-5) < 150 < epsilon([(z, 1.0, 2)], 1e-5)  # the test's premise
    assert p["mechanism"] == "local_dp" and p["epsilon"] == pytest.approx(epsilon([(z, 1.0, 1)], 1e-5), rel=1e-9)
    assert [r["trained"] for r in s["rounds"]] == [3, 0] and {st["round"] for st in p["stopped"]} == {2}
