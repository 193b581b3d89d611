"""The ``flwr run .`` entry point (``[tool.flwr.app.components]`` in ``pyproject.toml``): the same client
and server apps as ``fl-sim``, the config composed from the run config's ``overrides`` string, the
run directory under ``outputs/flwr-run/`` unless ``run_dir`` names one."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fl_sim import checkpoint
from fl_sim.client import make_client_app
from fl_sim.config import ConfigError, compose
from fl_sim.protocol import ClientsMissing
from fl_sim.network import ray_auth_mode
from fl_sim.recorder import RunRecorder, new_run_dir
from fl_sim.runner import prepare
from fl_sim.server import server_main
from fl_sim.validation import validate


@functools.lru_cache(maxsize=4)
def _compose_validated(overrides: str) -> DictConfig:
    cfg = compose(overrides.split())
    validate(cfg)
    return cfg


def _cfg_from_run_config(context: Context) -> DictConfig:
    return _compose_validated(str(context.run_config.get("overrides", "")))


client_app = make_client_app(_cfg_from_run_config)
server_app = ServerApp()


@server_app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the same run, its run directory under outputs/flwr-run/."""
    cfg = _cfg_from_run_config(context)
    run_dir = str(context.run_config.get("run_dir", ""))
    recorder = RunRecorder(cfg, Path(run_dir) if run_dir else new_run_dir("outputs/flwr-run"))
    # Flower's simulation runtime started Ray before this app was loaded: its settings, not fl-sim's (README)
    recorder.network = {"ray": "flwr run (Flower's simulation runtime)", "ray_auth": ray_auth_mode()}
    try:
        prepare(cfg, recorder)
        server_main(cfg, grid, recorder, context)
        recorder.finish("completed")
        (recorder.run_dir / checkpoint.FILE).unlink(missing_ok=True)  # a completed run needs none (as fl-sim's)
    except Exception as e:
        recorder.finish("failed", error=f"{type(e).__name__}: {e}")
        if isinstance(e, (ConfigError, ClientsMissing)):  # its one line says it all: none of our frames
            raise e.with_traceback(None) from None
        raise
