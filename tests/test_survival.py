"""Runs that survive (issue 6): client failures on the real simulation, checkpoints and resume."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fl_sim import checkpoint
from fl_sim.config import ConfigError
from fl_sim.runner import run

TINY = ["dataset=digits", "model=mlp", "model.hidden=[32]", "client.lr=0.1", "client.local_epochs=1",
        "attack=none"]
TIMING = {"seconds", "attack_seconds"}


def _rounds(summary):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in summary["rounds"]]


def _draws(seed, rnd, cid):
    return np.random.default_rng([seed, rnd, cid, 0xFA]).random(2)  # fl_sim.faults.maybe_fail's draws


@pytest.mark.e2e
def test_crashing_client_processes_and_stragglers_are_survived_counted_and_the_attack_says_it_skipped(
        compose, tmp_path):
    """Client processes that die (os._exit in the Ray actor) cost their own reply only: Ray restarts the
    actor and the run completes with what arrived; the targeted client that crashed is skipped."""
    rate, slow, nan = 0.3, 0.3, 0.2
    cfg = compose(TINY + ["num_clients=4", "num_rounds=2", f"faults.client_crash_rate={rate}",
                          "faults.crash_mode=exit", f"faults.straggler_rate={slow}", "faults.straggler_seconds=0.2",
                          f"faults.nan_update_rate={nan}",
                          "attack=inverting_gradients", "attack.iterations=2", "attack.target_clients=[3]",
                          "attack.workers=0"])
    s = run(cfg, tmp_path / "run")
    assert s["status"] == "completed"
    for r in s["rounds"]:
        crashed = {c for c in range(4) if _draws(0, r["round"], c)[0] < rate}
        slowed = {c for c in range(4) if c not in crashed and _draws(0, r["round"], c)[1] < slow}
        poisoned = {c for c in range(4) if c not in crashed
                    and np.random.default_rng([0, r["round"], c, 0xFA]).random(3)[2] < nan}
        assert set(map(int, r["failed"])) == crashed, r["failed"]  # no other client lost with the dead actor
        assert {e["client"] for e in r["rejected"]} == poisoned  # NaN updates: rejected, reported
        assert all("non-finite" in e["reason"] or "NaN" in e["reason"] for e in r["rejected"]), r["rejected"]
        assert r["failures"] == len(crashed) and r["trained"] == 4 - len(crashed) - len(poisoned)
        assert r["stragglers"] == len(slowed)
        assert np.isfinite(r["test_loss"])
    assert sum(len(r["rejected"]) for r in s["rounds"]) >= 1, "seed 0 must poison an update for this test"
    crashed_rounds = [r["round"] for r in s["rounds"] if "3" in r["failed"]]
    assert crashed_rounds, "seed 0 must crash client 3 at least once for this test to mean something"
    assert [a["round"] for a in s["attacks_skipped"] if a["client"] == 3] == crashed_rounds
    assert all("failed" in a["reason"] for a in s["attacks_skipped"])
    assert sorted(a["round"] for a in s["attacks"]) == sorted(set(range(1, 3)) - set(crashed_rounds))


@pytest.mark.e2e
def test_a_run_killed_after_round_one_resumes_to_the_summary_of_an_uninterrupted_run(compose, tmp_path):
    """Kill the real run (SIGKILL to its process group) once its first checkpoint is on disk, resume it
    with `fl-sim resume=DIR`, compare with the same config run without interruption: same metrics and ε.
    FedAdam's moments, the sampling RNG and the clients' DP-SGD histories have to survive for that."""
    args = TINY + ["num_clients=3", "num_rounds=3", "strategy=fedadam", "strategy.fraction_train=0.67",
                   "defense=dpsgd", "faults.straggler_rate=1", "faults.straggler_seconds=1"]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim", *args, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / checkpoint.FILE).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = checkpoint.load(run_dir)["round"]
    assert 1 <= killed_after < 3 and not (run_dir / "summary.json").exists()

    done = subprocess.run([sys.executable, "-m", "fl_sim", f"resume={run_dir}"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "completed" and not (run_dir / checkpoint.FILE).exists()

    whole = run(compose(args), tmp_path / "whole")
    assert _rounds(resumed) == _rounds(whole)
    assert resumed["privacy"]["clients"] == whole["privacy"]["clients"]
    assert resumed["privacy"]["epsilon"] == whole["privacy"]["epsilon"] > 0
    assert [r["clients"] for r in whole["rounds"]] != [[0, 1, 2]] * 3  # sampling is exercised (2 of 3)


def test_a_checkpoint_restores_flowers_fedadam_state_and_the_sampling_rng(tmp_path):
    from flwr.app import ArrayRecord

    from strategies import make_strategy

    strategy = make_strategy("fedadam")
    strategy.current_arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    strategy.m_t, strategy.v_t = {"w": np.full((2, 3), 0.5, np.float32)}, {"w": np.full((2, 3), 0.25, np.float32)}
    rng = np.random.default_rng(7)
    rng.random(5)

    class Rec:
        rounds, attacks, skipped_attacks, privacy = [{"round": 1, "test_loss": 1.5}], [], [], None

    checkpoint.save(tmp_path, server_round=1, config={"seed": 0}, model={"w": torch.ones(2)}, strategy=strategy,
                    rng=rng, recorder=Rec(), state={"ledger": {"clients": {"0": {"epsilon": float("inf")}}}})
    expected_next = rng.random(3)

    ck = checkpoint.load(tmp_path)
    fresh, fresh_rng = make_strategy("fedadam"), np.random.default_rng(0)
    checkpoint.restore_strategy(fresh, ck["strategy"])
    checkpoint.restore_rng(fresh_rng, ck["rng"])
    assert np.array_equal(fresh.m_t["w"], strategy.m_t["w"]) and np.array_equal(fresh.v_t["w"], strategy.v_t["w"])
    assert np.array_equal(fresh.current_arrays["w"], strategy.current_arrays["w"])
    assert np.array_equal(fresh_rng.random(3), expected_next)
    assert ck["round"] == 1 and ck["recorder"]["rounds"] == Rec.rounds and torch.equal(ck["model"]["w"], torch.ones(2))
    assert ck["state"]["ledger"]["clients"]["0"]["epsilon"] == float("inf")
    assert isinstance(ArrayRecord(ck["model"]), ArrayRecord)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_would_run_code_or_is_corrupt_is_refused_naming_the_file(tmp_path):
    with open(tmp_path / checkpoint.FILE, "wb") as f:
        pickle.dump({"version": 1, "round": 1, "payload": _Boom()}, f)
    with pytest.raises(ConfigError, match=r"checkpoint\.pt is not a valid fl-sim checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"checkpoint\.pt is not a valid"):
        checkpoint.load(tmp_path)
    with pytest.raises(ConfigError, match="nothing to resume"):
        checkpoint.load(tmp_path / "missing")


def test_resume_of_a_folder_without_checkpoint_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fl_sim", f"resume={tmp_path}"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "nothing to resume" in done.stderr and "Traceback" not in done.stderr


def test_a_sweep_rerun_skips_runs_completed_with_the_same_config(compose, tmp_path):
    from omegaconf import OmegaConf

    from fl_sim.runner import completed_with

    cfg = compose(TINY)
    summary = {"status": "completed", "config": OmegaConf.to_container(cfg, resolve=True)}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert completed_with(tmp_path, cfg)
    assert not completed_with(tmp_path, compose(TINY + ["seed=1"]))
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    assert not completed_with(tmp_path, cfg)


def test_split_optimiser_state_survives_the_trip_through_records():
    from fl_sim.split.cut import load_optimizer, save_optimizer

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    fresh = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    load_optimizer(fresh, save_optimizer(opt))
    for p in net.parameters():
        assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_a_local_run_always_starts_its_own_ray_instance(compose):
    """Never a cluster recorded in /tmp/ray/ray_current_cluster: a stale record left by a killed run made
    ray.init wait for a dead cluster; another run's live one would be shared."""
    from fl_sim.runner import backend_config

    assert backend_config(compose(TINY))["init_args"]["address"] == "local"
    assert backend_config(compose(TINY + ["backend.ray_address=auto"]))["init_args"]["address"] == "auto"
