"""``benchmarks/mi_defenses.py --append``: seeds run in separate invocations add up only when they were
measured in one setting (our own bookkeeping; the benchmark itself is not run here)."""

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def mi_defenses(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import mi_defenses

    return mi_defenses


SETTING = {"dataset": "mnist", "target": "FedAvg's CNN, 5 rounds x 3 local epochs, sgd lr 0.02",
           "attacks": {"gmi": {"iterations": 500}, "gan_steps": 1000, "precision": "float32"}, "threads": 2}


def _write(path: Path, setting: dict, **extra) -> Path:
    run = {"seed": 0, "config": "none", "attack": "gmi", "attack_accuracy": 0.5}
    path.write_text(json.dumps({"setting": setting, "runs": [run], "total_minutes": 40.0, "finished": True, **extra}))
    return path


def test_append_takes_the_same_setting_and_an_older_file_of_it(mi_defenses, tmp_path):
    # written before --precision and invocations were recorded: float32, "SGD", one invocation of its total time
    older = {**SETTING, "target": SETTING["target"].replace("sgd", "SGD"), "threads": 16,
             "attacks": {k: v for k, v in SETTING["attacks"].items() if k != "precision"}}
    got = mi_defenses.earlier_runs(_write(tmp_path / "old.json", older), SETTING)
    assert [r["seed"] for r in got["runs"]] == [0]
    assert got["invocations"] == [{"seeds": [0], "defenses": ["none"], "minutes": 40.0, "finished": True}]


@pytest.mark.parametrize("change", [{"target": SETTING["target"].replace("lr 0.02", "lr 0.001")},
                                    {"attacks": {**SETTING["attacks"], "precision": "bfloat16"}},
                                    {"dataset": "digits"}])
def test_append_refuses_another_setting_in_one_line(mi_defenses, tmp_path, change):
    path = _write(tmp_path / "out.json", {**SETTING, **change})
    with pytest.raises(SystemExit) as e:
        mi_defenses.earlier_runs(path, SETTING)
    msg = str(e.value)
    assert "\n" not in msg and "another setting" in msg and next(iter(change)) in msg and "another --out" in msg


def test_append_refuses_a_file_that_is_no_result(mi_defenses, tmp_path):
    path = tmp_path / "out.json"
    path.write_text("{}")
    with pytest.raises(SystemExit, match="not a mi_defenses.py result"):
        mi_defenses.earlier_runs(path, SETTING)
