"""A client's simulated failure modes (``client.dropout``, ``faults.*``), all seeded per (seed, round,
client) so that the same clients fail in every run: it drops out, crashes (an exception, or its
process ends), straggles, or sends a diverged (NaN) update. And how a failure reads in the summary."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from omegaconf import DictConfig

log = logging.getLogger("fl_sim")


class ClientDropout(RuntimeError):
    """A simulated client that goes offline after receiving the round's model (``client.dropout``)."""


class ClientCrash(RuntimeError):
    """A simulated client failure during training (``faults.client_crash_rate``)."""


def drops_out(seed: int, server_round: int, cid: int, probability: float) -> bool:
    """Whether client ``cid`` drops out of ``server_round`` (seeded: the same in every run)."""
    return probability > 0 and np.random.default_rng([seed, server_round, cid, 0xD0]).random() < probability


def maybe_fail(cfg: DictConfig, server_round: int, cid: int, sleep: bool = True) -> float:
    """The simulated failures of a client in a round (``client.dropout``, ``faults.*``), all seeded:
    raise (drop-out, crash), end the process (crash_mode=exit), or straggle (returns the delay; sleeps
    it unless ``sleep`` is false: a client of a cohort, whose node accounts the delay as the client's own,
    ``fl_sim.cohorts.train_cohort``)."""
    if drops_out(cfg.seed, server_round, cid, float(cfg.client.dropout)):
        raise ClientDropout(f"client {cid} dropped out of round {server_round} (client.dropout={cfg.client.dropout})")
    f = cfg.faults
    draws = np.random.default_rng([cfg.seed, server_round, cid, 0xFA]).random(2)
    if draws[0] < float(f.client_crash_rate):
        if f.crash_mode == "exit":
            log.warning("client %d: simulated crash of its process in round %d", cid, server_round)
            os._exit(3)  # the Ray actor dies; the engine must replace it
        raise ClientCrash(f"client {cid} crashed in round {server_round} (faults.client_crash_rate={f.client_crash_rate})")
    if draws[1] < float(f.straggler_rate) and f.straggler_seconds > 0:
        if sleep:
            time.sleep(float(f.straggler_seconds))
        return float(f.straggler_seconds)
    return 0.0


def sends_nan(cfg: DictConfig, server_round: int, cid: int) -> bool:
    """Whether the client's update of this round is all NaN (``faults.nan_update_rate``: a diverged client)."""
    rate = float(cfg.faults.nan_update_rate)
    return rate > 0 and np.random.default_rng([cfg.seed, server_round, cid, 0xFA]).random(3)[2] < rate


def failure_reason(text: str | None) -> str:
    """The last line of a failure's reason (Flower sends the client's traceback)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown"
