"""The sweep report: ``sweep_report.md``, ``sweep.json`` and the pictures written into the sweep
directory, and ``fl-sim-report SWEEP_DIR``, which writes them on demand (the CLI writes them at the
end of a sweep)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from fl_sim.sweep.plots import plot_epsilon, plot_parameter, plot_tradeoff
from fl_sim.sweep.runs import (REPLICATE_KEY, SweepReportError, Varies, aggregate, find_runs, read_multirun, run_row,
                               setting, swept_keys, task_overrides)
from fl_sim.sweep.text import delta_text, describe, fmt_param, groups_table, json_safe, runs_table, seeds_text

REPORT_NAME = "sweep_report.md"
JSON_NAME = "sweep.json"
EPSILON_PLOT = "sweep_epsilon.png"
PARAMETER_PLOT = "sweep_parameter.png"
TRADEOFF_PLOT = "sweep_tradeoff.png"


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
    seeds = seeds_text(st, groups)
    completed = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] != "completed"]

    pictures: list[tuple[str, str]] = []
    notes: list[str] = []
    for p in (EPSILON_PLOT, PARAMETER_PLOT, TRADEOFF_PLOT):  # never leave a picture of an earlier report behind
        (sweep_dir / p).unlink(missing_ok=True)
    x_key = next((k for k in params if len({fmt_param(g["params"][k]) for g in groups if g["runs"]}) > 1), None)
    if plot_epsilon(groups, x_key, st, seeds, sweep_dir / EPSILON_PLOT):
        pictures.append((EPSILON_PLOT, "ε against final test accuracy and attack success"))
    elif completed:
        notes.append("No ε picture: no completed run has a finite ε (all are ∞: no DP, or no noise).")
    if x_key is not None and plot_parameter(groups, x_key, st, seeds, sweep_dir / PARAMETER_PLOT):
        pictures.append((PARAMETER_PLOT, f"{x_key} against final test accuracy and attack success"))
    elif params and completed:
        notes.append("No parameter picture: the completed runs share one value of every swept parameter.")
    if plot_tradeoff(groups, st, seeds, sweep_dir / TRADEOFF_PLOT):
        pictures.append((TRADEOFF_PLOT, "the trade-off: attack success against final test accuracy, per setting"))
    if completed and not any(r["attack_entries"] for r in completed):
        notes.append("No attack was scored in any completed run: the pictures show accuracy only.")

    command = task_overrides(multirun)
    table = runs_table(rows, params, st["delta"])
    labels = {True: "labels known to the server", False: "labels recovered by the attack"}.get(
        st["labels_known"], f"labels known: {describe(st['labels_known'])}") \
        if not isinstance(st["labels_known"], Varies) else f"labels known: {describe(st['labels_known'])}"
    attack = (f"{describe(st['attack'])} on clients {describe(st['attack_target_clients'])}, {labels}"
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
        f"| dataset / model | {describe(st['dataset'])} / {describe(st['model'])} |",
        f"| clients / rounds | {describe(st['num_clients'])} / {describe(st['num_rounds'])} |",
        f"| scenario / strategy | {describe(st['scenario'])} / {describe(st['strategy'])} |",
        f"| attack | {attack} |",
        f"| defense | {describe(st['defense'])} |",
        f"| privacy | ε of the worst-case client; {delta_text(st)} |",
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
        "`attacks` counts them. Label accuracy \"given\": the server knew the labels. MI attack accuracy: "
        "model inversion of the final model, the share of reconstructions the evaluation classifier puts in "
        "their target class.",
        "",
    ]
    if any(len(g["runs"]) > 1 for g in groups):
        out += ["## Mean ± std over seeds", "", groups_table(groups, params), "",
                "std: sample standard deviation (n − 1); failed runs are not in the means.", ""]
    out += ["## Pictures", ""]
    for name, caption in pictures:
        out += [f"![{caption}]({name})", "", f"*{caption}. {seeds}; ε: worst-case client, {delta_text(st)}. "
                + ("Error bars: ± 1 std over seeds. " if "mean ± std" in seeds else "")
                + "Failed runs are not drawn.*", ""]
    for note in notes:
        out += [note, ""]
    if not pictures and not notes:
        out += ["No pictures: no run completed.", ""]
    out += ["## Failed runs", ""]
    if failed:
        for r in failed:
            where = [f"{k}={fmt_param(v)}" for k, v in r["params"].items() if v is not None]
            where += [f"seed {fmt_param(r['seed'])}"] if r["seed"] is not None else []
            out.append(f"- run `{r['run']}`" + (f" ({', '.join(where)})" if where else "")
                       + f", after {r['rounds_completed']} round(s): {r['error']}")
    else:
        out.append("None.")
    out.append("")

    _write_text(sweep_dir / JSON_NAME, json.dumps(json_safe({
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
