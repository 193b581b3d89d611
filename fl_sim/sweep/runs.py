"""Reading a sweep's runs: every job folder's ``summary.json`` and Hydra overrides, what was swept,
one row of numbers per run (ε, final accuracy, attack scores) and the groups of runs that differ only
in their seed (mean ± std), plus the setting every run shares."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

REPLICATE_KEY = "seed"  # runs differing only in this key are repetitions of one setting


class SweepReportError(Exception):
    """The sweep directory cannot be reported on (missing, or holds no runs); the message is one line."""


@dataclass
class Run:
    """One job of the sweep: its folder and what its ``summary.json`` says (None when it has none)."""

    name: str
    path: Path
    summary: dict | None
    problem: str | None = None  # why there is no usable summary
    overrides: dict[str, Any] = field(default_factory=dict)  # the job's own Hydra overrides, key -> value

    @property
    def status(self) -> str:
        if self.summary is None:
            return "failed"
        return str(self.summary.get("status", "unknown"))

    @property
    def error(self) -> str | None:
        if self.summary is None:
            return self.problem
        if self.status != "completed":
            return self.summary.get("error") or f"status {self.status!r} without an error message"
        return None

    @property
    def config(self) -> dict:
        return (self.summary or {}).get("config") or {}


# ---------------------------------------------------------------- finding runs and what was swept
def find_runs(sweep_dir: Path) -> list[Run]:
    """Every direct sub-folder holding ``summary.json`` (or Hydra's ``.hydra/``: a job that left no summary)."""
    runs = []
    for sub in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name)):
        summary_path = sub / "summary.json"
        if summary_path.is_file():
            try:
                summary, problem = json.loads(summary_path.read_text()), None
                if not isinstance(summary, dict):
                    summary, problem = None, "summary.json does not hold a JSON object"
            except (OSError, ValueError) as e:
                summary, problem = None, f"summary.json cannot be read: {e}"
        elif (sub / ".hydra").is_dir():
            summary, problem = None, "no summary.json (the job ended before writing it)"
        else:
            continue
        runs.append(Run(sub.name, sub, summary, problem, _job_overrides(sub)))
    return runs


def natural_key(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _parse_overrides(lines: Iterable[str]) -> list:
    return OverridesParser.create().parse_overrides([str(x) for x in lines])


def _job_overrides(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        return {o.key_or_group: o.value() for o in _parse_overrides(yaml.safe_load(path.read_text()) or [])}
    except Exception:  # noqa: BLE001 - no overrides file, or one Hydra cannot parse: use the config only
        return {}


def read_multirun(sweep_dir: Path) -> dict | None:
    path = sweep_dir / "multirun.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def task_overrides(multirun: dict | None) -> list[str]:
    """The command line of the sweep (``hydra.overrides.task``), as the user typed it."""
    try:
        return [str(x) for x in multirun["hydra"]["overrides"]["task"] or []]
    except (KeyError, TypeError):
        return []


def swept_keys(runs: Sequence[Run], multirun: dict | None) -> tuple[list[str], str]:
    """The swept keys and where they were found: the sweep overrides of ``multirun.yaml`` (the
    command line, then ``hydra.sweeper.params``), else the config keys whose values differ across runs."""
    if multirun is not None:
        keys: list[str] = []
        lines = task_overrides(multirun)
        try:
            params = multirun["hydra"]["sweeper"]["params"] or {}
            lines += [f"{k}={v}" for k, v in params.items()]
        except (KeyError, TypeError, AttributeError):
            pass
        try:
            keys = [o.key_or_group for o in _parse_overrides(lines) if o.is_sweep_override()]
        except Exception:  # noqa: BLE001 - an override Hydra's parser refuses: fall back to the configs
            keys = []
        keys = [k for k in dict.fromkeys(keys) if not k.startswith("hydra")]
        if keys:
            return keys, "multirun.yaml"
    flat = [flatten(r.config) for r in runs if r.config]
    all_keys = sorted({k for f in flat for k in f}, key=lambda k: (k.count("."), k))
    differing = [k for k in all_keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    return differing, "configs that differ"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def lookup(config: dict, key: str) -> Any:
    """``config["a"]["b"]`` for key "a.b"; None when a part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parameter_value(run: Run, key: str) -> Any:
    """What the run used for a swept key: the resolved config value for a leaf key; for a config
    group (``defense=dpsgd``) the option chosen on the command line, else the group's ``name``."""
    node = lookup(run.config, key)
    if isinstance(node, dict):
        chosen = run.overrides.get(key)
        if chosen is None:
            return node.get("name")
        return "+".join(map(str, chosen)) if isinstance(chosen, list) else chosen
    if node is None and key in run.overrides:
        return run.overrides[key]
    return node


# ---------------------------------------------------------------- numbers of one run
def _as_epsilon(v: Any) -> float | None:
    """ε from JSON: a number, or "inf"/"Infinity"/a JSON Infinity for ∞; None when it is not a number."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return None if math.isnan(v) else float(v)
    return None


def epsilon_of(privacy: dict | None) -> float | None:
    """The run's ε — the worst client's, as ``summary.json``'s ``privacy`` reports it (``fl_sim.privacy``):
    ∞ without a privacy mechanism (``privacy`` null) or when ``infinite`` (a client trained without noise);
    None when it was not accounted (e.g. central DP with adaptive clipping) or no client trained.

    ``privacy.max_epsilon`` is the configured budget, not a spent ε: it is never read as one. Without a
    top-level ``epsilon`` the worst of ``privacy.clients`` is taken, a client's null ε meaning ∞ (the JSON
    of an infinite ε)."""
    if privacy is None:
        return math.inf
    if privacy.get("infinite"):
        return math.inf
    if "epsilon" in privacy:
        return _as_epsilon(privacy["epsilon"])
    clients = [c.get("epsilon") if isinstance(c, dict) else c for c in (privacy.get("clients") or {}).values()]
    values = [math.inf if e is None else _as_epsilon(e) for e in clients]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def run_row(run: Run, params: Sequence[str]) -> dict:
    """One table row (the same dict goes to sweep.json)."""
    cfg = run.config
    s = run.summary or {}
    privacy = s.get("privacy")
    completed = run.status == "completed"
    rounds = [r for r in (s.get("rounds") or []) if isinstance(r, dict)]
    last = max(rounds, key=lambda r: r.get("round", 0)) if rounds else None
    attacks = [a for a in (s.get("attacks") or []) if isinstance(a, dict)]
    done = [a for a in attacks if not a.get("error")]  # what the evaluator scored; failed attacks count apart
    scored = [a for a in done if a.get("psnr") is not None]  # reconstructions of a client's data
    labels = [a["label_accuracy"] for a in done if a.get("label_accuracy") is not None]
    inversions = [a["attack_accuracy"] for a in done  # model inversion of the final model
                  if a.get("observed") == "model" and a.get("attack_accuracy") is not None]
    attack_cfg = cfg.get("attack") or {}
    row = {
        "run": run.name,
        "params": {k: parameter_value(run, k) for k in params},
        "seed": cfg.get("seed"),
        "status": run.status,
        "error": run.error,
        "rounds_completed": len(rounds),
        "mechanism": privacy.get("mechanism") if isinstance(privacy, dict) else None,
        "accountant": privacy.get("accountant") if isinstance(privacy, dict) else None,
        "delta": privacy.get("delta") if isinstance(privacy, dict) else None,
        "epsilon": epsilon_of(privacy) if completed else None,  # a failed run's numbers are not results
        "epsilon_budget": privacy.get("max_epsilon") if isinstance(privacy, dict) else None,
        "clients_stopped": len(privacy.get("stopped") or []) if isinstance(privacy, dict) else 0,
        "central_epsilon": epsilon_of(privacy["central"]) if (completed and isinstance(privacy, dict)
                                                               and isinstance(privacy.get("central"), dict)) else None,
        "final_round": last.get("round") if (completed and last) else None,
        "final_test_accuracy": last.get("test_accuracy") if (completed and last) else None,
        "attack": attack_cfg.get("name"),
        "labels_known": attack_cfg.get("labels_known"),
        "attack_entries": len(done),
        "attack_failures": len(attacks) - len(done),
        "attacks_skipped": len(s.get("attacks_skipped") or []),
        "psnr_mean": _mean([a["psnr"] for a in scored]) if completed else None,
        "psnr_max": max(a["psnr"] for a in scored) if (completed and scored) else None,
        "ssim_mean": _mean([a["ssim"] for a in scored if a.get("ssim") is not None]) if completed else None,
        "label_accuracy_mean": _mean(labels) if completed else None,
        "mi_attack_accuracy_mean": _mean(inversions) if completed else None,
    }
    return row


# ---------------------------------------------------------------- aggregation over seeds
METRICS = ("epsilon", "final_test_accuracy", "psnr_mean", "ssim_mean", "label_accuracy_mean", "mi_attack_accuracy_mean")


def _stats(values: Sequence[float | None]) -> dict:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(v) / len(v)
    if any(math.isinf(x) for x in v):
        return {"mean": math.inf if all(x > 0 for x in v) else math.nan, "std": None, "n": len(v)}
    if len(v) == 1:
        return {"mean": mean, "std": None, "n": 1}
    std = 0.0 if max(v) == min(v) else math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return {"mean": min(max(mean, min(v)), max(v)), "std": std, "n": len(v)}


def aggregate(rows: Sequence[dict], params: Sequence[str]) -> list[dict]:
    """Completed runs grouped by every swept value but the seed: mean ± std (n) of each metric."""
    groups: dict[str, list[dict]] = {}
    order: list[str] = []
    for r in rows:
        key = json.dumps([r["params"].get(k) for k in params], default=str)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)
    out = []
    for key in order:
        members = groups[key]
        done = [r for r in members if r["status"] == "completed"]
        g = {"params": {k: members[0]["params"].get(k) for k in params},
             "runs": [r["run"] for r in done],
             "seeds": [r["seed"] for r in done],
             "failed": [r["run"] for r in members if r["status"] != "completed"]}
        for m in METRICS:
            g[m] = _stats([r[m] for r in done])
        out.append(g)
    return out


class Varies(list):
    """The different values a setting takes across the runs (a plain value when all runs share it)."""


def common(values: Iterable[Any]) -> Any:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen[0] if len(seen) == 1 else Varies(seen)



def setting(runs: Sequence[Run], rows: Sequence[dict]) -> dict:
    """What every run shares (a value) or not (a list of values): dataset, model, attack, δ, seeds, ..."""
    cfgs = [r.config for r in runs if r.config]

    def get(key: str) -> Any:
        return common(lookup(c, key) for c in cfgs) if cfgs else None

    dp = [r for r in rows if r["delta"] is not None]
    return {
        "dataset": get("dataset.name"),
        "model": get("model.name"),
        "num_clients": get("num_clients"),
        "num_rounds": get("num_rounds"),
        "strategy": get("strategy.name"),
        "scenario": get("scenario.name"),
        "attack": get("attack.name"),
        "attack_target_clients": get("attack.target_clients"),
        "labels_known": get("attack.labels_known"),
        "defense": get("defense.name"),
        "mechanism": common(r["mechanism"] for r in dp) if dp else None,
        "accountant": common(r["accountant"] for r in dp) if dp else None,
        "delta": common(r["delta"] for r in dp) if dp else None,
        "seeds": sorted({r["seed"] for r in rows if r["seed"] is not None}, key=lambda x: natural_key(str(x))),
    }
