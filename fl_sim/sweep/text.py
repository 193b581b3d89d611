"""How a sweep's numbers read: formatting (ε, ∞, means ± std), labels and titles, and the markdown
tables of runs and of groups over seeds."""

from __future__ import annotations

import math
from typing import Any, Sequence

from fl_sim.sweep.runs import Varies

# Short names for the labels next to points (the key's last part otherwise).
SHORT_NAMES = {"defense.noise_multiplier": "σ", "defense.max_grad_norm": "C", "defense.prune_ratio": "prune",
               "num_clients": "clients"}


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}f}"
    return str(v)


def fmt_eps(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v) or math.isnan(v):
        return fmt(v)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(map(fmt_param, v)) + "]"
    return "null" if v is None else str(v)


def pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def fmt_stat(st: dict, scale: float = 1.0, digits: int = 2, eps: bool = False) -> str:
    if st["mean"] is None:
        return "—"
    mean = st["mean"] * scale
    text = fmt_eps(mean) if eps else fmt(mean, digits)
    if st["std"] is not None and not (eps and st["std"] == 0):  # ε is usually the same for every seed
        text += " ± " + (fmt_eps(st["std"] * scale) if eps else fmt(st["std"] * scale, digits))
    return text


def short(key: str) -> str:
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def group_label(params: dict) -> str:
    return ", ".join(f"{short(k)}={fmt_param(v)}" for k, v in params.items())


def describe(v: Any) -> str:
    if isinstance(v, Varies):
        return "varies: " + "; ".join(fmt_param(x) for x in v)
    return fmt_param(v)


def delta_text(st: dict) -> str:
    if st["delta"] is None:
        return "no run has a privacy accountant"
    parts = [f"δ {describe(st['delta'])}" if isinstance(st["delta"], Varies) else f"δ = {fmt_param(st['delta'])}"]
    if st["accountant"] is not None:
        acc = st["accountant"]
        parts.append(f"accountant {describe(acc)}" if isinstance(acc, Varies) else f"{str(acc).upper()} accountant")
    if st["mechanism"] is not None:
        parts.append(f"mechanism {describe(st['mechanism'])}")
    return ", ".join(parts)


def seeds_text(st: dict, groups: Sequence[dict]) -> str:
    seeds = ", ".join(map(str, st["seeds"])) or "unknown"
    ns = sorted({g["final_test_accuracy"]["n"] for g in groups if g["runs"]})
    if ns and max(ns) > 1:
        n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        return f"seeds {seeds}; mean ± std over n = {n} runs per point"
    return f"seed{'s' if len(st['seeds']) > 1 else ''} {seeds}; one run per point"


def brief(v: Any) -> str:
    return "{" + ", ".join(fmt_param(x) for x in v) + "}" if isinstance(v, Varies) else fmt_param(v)


def title(st: dict, seeds: str) -> str:
    line1 = (f"attack {brief(st['attack'])} vs defense {brief(st['defense'])} — {brief(st['dataset'])} / "
             f"{brief(st['model'])}, {brief(st['num_clients'])} clients, {brief(st['num_rounds'])} rounds")
    return f"{line1}\nε: worst-case client, {delta_text(st)}; {seeds}"


def json_safe(o: Any) -> Any:
    if isinstance(o, Varies):
        return {"varies": [json_safe(v) for v in o]}
    if isinstance(o, float):
        if math.isinf(o):
            return "inf" if o > 0 else "-inf"
        if math.isnan(o):
            return None
        return o
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


def runs_table(rows: Sequence[dict], params: Sequence[str], delta: Any) -> str:
    eps_head = f"ε (δ={fmt_param(delta)})" if delta is not None and not isinstance(delta, Varies) else "ε"
    head = (["run"] + list(params) + ["seed", "status", eps_head, "final test acc. (%)", "PSNR (dB)", "SSIM",
                                       "label acc. (%)", "attacks", "MI attack acc. (%)"])
    align = ["---"] * (1 + len(params)) + ["---:", "---"] + ["---:"] * 7
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        eps = fmt_eps(r["epsilon"])
        if r["status"] == "completed" and isinstance(delta, Varies) and r["delta"] is not None:
            eps += f" (δ={fmt_param(r['delta'])})"
        if r["status"] == "completed" and r["mechanism"] is None and r["epsilon"] is not None \
                and math.isinf(r["epsilon"]):
            eps = "∞ (no DP)"
        elif r["status"] == "completed" and r["epsilon"] is None:
            eps = "not accounted"
        if r["central_epsilon"] is not None:
            eps += f"; central DP {fmt_eps(r['central_epsilon'])}"
        if r["clients_stopped"]:
            eps += f" (budget {fmt_param(r['epsilon_budget'])}: {r['clients_stopped']} client(s) stopped)"
        if r["status"] != "completed":
            label_acc, attacks = "—", "—"
        elif r["labels_known"] and r["label_accuracy_mean"] is None and r["attack_entries"]:
            label_acc, attacks = "given", str(r["attack_entries"])
        else:
            label_acc, attacks = fmt(pct(r["label_accuracy_mean"]), 1), str(r["attack_entries"])
        if r["status"] == "completed" and (r["attack_failures"] or r["attacks_skipped"]):
            attacks += f" ({r['attack_failures']} failed, {r['attacks_skipped']} skipped)"
        cells = ([r["run"]] + [fmt_param(r["params"][k]) for k in params]
                 + [fmt_param(r["seed"]), r["status"], eps, fmt(pct(r["final_test_accuracy"]), 1),
                    fmt(r["psnr_mean"], 2), fmt(r["ssim_mean"], 3), label_acc, attacks,
                    fmt(pct(r["mi_attack_accuracy_mean"]), 1)])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def groups_table(groups: Sequence[dict], params: Sequence[str]) -> str:
    head = list(params) + ["n", "ε", "final test acc. (%)", "PSNR (dB)", "SSIM", "label acc. (%)", "seeds", "failed",
                           "MI attack acc. (%)"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * len(params) + ["---:"] * 6 + ["---"] * 2 + ["---:"]) + "|"]
    for g in groups:
        cells = ([fmt_param(g["params"][k]) for k in params]
                 + [str(len(g["runs"])), fmt_stat(g["epsilon"], eps=True),
                    fmt_stat(g["final_test_accuracy"], 100.0, 1), fmt_stat(g["psnr_mean"], 1.0, 2),
                    fmt_stat(g["ssim_mean"], 1.0, 3), fmt_stat(g["label_accuracy_mean"], 100.0, 1),
                    ", ".join(map(str, g["seeds"])) or "—", ", ".join(g["failed"]) or "—",
                    fmt_stat(g["mi_attack_accuracy_mean"], 100.0, 1)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
