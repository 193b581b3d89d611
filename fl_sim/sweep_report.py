"""The report of a sweep: one table and a few pictures over the runs of a Hydra multirun.

``fl-sim -m defense=dpsgd defense.noise_multiplier=0,0.3,1.0 attack=inverting_gradients`` leaves one
run directory per job (``<sweep dir>/0/``, ``1/``, ...), each with its ``summary.json``.
``fl-sim-report <sweep dir>`` (and the CLI at the end of a sweep) reads those and only those, and
writes into the sweep directory:

- ``sweep_report.md`` — the setting, one row per run, mean ± std over seeds, failed runs with their error;
- ``sweep.json`` — the same rows as data (ε = ∞ written as the string "inf", a missing value as null);
- ``sweep_epsilon.png`` — ε against final test accuracy and attack PSNR (the privacy–utility–leakage picture);
- ``sweep_parameter.png`` — the swept parameter against the same metrics.

How each number is made (nothing else is computed):

- ε of a run: the worst client's ε(δ) — each client's guarantee composed over every round it trained
  (``privacy.epsilon``, ``privacy.infinite``; see ``fl_sim.privacy``). No privacy mechanism (``privacy``
  null) or a mechanism without noise: ε = ∞. Not accounted (central DP with adaptive clipping): no number.
- final test accuracy: the global model's accuracy on the held-out test split after the last round.
- PSNR / SSIM / label accuracy: the mean over the run's attack entries (one entry = one attacked client
  in one round; its value is already the mean over that client's batch, after Hungarian matching).
  Entries whose attack failed are counted apart, never scored.
- Runs that share every swept value but the seed are aggregated: mean ± sample standard deviation
  (n − 1 in the denominator), n stated. Failed runs are listed, and left out of means and pictures.

>>> path = write_sweep_report("multirun/2026-11-22/08-00-00")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import LogLocator, NullLocator  # noqa: E402

REPLICATE_KEY = "seed"  # runs differing only in this key are repetitions of one setting
REPORT_NAME = "sweep_report.md"
JSON_NAME = "sweep.json"
EPSILON_PLOT = "sweep_epsilon.png"
PARAMETER_PLOT = "sweep_parameter.png"
INF_LABEL = "no DP\n(ε = ∞)"

# Axis labels (with units) for parameters users commonly sweep; any other key is shown as it is.
PARAMETER_LABELS = {
    "defense.noise_multiplier": "DP-SGD noise multiplier σ (noise std / clipping norm)",
    "defense.max_grad_norm": "DP-SGD clipping norm C (L2)",
    "defense.central_noise_multiplier": "central DP noise multiplier",
    "defense.clipping_norm": "update clipping norm (L2)",
    "defense.prune_ratio": "prune ratio (fraction of update zeroed)",
    "defense.quantize_bits": "quantisation (bits)",
    "defense.noise_std": "update noise std",
    "defense.target_epsilon": "target ε",
    "num_clients": "number of clients",
    "num_rounds": "number of rounds",
    "client.batch_size": "client batch size (examples)",
    "client.local_epochs": "local epochs",
    "client.lr": "client learning rate",
    "attack.iterations": "attack iterations",
}


# Short names for the labels next to points (the key's last part otherwise).
SHORT_NAMES = {"defense.noise_multiplier": "σ", "defense.max_grad_norm": "C", "defense.prune_ratio": "prune",
               "num_clients": "clients"}


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
                      key=lambda p: _natural_key(p.name)):
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


def _natural_key(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _parse_overrides(lines: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
    flat = [_flatten(r.config) for r in runs if r.config]
    all_keys = sorted({k for f in flat for k in f}, key=lambda k: (k.count("."), k))
    differing = [k for k in all_keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    return differing, "configs that differ"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _lookup(config: dict, key: str) -> Any:
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
    node = _lookup(run.config, key)
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
    scored = [a for a in attacks if not a.get("error") and a.get("psnr") is not None]
    labels = [a["label_accuracy"] for a in scored if a.get("label_accuracy") is not None]
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
        "attack_entries": len(scored),
        "attack_failures": len(attacks) - len(scored),
        "attacks_skipped": len(s.get("attacks_skipped") or []),
        "psnr_mean": _mean([a["psnr"] for a in scored]) if completed else None,
        "psnr_max": max(a["psnr"] for a in scored) if (completed and scored) else None,
        "ssim_mean": _mean([a["ssim"] for a in scored if a.get("ssim") is not None]) if completed else None,
        "label_accuracy_mean": _mean(labels) if completed else None,
    }
    return row


# ---------------------------------------------------------------- aggregation over seeds
METRICS = ("epsilon", "final_test_accuracy", "psnr_mean", "ssim_mean", "label_accuracy_mean")


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


# ---------------------------------------------------------------- formatting
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_eps(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v) or math.isnan(v):
        return _fmt(v)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(map(_fmt_param, v)) + "]"
    return "null" if v is None else str(v)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def _fmt_stat(st: dict, scale: float = 1.0, digits: int = 2, eps: bool = False) -> str:
    if st["mean"] is None:
        return "—"
    mean = st["mean"] * scale
    text = _fmt_eps(mean) if eps else _fmt(mean, digits)
    if st["std"] is not None and not (eps and st["std"] == 0):  # ε is usually the same for every seed
        text += " ± " + (_fmt_eps(st["std"] * scale) if eps else _fmt(st["std"] * scale, digits))
    return text


def _short(key: str) -> str:
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def _group_label(params: dict) -> str:
    return ", ".join(f"{_short(k)}={_fmt_param(v)}" for k, v in params.items())


class Varies(list):
    """The different values a setting takes across the runs (a plain value when all runs share it)."""


def _common(values: Iterable[Any]) -> Any:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen[0] if len(seen) == 1 else Varies(seen)


def _describe(v: Any) -> str:
    if isinstance(v, Varies):
        return "varies: " + "; ".join(_fmt_param(x) for x in v)
    return _fmt_param(v)


def setting(runs: Sequence[Run], rows: Sequence[dict]) -> dict:
    """What every run shares (a value) or not (a list of values): dataset, model, attack, δ, seeds, ..."""
    cfgs = [r.config for r in runs if r.config]

    def get(key: str) -> Any:
        return _common(_lookup(c, key) for c in cfgs) if cfgs else None

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
        "mechanism": _common(r["mechanism"] for r in dp) if dp else None,
        "accountant": _common(r["accountant"] for r in dp) if dp else None,
        "delta": _common(r["delta"] for r in dp) if dp else None,
        "seeds": sorted({r["seed"] for r in rows if r["seed"] is not None}, key=lambda x: _natural_key(str(x))),
    }


def _delta_text(st: dict) -> str:
    if st["delta"] is None:
        return "no run has a privacy accountant"
    parts = [f"δ {_describe(st['delta'])}" if isinstance(st["delta"], Varies) else f"δ = {_fmt_param(st['delta'])}"]
    if st["accountant"] is not None:
        acc = st["accountant"]
        parts.append(f"accountant {_describe(acc)}" if isinstance(acc, Varies) else f"{str(acc).upper()} accountant")
    if st["mechanism"] is not None:
        parts.append(f"mechanism {_describe(st['mechanism'])}")
    return ", ".join(parts)


def _seeds_text(st: dict, groups: Sequence[dict]) -> str:
    seeds = ", ".join(map(str, st["seeds"])) or "unknown"
    ns = sorted({g["final_test_accuracy"]["n"] for g in groups if g["runs"]})
    if ns and max(ns) > 1:
        n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        return f"seeds {seeds}; mean ± std over n = {n} runs per point"
    return f"seed{'s' if len(st['seeds']) > 1 else ''} {seeds}; one run per point"


# ---------------------------------------------------------------- pictures
def _metric_panels(groups: Sequence[dict]) -> list[tuple[str, str, float]]:
    """(metric key, axis label with unit, scale) of the metrics some completed run has."""
    panels = [("final_test_accuracy", "final test accuracy (%)", 100.0)]
    if any(g["psnr_mean"]["n"] for g in groups):
        panels.append(("psnr_mean", "attack PSNR (dB, mean over attacks)", 1.0))
    if any(g["label_accuracy_mean"]["n"] for g in groups):
        panels.append(("label_accuracy_mean", "attack label accuracy (%)", 100.0))
    return [p for p in panels if any(g[p[0]]["n"] for g in groups)]


def _brief(v: Any) -> str:
    return "{" + ", ".join(_fmt_param(x) for x in v) + "}" if isinstance(v, Varies) else _fmt_param(v)


def _title(st: dict, seeds: str) -> str:
    line1 = (f"attack {_brief(st['attack'])} vs defense {_brief(st['defense'])} — {_brief(st['dataset'])} / "
             f"{_brief(st['model'])}, {_brief(st['num_clients'])} clients, {_brief(st['num_rounds'])} rounds")
    return f"{line1}\nε: worst-case client, {_delta_text(st)}; {seeds}"


def _series(groups: Sequence[dict], x_key: str | None) -> dict[str, list[dict]]:
    """Groups split by the values of every swept key but ``x_key`` (one line per value)."""
    out: dict[str, list[dict]] = {}
    for g in groups:
        out.setdefault(_group_label({k: v for k, v in g["params"].items() if k != x_key}), []).append(g)
    return out


def plot_epsilon(groups: Sequence[dict], x_key: str | None, st: dict, seeds: str, path: Path) -> bool:
    """ε (x) against each metric (y); runs with ε = ∞ at a separate, labelled position on the right.
    Points are labelled with their ``x_key`` value; one line per value of the other swept keys.
    Returns False (and draws nothing) when no completed run has a finite ε."""
    pts = [g for g in groups if g["runs"] and g["epsilon"]["mean"] is not None and not math.isnan(g["epsilon"]["mean"])]
    finite = [g["epsilon"]["mean"] for g in pts if math.isfinite(g["epsilon"]["mean"])]
    if not finite:
        return False
    has_inf = any(math.isinf(g["epsilon"]["mean"]) for g in pts)
    lo, hi = min(finite), max(finite)
    log = lo > 0 and hi / lo > 10
    if log:
        span = max(math.log10(hi) - math.log10(lo), 1.0)
        x_inf = 10 ** (math.log10(hi) + 0.3 * span)
        x_sep = math.sqrt(hi * x_inf)
    else:
        span = (hi - lo) or abs(hi) or 1.0
        x_inf = hi + 0.3 * span
        x_sep = (hi + x_inf) / 2
    series = _series(pts, x_key)
    connect = x_key is not None and _numeric([g["params"][x_key] for g in pts])  # a line only along a number
    panels = _metric_panels(pts)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for i, (name, members) in enumerate(series.items()):
            sel = [g for g in members if g[key]["mean"] is not None]
            xs = [x_inf if math.isinf(g["epsilon"]["mean"]) else g["epsilon"]["mean"] for g in sel]
            ys = [g[key]["mean"] * scale for g in sel]
            yerr = [(g[key]["std"] or 0.0) * scale for g in sel]
            xerr = [0.0 if math.isinf(g["epsilon"]["mean"]) else (g["epsilon"]["std"] or 0.0) for g in sel]
            if connect:
                line = sorted((x, y) for x, y in zip(xs, ys) if x != x_inf)  # a frontier: finite ε only
                ax.plot([p[0] for p in line], [p[1] for p in line], "-", color=f"C{i}", alpha=0.5, lw=1)
            ax.errorbar(xs, ys, yerr=yerr if any(yerr) else None, xerr=xerr if any(xerr) else None,
                        fmt="o", color=f"C{i}", capsize=3, ms=6, label=name or None)
            if len(pts) <= 16 and x_key is not None:
                for x, y, g in zip(xs, ys, sel):
                    right = x == x_inf  # the ∞ column: label to the left, inside the axes
                    ax.annotate(_group_label({x_key: g["params"][x_key]}), (x, y), textcoords="offset points",
                                xytext=(-5, 4) if right else (5, 4), ha="right" if right else "left",
                                fontsize=7, color=f"C{i}")
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.margins(x=0.08, y=0.12)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.set_xlabel("ε (worst-case client; lower = more private)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if has_inf:  # a separate, shaded position right of the finite ε axis
            left, right = ax.get_xlim()[0], (x_inf * 1.8 if log else x_inf + 0.12 * span)
            ticks = [t for t in ax.get_xticks() if left <= t < x_sep]
            ax.axvline(x_sep, color="0.5", ls="--", lw=0.8)
            ax.axvspan(x_sep, right, color="0.93", zorder=0)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ticks + [x_inf])
            ax.set_xticklabels([_fmt_eps(float(t)) for t in ticks] + [INF_LABEL])
            ax.set_xlim(left, right)
    fig.suptitle(_title(st, seeds), fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_parameter(groups: Sequence[dict], x_key: str, st: dict, seeds: str, path: Path) -> bool:
    """The swept parameter ``x_key`` (x) against each metric (y); one line per value of the other
    swept parameters. Returns False when there is nothing to draw."""
    pts = [g for g in groups if g["runs"]]
    if not pts:
        return False
    xvals = [g["params"][x_key] for g in pts]
    numeric = _numeric(xvals)
    cats = list(dict.fromkeys(_fmt_param(v) for v in xvals))
    series = _series(pts, x_key)
    panels = _metric_panels(pts)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for i, (name, members) in enumerate(series.items()):
            sel = [g for g in members if g[key]["mean"] is not None]
            pos = [g["params"][x_key] if numeric else cats.index(_fmt_param(g["params"][x_key])) for g in sel]
            order = sorted(range(len(sel)), key=lambda j: pos[j])
            xs = [pos[j] for j in order]
            ys = [sel[j][key]["mean"] * scale for j in order]
            yerr = [(sel[j][key]["std"] or 0.0) * scale for j in order]
            ax.errorbar(xs, ys, yerr=yerr if any(yerr) else None, fmt="o-" if numeric else "o", color=f"C{i}",
                        capsize=3, ms=6, label=name or None)
        ax.margins(x=0.08, y=0.12)
        if not numeric:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=20 if max(map(len, cats)) > 8 else 0, fontsize=8)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_xlabel(PARAMETER_LABELS.get(x_key, x_key))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(_title(st, seeds), fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the report
def _json_safe(o: Any) -> Any:
    if isinstance(o, Varies):
        return {"varies": [_json_safe(v) for v in o]}
    if isinstance(o, float):
        if math.isinf(o):
            return "inf" if o > 0 else "-inf"
        if math.isnan(o):
            return None
        return o
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def runs_table(rows: Sequence[dict], params: Sequence[str], delta: Any) -> str:
    eps_head = f"ε (δ={_fmt_param(delta)})" if delta is not None and not isinstance(delta, Varies) else "ε"
    head = (["run"] + list(params) + ["seed", "status", eps_head, "final test acc. (%)", "PSNR (dB)", "SSIM",
                                       "label acc. (%)", "attacks"])
    align = ["---"] * (1 + len(params)) + ["---:", "---"] + ["---:"] * 6
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        eps = _fmt_eps(r["epsilon"])
        if r["status"] == "completed" and isinstance(delta, Varies) and r["delta"] is not None:
            eps += f" (δ={_fmt_param(r['delta'])})"
        if r["status"] == "completed" and r["mechanism"] is None and r["epsilon"] is not None \
                and math.isinf(r["epsilon"]):
            eps = "∞ (no DP)"
        elif r["status"] == "completed" and r["epsilon"] is None:
            eps = "not accounted"
        if r["central_epsilon"] is not None:
            eps += f"; central DP {_fmt_eps(r['central_epsilon'])}"
        if r["clients_stopped"]:
            eps += f" (budget {_fmt_param(r['epsilon_budget'])}: {r['clients_stopped']} client(s) stopped)"
        if r["status"] != "completed":
            label_acc, attacks = "—", "—"
        elif r["labels_known"] and r["label_accuracy_mean"] is None and r["attack_entries"]:
            label_acc, attacks = "given", str(r["attack_entries"])
        else:
            label_acc, attacks = _fmt(_pct(r["label_accuracy_mean"]), 1), str(r["attack_entries"])
        if r["status"] == "completed" and (r["attack_failures"] or r["attacks_skipped"]):
            attacks += f" ({r['attack_failures']} failed, {r['attacks_skipped']} skipped)"
        cells = ([r["run"]] + [_fmt_param(r["params"][k]) for k in params]
                 + [_fmt_param(r["seed"]), r["status"], eps, _fmt(_pct(r["final_test_accuracy"]), 1),
                    _fmt(r["psnr_mean"], 2), _fmt(r["ssim_mean"], 3), label_acc, attacks])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def groups_table(groups: Sequence[dict], params: Sequence[str]) -> str:
    head = list(params) + ["n", "ε", "final test acc. (%)", "PSNR (dB)", "SSIM", "label acc. (%)", "seeds", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(params) + ["---:"] * 6 + ["---"] * 2) + "|"]
    for g in groups:
        cells = ([_fmt_param(g["params"][k]) for k in params]
                 + [str(len(g["runs"])), _fmt_stat(g["epsilon"], eps=True),
                    _fmt_stat(g["final_test_accuracy"], 100.0, 1), _fmt_stat(g["psnr_mean"], 1.0, 2),
                    _fmt_stat(g["ssim_mean"], 1.0, 3), _fmt_stat(g["label_accuracy_mean"], 100.0, 1),
                    ", ".join(map(str, g["seeds"])) or "—", ", ".join(g["failed"]) or "—"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``sweep_report.md``, ``sweep.json`` and the pictures into ``sweep_dir``; return the
    report's path. Raises ``SweepReportError`` if the directory is missing or holds no runs.

    The CLI calls it at the end of a sweep (``fl-sim -m ...``); ``fl-sim-report`` calls it on demand."""
    return _write(Path(sweep_dir))[0]


def _write(sweep_dir: Path) -> tuple[Path, str]:
    """The report's path and its table of runs (markdown)."""
    if not sweep_dir.is_dir():
        raise SweepReportError(f"{sweep_dir} is not a directory")
    runs = find_runs(sweep_dir)
    if not runs:
        hint = (" (it is a run directory: give the sweep directory above it)"
                if (sweep_dir / "summary.json").is_file() else "")
        raise SweepReportError(f"no runs in {sweep_dir}: no sub-folder holds summary.json{hint}")
    multirun = read_multirun(sweep_dir)
    keys, source = swept_keys(runs, multirun)
    params = [k for k in keys if k != REPLICATE_KEY]
    rows = [run_row(r, params) for r in runs]
    groups = aggregate(rows, params)
    st = setting(runs, rows)
    seeds = _seeds_text(st, groups)
    completed = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] != "completed"]

    pictures: list[tuple[str, str]] = []
    notes: list[str] = []
    for p in (EPSILON_PLOT, PARAMETER_PLOT):  # never leave a picture of an earlier report behind
        (sweep_dir / p).unlink(missing_ok=True)
    x_key = next((k for k in params if len({_fmt_param(g["params"][k]) for g in groups if g["runs"]}) > 1), None)
    if plot_epsilon(groups, x_key, st, seeds, sweep_dir / EPSILON_PLOT):
        pictures.append((EPSILON_PLOT, "ε against final test accuracy and attack success"))
    elif completed:
        notes.append("No ε picture: no completed run has a finite ε (all are ∞: no DP, or no noise).")
    if x_key is not None and plot_parameter(groups, x_key, st, seeds, sweep_dir / PARAMETER_PLOT):
        pictures.append((PARAMETER_PLOT, f"{x_key} against final test accuracy and attack success"))
    elif params and completed:
        notes.append("No parameter picture: the completed runs share one value of every swept parameter.")
    if completed and not any(r["attack_entries"] for r in completed):
        notes.append("No attack was scored in any completed run: the pictures show accuracy only.")

    command = task_overrides(multirun)
    table = runs_table(rows, params, st["delta"])
    labels = {True: "labels known to the server", False: "labels recovered by the attack"}.get(
        st["labels_known"], f"labels known: {_describe(st['labels_known'])}") \
        if not isinstance(st["labels_known"], Varies) else f"labels known: {_describe(st['labels_known'])}"
    attack = (f"{_describe(st['attack'])} on clients {_describe(st['attack_target_clients'])}, {labels}"
              if st["attack"] != "none" else "none (honest server)")
    out = [
        "# fl-sim sweep report",
        "",
        f"Sweep directory: `{sweep_dir.resolve()}`" + (f" — `fl-sim -m {' '.join(command)}`" if command else ""),
        "",
        f"{len(rows)} run(s): {len(completed)} completed, {len(failed)} failed. "
        f"Swept ({'from ' + source}): " + (", ".join(f"`{k}`" for k in keys) or "nothing")
        + (f"; `{REPLICATE_KEY}` is the replicate (runs that differ only in it are averaged)."
           if REPLICATE_KEY in keys else "."),
        "",
        "## Setting",
        "",
        "| | |",
        "|---|---|",
        f"| dataset / model | {_describe(st['dataset'])} / {_describe(st['model'])} |",
        f"| clients / rounds | {_describe(st['num_clients'])} / {_describe(st['num_rounds'])} |",
        f"| scenario / strategy | {_describe(st['scenario'])} / {_describe(st['strategy'])} |",
        f"| attack | {attack} |",
        f"| defense | {_describe(st['defense'])} |",
        f"| privacy | ε of the worst-case client; {_delta_text(st)} |",
        f"| seeds | {seeds} |",
        "",
        "## Runs",
        "",
        table,
        "",
        "ε: the worst client's ε(δ), composed over every round it trained; ∞ (no DP): no privacy mechanism "
        "(or no noise). Final test accuracy: the global model on the held-out test split after the last round. "
        "PSNR / SSIM / label accuracy: mean over the run's scored attack entries (one entry = one attacked "
        "client in one round, itself a mean over that client's batch after Hungarian matching); "
        "`attacks` counts them. Label accuracy \"given\": the server knew the labels.",
        "",
    ]
    if any(len(g["runs"]) > 1 for g in groups):
        out += ["## Mean ± std over seeds", "", groups_table(groups, params), "",
                "std: sample standard deviation (n − 1); failed runs are not in the means.", ""]
    out += ["## Pictures", ""]
    for name, caption in pictures:
        out += [f"![{caption}]({name})", "", f"*{caption}. {seeds}; ε: worst-case client, {_delta_text(st)}. "
                + ("Error bars: ± 1 std over seeds. " if "mean ± std" in seeds else "")
                + "Failed runs are not drawn.*", ""]
    for note in notes:
        out += [note, ""]
    if not pictures and not notes:
        out += ["No pictures: no run completed.", ""]
    out += ["## Failed runs", ""]
    if failed:
        for r in failed:
            where = [f"{k}={_fmt_param(v)}" for k, v in r["params"].items() if v is not None]
            where += [f"seed {_fmt_param(r['seed'])}"] if r["seed"] is not None else []
            out.append(f"- run `{r['run']}`" + (f" ({', '.join(where)})" if where else "")
                       + f", after {r['rounds_completed']} round(s): {r['error']}")
    else:
        out.append("None.")
    out.append("")

    _write_text(sweep_dir / JSON_NAME, json.dumps(_json_safe({
        "sweep_dir": str(sweep_dir.resolve()),
        "command": command,
        "swept": keys,
        "swept_from": source,
        "replicate_key": REPLICATE_KEY,
        "setting": st,
        "runs": rows,
        "groups": groups,
        "pictures": [name for name, _ in pictures],
    }), indent=2, default=str))
    path = sweep_dir / REPORT_NAME
    _write_text(path, "\n".join(out))
    return path, table


def _write_text(path: Path, text: str) -> None:
    """Write to a temporary file, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    """``fl-sim-report SWEEP_DIR``: write the report; print its path and the table of runs."""
    parser = argparse.ArgumentParser(prog="fl-sim-report", description=(
        "Write sweep_report.md, sweep.json and PNG pictures into the directory of an fl-sim sweep "
        "(fl-sim -m ...), from the summary.json of each of its runs."))
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="e.g. multirun/2026-11-22/08-00-00")
    args = parser.parse_args(argv)
    try:
        path, table = _write(Path(args.sweep_dir))
    except SweepReportError as e:
        print(f"fl-sim-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path.resolve())
    print(table)


if __name__ == "__main__":
    main()
