"""A sweep's pictures: ε against final accuracy and attack success (runs without DP at a labelled ∞
position), the swept parameter against the same metrics, one line per value of the other swept keys,
and the trade-off: attack success against final accuracy, one labelled point per setting; error bars
over seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullLocator  # noqa: E402

from fl_sim.sweep.text import fmt_eps, fmt_param, group_label, title  # noqa: E402

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


def _metric_panels(groups: Sequence[dict]) -> list[tuple[str, str, float]]:
    """(metric key, axis label with unit, scale) of the metrics some completed run has."""
    panels = [("final_test_accuracy", "final test accuracy (%)", 100.0)]
    if any(g["psnr_mean"]["n"] for g in groups):
        panels.append(("psnr_mean", "attack PSNR (dB, mean over attacks)", 1.0))
    if any(g["label_accuracy_mean"]["n"] for g in groups):
        panels.append(("label_accuracy_mean", "attack label accuracy (%)", 100.0))
    if any(g["mi_attack_accuracy_mean"]["n"] for g in groups):
        panels.append(("mi_attack_accuracy_mean", "model-inversion attack accuracy (%)", 100.0))
    return [p for p in panels if any(g[p[0]]["n"] for g in groups)]


def _series(groups: Sequence[dict], x_key: str | None) -> dict[str, list[dict]]:
    """Groups split by the values of every swept key but ``x_key`` (one line per value)."""
    out: dict[str, list[dict]] = {}
    for g in groups:
        out.setdefault(group_label({k: v for k, v in g["params"].items() if k != x_key}), []).append(g)
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
                    ax.annotate(group_label({x_key: g["params"][x_key]}), (x, y), textcoords="offset points",
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
            ax.set_xticklabels([fmt_eps(float(t)) for t in ticks] + [INF_LABEL])
            ax.set_xlim(left, right)
    fig.suptitle(title(st, seeds), fontsize=8.5)
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
    cats = list(dict.fromkeys(fmt_param(v) for v in xvals))
    series = _series(pts, x_key)
    panels = _metric_panels(pts)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for i, (name, members) in enumerate(series.items()):
            sel = [g for g in members if g[key]["mean"] is not None]
            pos = [g["params"][x_key] if numeric else cats.index(fmt_param(g["params"][x_key])) for g in sel]
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
    fig.suptitle(title(st, seeds), fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def tradeoff_points(groups: Sequence[dict]) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """For each attack metric some completed setting has: (setting's label, final test accuracy %, metric in
    its unit, the two standard deviations over seeds, 0 with one run) per setting."""
    pts = [g for g in groups if g["runs"] and g["final_test_accuracy"]["mean"] is not None]
    out: dict[str, list[tuple[str, float, float, float, float]]] = {}
    for key, _, scale in _metric_panels(pts):
        if key == "final_test_accuracy":
            continue
        several = lambda g: len(g["runs"]) > 1  # noqa: E731
        out[key] = [(group_label(g["params"]) or "(one setting)", g["final_test_accuracy"]["mean"] * 100.0,
                     g[key]["mean"] * scale, (g["final_test_accuracy"]["std"] or 0.0) * 100.0 if several(g) else 0.0,
                     (g[key]["std"] or 0.0) * scale if several(g) else 0.0)
                    for g in pts if g[key]["mean"] is not None]
    return out


def plot_tradeoff(groups: Sequence[dict], st: dict, seeds: str, path: Path) -> bool:
    """The privacy-utility trade-off: final test accuracy (x) against each attack metric (y), one labelled
    point per setting (the swept values). Returns False when no completed setting has an attack metric."""
    points = tradeoff_points(groups)
    if not points:
        return False
    labels = {key: label for key, label, _ in _metric_panels([g for g in groups if g["runs"]])}
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 4.0), squeeze=False)
    for ax, (key, pts) in zip(axes[0], points.items()):
        for i, (name, x, y, xerr, yerr) in enumerate(pts):
            ax.errorbar([x], [y], xerr=[xerr] if xerr else None, yerr=[yerr] if yerr else None, fmt="o",
                        color=f"C{i % 10}", capsize=3, ms=6)
            if len(pts) <= 16:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=f"C{i % 10}")
        ax.margins(x=0.15, y=0.15)
        ax.set_xlabel("final test accuracy (%, higher = more useful)")
        ax.set_ylabel(labels[key] + "\n(lower = more private)")
        ax.grid(alpha=0.3)
    fig.suptitle(title(st, seeds), fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True
