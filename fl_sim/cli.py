"""``fl-sim [hydra overrides]`` and ``python -m fl_sim``: one Hydra app around ``fl_sim.runner.run``
(``fl-sim resume=RUN_DIR`` around ``fl_sim.runner.resume``); a sweep (``-m``) ends with its report
(``fl_sim.sweep``). Config errors are one line on stderr and exit 2."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_sim.config import ConfigError, compose, register_configs

log = logging.getLogger("fl_sim")
register_configs()
_failed_jobs: list[str] = []  # runs of a sweep that failed (a sweep goes on, then exits non-zero)
_sweep_dir: list[str] = []  # the sweep folder of a multirun (for the report across runs at the end)


def _print_rounds(summary: dict) -> None:
    rows = summary["rounds"]
    print(f"\n{'round':>5} {'clients':>7} {'train loss':>10} {'test loss':>9} {'test acc':>8} {'seconds':>7}")
    for e in rows:
        tl = f"{e['train_loss']:.4f}" if e.get("train_loss") is not None else "n/a"
        print(f"{e['round']:>5} {len(e['clients']):>7} {tl:>10} {e['test_loss']:>9.4f} "
              f"{e['test_accuracy']:>8.4f} {e['seconds']:>7.1f}")
    t = summary["timing"]
    print(f"\ntotal {t['total_seconds']:.1f} s (simulation {t['simulation_seconds']:.1f} s)")


@hydra.main(config_path="pkg://fl_sim.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    # Imported when a run starts, for start-up speed: torch, Flower and Ray take seconds to import, and
    # `fl-sim --help`, `--cfg job` and a config error answer without them.
    from fl_sim import checkpoint
    from fl_sim.runner import completed_with, one_line, run, same_config

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    if sweeping and not _sweep_dir:
        _sweep_dir.append(str(HydraConfig.get().sweep.dir))
    try:
        resume_from = None
        if sweeping:  # a sweep run again into the same folder skips what completed, resumes what was cut off
            if completed_with(run_dir, cfg):
                print(f"fl-sim: {run_dir} already completed with this config: skipped")
                return
            if (run_dir / checkpoint.FILE).is_file():
                found = checkpoint.load(run_dir)
                if same_config(found["config"], OmegaConf.to_container(cfg, resolve=True)):
                    resume_from = found
                    print(f"fl-sim: resuming {run_dir} after round {found['round']}")
                else:
                    print(f"fl-sim: {run_dir} holds a checkpoint of another config: starting afresh")
        summary = run(cfg, run_dir, resume_from=resume_from)
    except ConfigError as e:
        print(f"fl-sim: error: {e}", file=sys.stderr)
        if not sweeping:
            sys.exit(2)
        _failed_jobs.append(str(run_dir))
        return
    except Exception as e:  # noqa: BLE001 - one line on the console, the traceback in the run dir
        (run_dir / "error.log").write_text(traceback.format_exc())
        print(f"fl-sim: error: the run failed: {one_line(e)}\n"
              f"fl-sim: traceback in {run_dir / 'error.log'}; summary.json has status 'failed'", file=sys.stderr)
        if not sweeping:
            sys.exit(1)
        _failed_jobs.append(str(run_dir))
        return
    _print_rounds(summary)
    print(f"run directory: {run_dir.resolve()}")


def _hydra_error_line(e: BaseException) -> str:
    """Hydra's multi-line composition error as one line (the search-path listing dropped)."""
    parts: list[str] = []
    err: BaseException | None = e
    while err is not None:
        for line in str(err).splitlines():
            line = line.strip().rstrip(".")
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("object_type=", "full_key:", "To append")) and not line.startswith("\tbase_") \
                    and not line.startswith("base_") and line not in parts:
                parts.append(line)
        err = err.__cause__
    text = "; ".join(parts).replace("Available options in", "available options in").replace(":;", ":")
    return text or type(e).__name__


def precheck(overrides: list[str]) -> str | None:
    """Compose the config as the app will; return a one-line error, or None if it composes.

    Hydra would print the same error over several lines; this keeps the CLI's promise of
    one line naming the key. Sweeps (-m) and Hydra's own flags are left to Hydra.
    """
    try:
        compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        return _hydra_error_line(e)
    return None


def run_dir_error(args: list[str]) -> str | None:
    """The run directory Hydra is about to create, created now: one that cannot be is one line naming
    ``hydra.run.dir`` (Hydra would print a traceback). A directory with interpolations is left to Hydra."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    path = Path(given[-1] if given else "outputs")
    if "${" in str(path):
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"hydra.run.dir={path}" if given else f"the run directory {path.resolve()} (hydra.run.dir)"
        return f"{where}: cannot be created ({e.strerror or type(e).__name__}); choose a writable folder"
    return None


def resume_main(run_dir: str) -> None:
    """``fl-sim resume=RUN_DIR``: continue an interrupted run from its last checkpoint."""
    from fl_sim.runner import one_line, resume  # for start-up speed, as in _app

    path = Path(run_dir)
    fl_log = logging.getLogger("fl_sim")
    fl_log.setLevel(logging.INFO)
    fl_log.propagate = False  # one line per message on the console
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    fl_log.addHandler(console)
    if path.is_dir():  # the run's own log goes on
        to_file = logging.FileHandler(path / "fl_sim.log")
        to_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        fl_log.addHandler(to_file)
    try:
        summary = resume(path)
    except ConfigError as e:
        print(f"fl-sim: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        if path.is_dir():
            (path / "error.log").write_text(traceback.format_exc())
        print(f"fl-sim: error: the resumed run failed: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    _print_rounds(summary)
    print(f"run directory: {path.resolve()}")


def main() -> None:
    args = sys.argv[1:]
    resumes = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if resumes:
        if len(args) != 1:
            print("fl-sim: error: resume=RUN_DIR takes no other arguments (the run keeps its own config)",
                  file=sys.stderr)
            sys.exit(2)
        resume_main(resumes[0])
        return
    if not any(a.startswith("-") for a in args):
        error = precheck([a for a in args if not a.startswith("hydra.") and not a.startswith("hydra/")]) \
            or run_dir_error(args)
        if error is not None:
            print(f"fl-sim: error: {error} (fl-sim --help lists the groups, fl-sim --cfg job the keys)",
                  file=sys.stderr)
            sys.exit(2)
    _app()
    if _sweep_dir:
        from fl_sim.sweep.report import write_sweep_report  # matplotlib: only a sweep needs it

        try:
            print(f"sweep report: {write_sweep_report(Path(_sweep_dir[0])).resolve()}")
        except Exception as e:  # noqa: BLE001 - the sweep's own outcome decides the exit code
            print(f"fl-sim: warning: no sweep report ({e})", file=sys.stderr)
    if _failed_jobs:
        print(f"fl-sim: {len(_failed_jobs)} run(s) of the sweep failed: {', '.join(_failed_jobs)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
