"""Sweep report: handmade run directories of a multirun -> table, sweep.json, pictures, failed runs listed."""

import json
import math

import pytest
import yaml

from fl_sim.privacy import PrivacyLedger
from fl_sim.sweep import (
    EPSILON_PLOT,
    JSON_NAME,
    PARAMETER_PLOT,
    REPORT_NAME,
    TRADEOFF_PLOT,
    SweepReportError,
    epsilon_of,
    main,
    write_sweep_report,
)

DELTA = 1e-5


def _config(noise: float, seed: int = 0, defense: str = "dpsgd") -> dict:
    return {
        "dataset": {"name": "digits"}, "model": {"name": "mlp"}, "partition": {"name": "iid"},
        "strategy": {"name": "fedavg"}, "scenario": {"name": "federated"},
        "attack": {"name": "inverting_gradients", "target_clients": [0], "labels_known": False},
        "defense": {"name": defense, "noise_multiplier": noise, "max_grad_norm": 1.0, "accountant": "rdp",
                    "delta": DELTA},
        "num_clients": 2, "num_rounds": 2, "seed": seed,
    }


def _privacy(epsilons: dict, budget=None, stopped=()) -> dict:
    """``summary.json``'s privacy as the real ledger writes it; an ε of math.inf is a client without noise."""
    ledger = PrivacyLedger(mechanism="dpsgd", accountant="rdp", delta=DELTA, max_epsilon=budget)
    for c, e in epsilons.items():
        ledger.observe(2, int(c), {"epsilon": -1.0 if math.isinf(e) else e, "declined": False, "rounds": [1, 2],
                                   "noise-multiplier": 1.0, "sample-rate": 0.1})
    for c in stopped:
        ledger.observe(2, int(c), {"epsilon": 1.0, "declined": True, "rounds": [1], "noise-multiplier": 1.0,
                                   "sample-rate": 0.1})
    ledger.end_round(2)
    return json.loads(json.dumps(ledger.summary()))


def _attack(rnd: int, psnr, ssim=0.3, label_accuracy=0.5, error=None) -> dict:
    entry = {"round": rnd, "client": 0, "attack": "inverting_gradients", "observed": "client_update",
             "batch_size": 4, "psnr": psnr, "ssim": ssim if psnr is not None else None,
             "label_accuracy": label_accuracy if psnr is not None else None, "iterations": 10, "seconds": 0.1}
    if error:
        entry["error"] = error
    return entry


def _summary(cfg: dict, accuracies=(0.5, 0.8), attacks=(), privacy=None, status="completed", error=None) -> dict:
    s = {"status": status, "config": cfg,
         "rounds": [{"round": i + 1, "train_loss": 1.0, "test_loss": 1.0, "test_accuracy": a, "clients": [0, 1],
                     "seconds": 0.1} for i, a in enumerate(accuracies)],
         "attacks": list(attacks), "attacks_skipped": [], "privacy": privacy,
         "timing": {"total_seconds": 1.0, "simulation_seconds": 1.0, "attack_seconds": 0.1}}
    if error:
        s["error"] = error
    return s


def _write_run(sweep, name: str, summary: dict, overrides: list[str]) -> None:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


TASK = ["defense=dpsgd", "defense.noise_multiplier=0,0.5,1.0,2.0", "attack=inverting_gradients"]


@pytest.fixture
def sweep(tmp_path):
    """Four jobs of `fl-sim -m defense=dpsgd defense.noise_multiplier=0,0.5,1.0,2.0 ...`: σ = 0 (ε = ∞),
    σ = 0.5 (ε 40, one failed attack), σ = 1 (ε 2.5, ε of client 1 larger, a budget of 3), σ = 2 failed."""
    d = tmp_path / "multirun" / "08-00-00"
    d.mkdir(parents=True)
    (d / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": ["hydra.mode=MULTIRUN"],
                                                                             "task": TASK}}}))
    base = ["defense=dpsgd", "attack=inverting_gradients"]
    _write_run(d, "0", _summary(_config(0.0), (0.6, 0.9), [_attack(1, 30.0), _attack(2, 34.0)],
                                _privacy({"0": math.inf, "1": math.inf})),
               base + ["defense.noise_multiplier=0"])
    _write_run(d, "1", _summary(_config(0.5), (0.5, 0.8), [_attack(1, 10.0, 0.2, 0.25), _attack(2, 14.0, 0.4, 0.75),
                                                           _attack(2, None, error="RuntimeError: diverged")],
                                _privacy({"0": 38.0, "1": 40.0})),
               base + ["defense.noise_multiplier=0.5"])
    _write_run(d, "2", _summary(_config(1.0), (0.4, 0.7), [_attack(1, 8.0), _attack(2, 9.0)],
                                _privacy({"0": 2.0, "1": 2.5}, budget=3.0)),
               base + ["defense.noise_multiplier=1.0"])
    _write_run(d, "3", _summary(_config(2.0), (0.3,), [], None, status="failed",
                                error="RuntimeError: the simulation ended after 1 of 2 rounds"),
               base + ["defense.noise_multiplier=2.0"])
    return d


def _rows(sweep_dir):
    return {r["run"]: r for r in json.loads((sweep_dir / JSON_NAME).read_text())["runs"]}


def test_table_holds_worst_client_epsilon_final_accuracy_and_mean_psnr_per_run(sweep):
    write_sweep_report(sweep)
    data = json.loads((sweep / JSON_NAME).read_text())
    assert data["swept"] == ["defense.noise_multiplier"] and data["swept_from"] == "multirun.yaml"
    rows = _rows(sweep)
    assert [rows[r]["params"]["defense.noise_multiplier"] for r in "0123"] == [0.0, 0.5, 1.0, 2.0]
    assert rows["0"]["epsilon"] == "inf"                       # σ = 0: no guarantee, ∞ written as "inf"
    assert rows["1"]["epsilon"] == pytest.approx(40.0)          # the worst client, not client 0
    assert rows["2"]["epsilon"] == pytest.approx(2.5)          # not the budget max_epsilon = 3
    assert rows["2"]["delta"] == DELTA and rows["2"]["accountant"] == "rdp"
    assert rows["1"]["final_test_accuracy"] == pytest.approx(0.8)  # the last round, not the best or the mean
    assert rows["1"]["psnr_mean"] == pytest.approx(12.0, abs=1e-9)  # the failed attack entry is not scored
    assert rows["1"]["ssim_mean"] == pytest.approx(0.3, abs=1e-9)
    assert rows["1"]["label_accuracy_mean"] == pytest.approx(0.5, abs=1e-9)
    assert (rows["1"]["attack_entries"], rows["1"]["attack_failures"]) == (2, 1)
    assert rows["0"]["psnr_mean"] == pytest.approx(32.0, abs=1e-9)
    assert all(rows[r]["seed"] == 0 for r in "0123")


def test_failed_run_is_listed_with_its_error_and_has_no_numbers(sweep):
    md = write_sweep_report(sweep).read_text()
    row = _rows(sweep)["3"]
    assert row["status"] == "failed" and row["final_test_accuracy"] is None and row["epsilon"] is None
    assert "| 3 | 2 | 0 | failed |" in md
    failed_section = md.split("## Failed runs")[1]
    assert "run `3` (defense.noise_multiplier=2, seed 0), after 1 round(s): RuntimeError: the simulation ended" \
           in failed_section


def test_markdown_states_delta_accountant_seed_and_shows_infinity(sweep):
    md = write_sweep_report(sweep).read_text()
    assert "| run | defense.noise_multiplier | seed | status | ε (δ=1e-05) |" in md
    assert "| 0 | 0 | 0 | completed | ∞ | 90.0 | 32.00 |" in md
    assert "| 1 | 0.5 | 0 | completed | 40 | 80.0 | 12.00 | 0.300 | 50.0 | 2 (1 failed, 0 skipped) |" in md
    assert "| 2 | 1 | 0 | completed | 2.5 | 70.0 | 8.50 |" in md
    assert "δ = 1e-05, RDP accountant, mechanism dpsgd" in md
    assert "seed 0; one run per point" in md
    assert "4 run(s): 3 completed, 1 failed" in md
    assert "fl-sim -m " + " ".join(TASK) in md


def test_pictures_are_written_and_linked(sweep):
    md = write_sweep_report(sweep).read_text()
    for name in (EPSILON_PLOT, PARAMETER_PLOT, TRADEOFF_PLOT):
        png = sweep / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"]({name})" in md
    assert (sweep / REPORT_NAME).is_file()


def test_no_privacy_mechanism_is_infinite_epsilon_marked_no_dp(tmp_path):
    d = tmp_path / "sweep"
    _write_run(d, "0", _summary(_config(1.0, defense="none"), attacks=[_attack(1, 20.0)]), ["defense=none"])
    _write_run(d, "1", _summary(_config(1.0), privacy=_privacy({"0": 3.0})), ["defense=dpsgd"])
    md = write_sweep_report(d).read_text()
    rows = _rows(d)
    assert rows["0"]["epsilon"] == "inf" and rows["0"]["mechanism"] is None
    assert "| 0 | none | 0 | completed | ∞ (no DP) |" in md  # no multirun.yaml: swept keys found by config diff
    assert json.loads((d / JSON_NAME).read_text())["swept"] == ["defense.name"]

def test_epsilon_is_the_worst_clients_and_infinite_without_noise_or_mechanism():
    assert epsilon_of(None) == math.inf
    assert epsilon_of(_privacy({"0": 1.5, "1": 0.5})) == 1.5
    assert epsilon_of(_privacy({"0": 1.5, "1": math.inf})) == math.inf      # JSON: epsilon null, infinite true
    assert epsilon_of(_privacy({"0": 1.5}, budget=10.0)) == 1.5             # max_epsilon is the budget
    assert epsilon_of({"clients": {"0": {"epsilon": 1.5}, "1": {"epsilon": None}}}) == math.inf
    assert epsilon_of({"mechanism": "central_dp", "accountant": None, "epsilon": None, "infinite": False,
                       "clients": {}}) is None                              # adaptive clipping: not accounted


def test_clients_stopped_by_the_budget_are_stated(tmp_path):
    d = tmp_path / "sweep"
    _write_run(d, "0", _summary(_config(1.0), privacy=_privacy({"0": 2.9}, budget=3.0, stopped=[1])),
               ["defense.max_epsilon=3"])
    md = write_sweep_report(d).read_text()
    row = _rows(d)["0"]
    assert (row["epsilon"], row["epsilon_budget"], row["clients_stopped"]) == (2.9, 3.0, 1)
    assert "| 2.9 (budget 3: 1 client(s) stopped) |" in md


def test_job_that_left_no_summary_is_listed_as_failed_and_all_infinite_epsilon_draws_no_epsilon_picture(tmp_path):
    d = tmp_path / "sweep"
    _write_run(d, "0", _summary(_config(0.1, defense="none"), attacks=[_attack(1, 20.0)]), ["client.lr=0.1"])
    (d / "1" / ".hydra").mkdir(parents=True)
    (d / "notes").mkdir()  # a folder that is not a job is not a run
    md = write_sweep_report(d).read_text()
    assert sorted(_rows(d)) == ["0", "1"]
    assert "- run `1`, after 0 round(s): no summary.json (the job ended before writing it)" in md
    assert "No ε picture: no completed run has a finite ε" in md and not (d / EPSILON_PLOT).exists()


def test_runs_differing_only_in_seed_are_averaged_with_sample_std_and_n(tmp_path):
    d = tmp_path / "sweep"
    (d).mkdir()
    (d / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {
        "task": ["defense=dpsgd", "defense.noise_multiplier=0.5,1.0", "seed=0,1"]}}}))
    accs = {(0.5, 0): 0.80, (0.5, 1): 0.90, (1.0, 0): 0.60, (1.0, 1): 0.70}
    for i, ((noise, seed), acc) in enumerate(accs.items()):
        _write_run(d, str(i), _summary(_config(noise, seed), (0.1, acc), [_attack(1, 10.0 + 2 * seed)],
                                       _privacy({"0": 4.0 / noise})),
                   [f"defense.noise_multiplier={noise}", f"seed={seed}"])
    md = write_sweep_report(d).read_text()
    groups = json.loads((d / JSON_NAME).read_text())["groups"]
    assert [g["params"]["defense.noise_multiplier"] for g in groups] == [0.5, 1.0]
    g = groups[0]
    assert g["seeds"] == [0, 1] and g["final_test_accuracy"]["n"] == 2
    assert g["final_test_accuracy"]["mean"] == pytest.approx(0.85)
    assert g["final_test_accuracy"]["std"] == pytest.approx(math.sqrt(2) * 0.05)  # n − 1 in the denominator
    assert g["psnr_mean"]["mean"] == pytest.approx(11.0) and g["epsilon"]["mean"] == pytest.approx(8.0)
    assert "| 0.5 | 2 | 8 | 85.0 ± 7.1 | 11.00 ± 1.41 |" in md
    assert "seeds 0, 1; mean ± std over n = 2 runs per point" in md
    assert (d / EPSILON_PLOT).is_file() and (d / PARAMETER_PLOT).is_file()


def test_cli_prints_report_path_and_table(sweep, capsys):
    main([str(sweep)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str((sweep / REPORT_NAME).resolve())
    assert out[1].startswith("| run | defense.noise_multiplier |") and len(out) == 1 + 2 + 4


def test_cli_on_a_directory_without_runs_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            main([str(target)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fl-sim-report: error: ")
    with pytest.raises(SweepReportError, match="no runs in"):
        write_sweep_report(tmp_path / "empty")


def test_model_inversion_and_label_only_entries_are_scored_not_failed(tmp_path):
    """A sweep over model-inversion runs reports their attack accuracy (table, groups, picture); entries
    without PSNR (label leakage, model inversion) are scored entries, not failures."""
    sweep = tmp_path / "mi"
    for i, (acc, seed) in enumerate([(0.4, 0), (0.6, 1)]):
        d = sweep / str(i)
        d.mkdir(parents=True)
        cfg = _config(0.0, seed=seed, defense="none")
        cfg["attack"] = {"name": "gmi", "target_clients": [], "labels_known": False}
        entry = {"round": 3, "client": None, "attack": "gmi", "observed": "model", "batch_size": 25, "psnr": None,
                 "ssim": None, "label_accuracy": None, "attack_accuracy": acc, "knn_distance": 10.0}
        (d / "summary.json").write_text(json.dumps({
            "status": "completed", "config": cfg, "privacy": None, "attacks_skipped": [],
            "rounds": [{"round": 3, "test_accuracy": 0.9}], "attacks": [entry]}))
    md = write_sweep_report(sweep).read_text()
    rows = json.loads((sweep / JSON_NAME).read_text())["runs"]
    assert [r["mi_attack_accuracy_mean"] for r in rows] == [0.4, 0.6]
    assert all(r["attack_entries"] == 1 and r["attack_failures"] == 0 for r in rows)
    assert "MI attack acc. (%)" in md and "| 40.0 |" in md and "| 60.0 |" in md
    assert "50.0 ± 14.1" in md  # the two seeds aggregated
    # the trade-off picture: one point per setting, attack accuracy against test accuracy, seeds' spread
    from fl_sim.sweep.plots import tradeoff_points
    from fl_sim.sweep.runs import aggregate, find_runs, run_row

    groups = aggregate([run_row(r, []) for r in find_runs(sweep)], [])
    [(name, x, y, xerr, yerr)] = tradeoff_points(groups)["mi_attack_accuracy_mean"]
    assert (x, y, xerr) == (pytest.approx(90.0), pytest.approx(50.0), 0.0) and yerr == pytest.approx(14.142, abs=1e-3)
    assert (sweep / TRADEOFF_PLOT).stat().st_size > 10_000 and f"]({TRADEOFF_PLOT})" in md
