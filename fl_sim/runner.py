"""One run: a composed config -> Flower simulation on Ray -> run directory (summary.json, report.md, PNGs).

``run(cfg, run_dir)`` is the whole job; the CLI (``fl_sim.cli``) is a thin Hydra wrapper around it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import fl_sim._quiet  # noqa: F401
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fl_sim.config import Config, ConfigError, defense_name, register_configs, validate

log = logging.getLogger("fl_sim")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the packaged config with Hydra overrides (the same config ``fl-sim`` would run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fl_sim.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def new_run_dir(parent: str | os.PathLike) -> Path:
    path = Path(parent) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunRecorder:
    """Collects what a run produces and writes the run directory.

    The ServerApp thread calls ``started()`` once clients answered (Ray is up) and ``round(...)``
    after each round; the runner calls ``finish(status)``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.t_sim_start: float | None = None
        self.t_first_round: float | None = None
        self.t_sim_end: float | None = None
        self.rounds: list[dict] = []
        self.attacks: list[dict] = []
        self.skipped_attacks: list[dict] = []
        self.privacy: dict | None = None
        self.data_info: dict | None = None
        self.model_info: dict | None = None
        self.summary: dict | None = None

    # --- called while running
    def simulation_starting(self) -> None:
        self.t_sim_start = time.perf_counter()

    def started(self) -> None:
        self.t_first_round = time.perf_counter()
        log.info("clients ready after %.1f s (Ray start-up)", self.t_first_round - (self.t_sim_start or self.t_start))

    def round(self, **entry: Any) -> None:
        self.rounds.append(entry)
        train = f"{entry['train_loss']:.4f}" if entry.get("train_loss") is not None else "n/a"
        fails = f"  failures {entry['failures']}" if entry.get("failures") else ""
        if entry.get("trained") is not None and entry["trained"] != len(entry["clients"]) - entry.get("failures", 0):
            fails += f"  trained {entry['trained']}"
        log.info("round %d/%d  clients %d  train_loss %s  test_loss %.4f  test_accuracy %.4f  (%.1f s)%s",
                 entry["round"], self.cfg.num_rounds, len(entry["clients"]), train, entry["test_loss"],
                 entry["test_accuracy"], entry["seconds"], fails)

    def attack(self, entry: dict) -> None:
        self.attacks.append(entry)
        if entry.get("error"):
            log.info("attack %s round %d client %s failed: %s", entry["attack"], entry["round"], entry["client"],
                     entry["error"])
            return
        labels = f"  label accuracy {entry['label_accuracy']:.2f}" if entry.get("label_accuracy") is not None else ""
        if entry.get("psnr") is None:  # a label-only attack
            log.info("attack %s round %d client %s (%d examples, observed %s):%s  (%.1f s)", entry["attack"],
                     entry["round"], entry["client"], entry["batch_size"], entry["observed"], labels, entry["seconds"])
            return
        log.info("attack %s round %d client %s (%d examples): PSNR %.2f dB  SSIM %.3f%s  (%.1f s)", entry["attack"],
                 entry["round"], entry["client"], entry["batch_size"], entry["psnr"], entry["ssim"], labels,
                 entry["seconds"])

    def simulation_finished(self) -> None:
        self.t_sim_end = time.perf_counter()

    # --- the run directory
    def timing(self) -> dict:
        now = time.perf_counter()
        sim = (self.t_sim_end or now) - self.t_sim_start if self.t_sim_start else 0.0
        startup = (self.t_first_round - self.t_sim_start) if (self.t_first_round and self.t_sim_start) else None
        return {
            "total_seconds": now - self.t_start,
            "simulation_seconds": sim,
            "startup_seconds": startup,
            "attack_seconds": float(sum(r.get("attack_seconds", 0.0) for r in self.rounds)),  # wall time
        }

    def finish(self, status: str, error: str | None = None) -> dict:
        summary: dict[str, Any] = {"status": status}
        if error is not None:
            summary["error"] = error
        summary.update({
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "rounds": self.rounds,
            "attacks": self.attacks,
            "attacks_skipped": self.skipped_attacks,
            "privacy": self.privacy,
            "timing": self.timing(),
            "data": self.data_info,
            "model": self.model_info,
            "run_dir": str(self.run_dir.resolve()),
            "versions": _versions(),
        })
        self.summary = summary
        write_json_atomic(self.run_dir / "summary.json", summary)
        if status == "completed" and self.cfg.report:
            from fl_sim.report import write_report

            write_report(self.run_dir, summary)
        return summary


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fl-sim", "flwr", "ray", "torch", "opacus", "flwr-datasets", "hydra-core", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def backend_config(cfg: DictConfig) -> dict:
    """Flower's Ray backend config: client resources and ray.init arguments (logs tamed)."""
    b = cfg.backend
    init_args: dict[str, Any] = {"logging_level": logging.DEBUG if cfg.verbose else logging.ERROR,
                                 "log_to_driver": bool(cfg.verbose)}
    if b.ray_address:
        init_args["address"] = str(b.ray_address)
    else:
        # a new local instance, always: never one recorded in /tmp/ray/ray_current_cluster (a stale record
        # of a killed run made ray.init wait for a dead cluster) nor another run's
        init_args["address"] = "local"
        if cfg.attack.name != "none" and cfg.attack.workers > 0:
            from fl_sim.attacking import ATTACK_RESOURCE

            init_args["resources"] = {ATTACK_RESOURCE: int(cfg.attack.workers)}
        if b.num_cpus is not None:
            init_args["num_cpus"] = int(b.num_cpus)
        if b.num_gpus is not None:
            init_args["num_gpus"] = int(b.num_gpus)
    return {
        # Flower's actor pool keeps a dead actor's handle: Ray restarts its process (max_restarts), so a
        # client process that dies costs its message, not every later message sent to that actor
        "client_resources": {"num_cpus": float(b.client_resources.num_cpus),
                             "num_gpus": float(b.client_resources.num_gpus),
                             "max_restarts": int(b.max_actor_restarts),
                             # a task whose actor died is run once more: a message that caught the actor
                             # restarting gets through (a simulated crash, being seeded, crashes again)
                             "max_task_retries": 1 if b.max_actor_restarts != 0 else 0},
        "init_args": init_args,
    }


def _tame_logs(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR
    for name in ("flwr", "ray", "datasets", "filelock"):
        logging.getLogger(name).setLevel(level)


def prepare(cfg: DictConfig, recorder: RunRecorder) -> None:
    """Validate the config and build data and model once in the driver, so that bad input
    fails here with one clear line, before Ray starts."""
    from fl_sim.apps import initial_model, workspace
    from fl_sim.models import num_parameters

    validate(cfg)
    cfg.defense.name = defense_name(cfg)  # "dpsgd+prune" when stacked
    try:
        ws = workspace(cfg, "server")
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{e} (dataset={cfg.dataset.name})") from e
    d = ws.data
    recorder.data_info = {
        "dataset": cfg.dataset.name,
        "input_shape": list(d.input_shape),
        "num_classes": d.num_classes,
        "num_train": int(len(d.y_train)),
        "num_test": int(len(d.y_test)),
        "unassigned": int(len(d.y_train) - sum(len(p) for p in d.partitions)),  # examples no client holds
        "partition": cfg.partition.name,
        "clients": [{"client": i, "size": int(len(p)), "labels": h}
                    for i, (p, h) in enumerate(zip(d.partitions, d.label_histograms()))],
    }
    init = initial_model(cfg, d)
    if cfg.scenario.name == "split":
        from fl_sim.split import cut_of, split

        split(cfg, init)  # an invalid cut fails here, naming the valid ones
        cfg.scenario.cut_layer = cut_of(cfg, init)
    digest = hashlib.sha256()
    for k, v in init.state_dict().items():
        digest.update(k.encode() + v.detach().cpu().numpy().tobytes())
    recorder.model_info = {"name": cfg.model.name, "parameters": num_parameters(init),
                           "initial_sha256": digest.hexdigest()}


def run(cfg: DictConfig, run_dir: str | os.PathLike, resume_from: dict | None = None) -> dict:
    """Run one experiment; always leaves ``summary.json`` (``status`` "completed" or "failed").
    ``resume_from``: a checkpoint (``fl_sim.checkpoint.load``) of this run to continue from."""
    recorder = RunRecorder(cfg, Path(run_dir))
    if resume_from is not None:
        from fl_sim import checkpoint

        checkpoint.restore_recorder(recorder, resume_from["recorder"])
    try:
        from flwr.simulation import run_simulation

        from fl_sim.apps import make_client_app, make_server_app

        _tame_logs(cfg.verbose)  # after flwr's import, which sets its logger to DEBUG
        prepare(cfg, recorder)

        plain = OmegaConf.to_container(cfg, resolve=True)
        log.info("fl-sim: %s, %s, %d clients (%s), %s, %d rounds -> %s", cfg.dataset.name, cfg.model.name,
                 cfg.num_clients, cfg.partition.name, cfg.strategy.name, cfg.num_rounds, recorder.run_dir)
        recorder.simulation_starting()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
            run_simulation(
                server_app=make_server_app(cfg, recorder, resume_from),
                client_app=make_client_app(plain),
                num_supernodes=cfg.num_clients,
                backend_config=backend_config(cfg),
                verbose_logging=bool(cfg.verbose),
            )
        recorder.simulation_finished()
        if len(recorder.rounds) != cfg.num_rounds:
            raise RuntimeError(f"the simulation ended after {len(recorder.rounds)} of {cfg.num_rounds} rounds")
        summary = recorder.finish("completed")
        from fl_sim.checkpoint import FILE

        (recorder.run_dir / FILE).unlink(missing_ok=True)  # a completed run needs no checkpoint
        return summary
    except BaseException as e:  # noqa: BLE001 - the failure is recorded, then re-raised
        recorder.simulation_finished()
        recorder.finish("failed", error=_one_line(e))
        raise


def resume(run_dir: str | os.PathLike) -> dict:
    """Continue the interrupted run in ``run_dir`` from its checkpoint, with the config it was started
    with; ends with the summary.json an uninterrupted run would have written (timings aside)."""
    from fl_sim import checkpoint

    ck = checkpoint.load(Path(run_dir))
    register_configs()
    cfg = OmegaConf.merge(OmegaConf.structured(Config), ck["config"])
    return run(cfg, run_dir, resume_from=ck)


def completed_with(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether ``run_dir`` holds a completed run of this very config (a sweep re-run skips it)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return False
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return s.get("status") == "completed" and same_config(s.get("config") or {},
                                                         OmegaConf.to_container(cfg, resolve=True))


def same_config(recorded: dict, now: dict) -> bool:
    """Whether a recorded config (summary.json, checkpoint) is the config ``now`` once prepared."""
    default_cut = now.get("scenario", {}).get("cut_layer") is None
    return _comparable(recorded, default_cut) == _comparable(now, default_cut)


def _comparable(config: dict, default_cut: bool) -> dict:
    """A config without what prepare() fills in (the stacked defense's name; the cut, if by default)."""
    c = json.loads(json.dumps(config))
    c.get("defense", {}).pop("name", None)
    if default_cut:
        c.get("scenario", {}).pop("cut_layer", None)
    return c


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    if isinstance(e, ConfigError):
        return text
    cause = e.__cause__ or e.__context__
    if not text and cause is not None:
        return _one_line(cause)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
