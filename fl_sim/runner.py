"""One run: a composed config -> Flower simulation on Ray -> run directory (summary.json, report.md, PNGs).

``run(cfg, run_dir)`` is the whole job: validate and build data and model once in the driver
(``prepare``), start the simulation with the client and server apps (``fl_sim.client``,
``fl_sim.server``) on Ray, and leave ``summary.json`` whatever happens. ``resume(run_dir)``
continues a run from its checkpoint. The CLI (``fl_sim.cli``) is a thin Hydra wrapper around them.
"""

from __future__ import annotations

import contextlib
import gc
import copy
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr import simulation
from omegaconf import DictConfig, OmegaConf

from defenses.inversion import bottlenecks
from fl_sim import checkpoint, dispatch
from fl_sim.attacking import ATTACK_RESOURCE
from fl_sim.client import make_client_app
from fl_sim.cohorts import auto_clients_per_node, clients_per_node, num_nodes
from fl_sim.config import Config, ConfigError, register_configs
from fl_sim.inversion import division, fake_label, is_model_inversion, target_classes
from fl_sim.models import num_parameters
from fl_sim.network import (LOOPBACK, check_cluster, loopback_only, on_this_machine_only, ray_auth_mode,
                            settle_ray_auth)
from fl_sim.recorder import RunRecorder
from fl_sim.server import make_server_app
from fl_sim.split.cut import cut_of, split
from fl_sim.validation import MODEL_ATTACKS, defense_name, validate
from fl_sim.workspace import initial_model, workspace

log = logging.getLogger("fl_sim")


def client_actor_cap(cfg: DictConfig) -> int | None:
    """The most client actors a local instance may hold when clients and attack tasks share GPUs, or None.

    Flower's pool takes as many actors as the CPUs and GPUs hold (``min(CPUs / num_cpus, GPUs / num_gpus)``)
    and each keeps its GPU share for the whole run, so an attack task asking for ``attack.num_gpus`` would
    find none free. As the attack workers get a resource of their own instead of the clients' CPUs, they get
    GPU room here: up to ``attack.workers`` shares are kept free (at least one client actor stays), by
    giving the instance only the CPUs of that many actors (Ray's CPU count is bookkeeping: threads are not
    limited by it)."""
    a, res = cfg.attack, cfg.backend.client_resources
    if (a.name in ("none",) + MODEL_ATTACKS or a.workers <= 0 or a.num_gpus <= 0 or res.num_gpus <= 0
            or str(cfg.device) == "cpu"):
        return None
    gpus = cfg.backend.num_gpus if cfg.backend.num_gpus is not None else torch.cuda.device_count()
    if gpus <= 0:
        return None
    keep = min(a.workers * float(a.num_gpus), max(0.0, gpus - float(res.num_gpus)))  # one client actor at least
    actors = max(1, int((gpus - keep) / float(res.num_gpus) + 1e-9))
    cpus = cfg.backend.num_cpus if cfg.backend.num_cpus is not None else (os.cpu_count() or 1)
    by_cpu = int(cpus / float(res.num_cpus))
    return actors if actors < by_cpu else None


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
        init_args["include_dashboard"] = False  # no dashboard, no Jobs API: nothing that takes code over HTTP
        if cfg.attack.name not in ("none",) + MODEL_ATTACKS and cfg.attack.workers > 0:  # workers for round attacks
            init_args["resources"] = {ATTACK_RESOURCE: int(cfg.attack.workers)}
        if b.num_cpus is not None:
            init_args["num_cpus"] = int(b.num_cpus)
        if b.num_gpus is not None:
            init_args["num_gpus"] = int(b.num_gpus)
        cap = client_actor_cap(cfg)
        if cap is not None:  # fewer client actors, so that the attack tasks find their GPU share free
            # exact for whole-CPU clients; with a fraction more actors may fit, and the executor falls back
            init_args["num_cpus"] = max(1, int(cap * float(b.client_resources.num_cpus)))
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


def _quiet_actor_shutdown() -> None:
    """Flower ends a simulation by sending every client actor a ``terminate`` task that calls Ray's
    ``exit_actor``. The actors being restartable (``backend.max_actor_restarts``) and their tasks retried
    once, Ray's driver takes that intended exit for a failure and prints, for every actor,
    "(raylet) Task ClientAppActor.terminate failed. There are 1 retries remaining ...". The run is over
    by then: the pool's actors are killed instead (``ray.kill``, no restart), which prints nothing.
    Imports Ray: call it after ``settle_ray_auth``."""
    try:
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool  # the pool of Flower's RayBackend
    except ImportError:  # another Flower layout: its own shutdown, noise included
        return
    flowers = getattr(BasicActorPool, "terminate_all_actors", None)
    if flowers is None or getattr(flowers, "_fl_sim", False):
        return  # not there, or already ours
    import ray

    def terminate_all_actors(self) -> None:
        for actor in self.pool:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    terminate_all_actors._fl_sim = True
    BasicActorPool.terminate_all_actors = terminate_all_actors


def defense_changes(cfg: DictConfig, model: torch.nn.Module) -> list[str]:
    """What the model-inversion defenses change in every party's model and loss, for summary and report."""
    d, out = cfg.defense, []
    for b in bottlenecks(model):
        out.append(f"MID: the classifier layer ({b.encoder.in_features} -> {b.classifier.out_features}) is a "
                   f"variational bottleneck of {b.dim} dimensions; loss + {float(d.mid_beta):g} x KL (bits); the "
                   f"deployed model {'draws z on every call' if b.sample_at_eval else 'uses the mean of z'}; "
                   f"clients train with {cfg.client.optimizer} at lr {float(cfg.client.lr):g} (compare with an "
                   "undefended run at the same client.optimizer and client.lr)")
    if d.bido:
        out.append(f"BiDO: loss + {float(d.bido_lambda_x):g} x COCO(input, Z) - {float(d.bido_lambda_y):g} x "
                   f"COCO(Z, label) for the output Z of every activation layer (kernel width {float(d.bido_sigma):g})")
    if d.label_smoothing:
        effect = ("negative: against model inversion" if d.smoothing < 0 else
                  "positive: known to help model inversion" if d.smoothing > 0 else "zero: plain cross-entropy")
        out.append(f"label smoothing {float(d.smoothing):g} in the clients' loss ({effect})")
    return out


PER_CLIENT_ROWS = 100  # up to this many clients, summary.json and the report have a row per client


def clients_info(d) -> dict:
    """What summary.json keeps of the clients' data: a row per client (size, label histogram) up to
    ``PER_CLIENT_ROWS`` clients; beyond, every client's size (one number each), their spread, and the label
    totals, so that the summary does not grow by a label histogram per client at cross-device scale."""
    sizes = np.array([len(p) for p in d.partitions], dtype=np.int64)
    spread = {"min": int(sizes.min()), "median": float(np.median(sizes)), "mean": float(sizes.mean()),
              "max": int(sizes.max())}
    if len(sizes) <= PER_CLIENT_ROWS:
        return {"clients": [{"client": i, "size": int(n), "labels": h}
                            for i, (n, h) in enumerate(zip(sizes, d.label_histograms()))], "client_sizes": spread}
    labels = np.bincount(d.y_train[np.concatenate(d.partitions)], minlength=d.num_classes)
    return {"clients": [], "client_sizes": {**spread, "each": sizes.tolist()}, "label_totals": labels.tolist()}


def prepare(cfg: DictConfig, recorder: RunRecorder) -> None:
    """Validate the config and build data and model once in the driver, so that bad input
    fails here with one clear line, before Ray starts."""
    validate(cfg)
    cfg.defense.name = defense_name(cfg)  # "dpsgd+prune" when stacked
    try:
        ws = workspace(cfg, "server")
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{e} (dataset={cfg.dataset.name})") from e
    d = ws.data
    recorder.simulation = {"nodes": num_nodes(cfg), "clients_per_node": clients_per_node(cfg)}
    # central evaluation and the attacks in the server process; split learning's server side (its part of the
    # model, FSHA) computes on the CPU (fl_sim.split.server)
    recorder.ran_on("server", "cpu" if cfg.scenario.name == "split" else str(ws.device))
    recorder.data_info = {
        "dataset": cfg.dataset.name,
        "input_shape": list(d.input_shape),
        "num_classes": d.num_classes,
        "num_train": int(len(d.y_train)),
        "num_test": int(len(d.y_test)),
        "unassigned": int(len(d.y_train) - sum(len(p) for p in d.partitions)),  # examples no client holds
        "partition": cfg.partition.name,
        **clients_info(d),
    }
    if is_model_inversion(cfg):  # the private/public division, and targets the clients hold
        target_classes(cfg, d)
        if cfg.attack.name == "hitaj":
            fake_label(cfg, d)  # a class of the attacker's own to label its samples with
        recorder.data_info["division"] = division(cfg, d)
    init = initial_model(cfg, d)
    if cfg.scenario.name == "split":
        split(cfg, init)  # an invalid cut fails here, naming the valid ones
        cfg.scenario.cut_layer = cut_of(cfg, init)
    digest = hashlib.sha256()
    for k, v in init.state_dict().items():
        digest.update(k.encode() + v.detach().cpu().numpy().tobytes())
    recorder.model_info = {"name": cfg.model.name, "parameters": num_parameters(init),
                           "initial_sha256": digest.hexdigest(), "defense_changes": defense_changes(cfg, init),
                           **({"classes": list(d.dataset_labels)} if is_model_inversion(cfg) else {})}


def simulated(cfg: DictConfig) -> DictConfig:
    """The config the simulation's parties get: ``backend.clients_per_node`` null resolved for this machine
    (``fl_sim.cohorts.auto_clients_per_node``), once, so that server and clients map clients to nodes alike.
    A copy: summary.json keeps the config as given (a sweep re-run or a resume compares it)."""
    if cfg.backend.get("clients_per_node") is not None:
        return cfg
    out = copy.deepcopy(cfg)
    out.backend.clients_per_node = auto_clients_per_node(cfg)
    return out


def run(cfg: DictConfig, run_dir: str | os.PathLike, resume_from: dict | None = None) -> dict:
    """Run one experiment; always leaves ``summary.json`` (``status`` "completed" or "failed").
    ``resume_from``: a checkpoint (``fl_sim.checkpoint.load``) of this run to continue from."""
    recorder = RunRecorder(cfg, Path(run_dir))
    if resume_from is not None:
        checkpoint.restore_recorder(recorder, resume_from["recorder"])
    try:
        _tame_logs(cfg.verbose)  # after flwr's import, which sets its logger to DEBUG
        prepare(cfg, recorder)
        cfg = simulated(cfg)
        recorder.simulation = {"nodes": num_nodes(cfg), "clients_per_node": clients_per_node(cfg)}

        plain = OmegaConf.to_container(cfg, resolve=True)
        log.info("fl-sim: %s, %s, %d clients (%s), %s, %d rounds -> %s", cfg.dataset.name, cfg.model.name,
                 cfg.num_clients, cfg.partition.name, cfg.strategy.name, cfg.num_rounds, recorder.run_dir)
        answer = settle_ray_auth(cfg.backend.ray_address)  # the cluster asked once, for both
        if cfg.backend.ray_address:
            warning = check_cluster(str(cfg.backend.ray_address), answer)
            if warning:
                log.warning("fl-sim: warning: %s", warning)
            recorder.network = {"ray": "cluster", "ray_address": str(cfg.backend.ray_address),
                                "ray_auth": ray_auth_mode(), "cluster_without_authentication": bool(warning)}
        else:
            recorder.network = {"ray": "local", "listen": LOOPBACK, "ray_auth": ray_auth_mode(), "dashboard": False}
        network = loopback_only() if on_this_machine_only(cfg.backend.ray_address) else contextlib.nullcontext()
        _quiet_actor_shutdown()
        dispatch.install()
        recorder.simulation_starting()
        with warnings.catch_warnings(), network:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
            try:
                simulation.run_simulation(
                    server_app=make_server_app(cfg, recorder, resume_from),
                    client_app=make_client_app(plain),
                    num_supernodes=num_nodes(cfg),
                    backend_config=backend_config(cfg),
                    verbose_logging=bool(cfg.verbose),
                )
            finally:
                gc.unfreeze()  # what fl_sim.server froze for the run is collectable again
        recorder.simulation_finished()
        if len(recorder.rounds) != cfg.num_rounds:
            raise RuntimeError(f"the simulation ended after {len(recorder.rounds)} of {cfg.num_rounds} rounds")
        summary = recorder.finish("completed")
        (recorder.run_dir / checkpoint.FILE).unlink(missing_ok=True)  # a completed run needs no checkpoint
        return summary
    except BaseException as e:  # noqa: BLE001 - the failure is recorded, then re-raised
        recorder.simulation_finished()
        recorder.finish("failed", error=one_line(e))
        raise


def resume(run_dir: str | os.PathLike) -> dict:
    """Continue the interrupted run in ``run_dir`` from its checkpoint, with the config it was started
    with; ends with the summary.json an uninterrupted run would have written (timings aside)."""
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


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    if isinstance(e, ConfigError):
        return text
    cause = e.__cause__ or e.__context__
    if not text and cause is not None:
        return one_line(cause)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
