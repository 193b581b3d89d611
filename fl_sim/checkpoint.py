"""Checkpoints: after every round the run directory gets ``checkpoint.pt`` (written to a temporary file,
then renamed, so a kill leaves the previous round's checkpoint or the new one, never half of one).

It holds what a resumed run needs to end exactly as an uninterrupted run with the same seed: the
global model, the strategy's state (Flower's FedOpt moments, FedAvgM momentum, an adaptive clipping
norm...), the server's sampling RNG, each client's DP accountant history (the simulator mirrors what
clients keep in their ``context.state``), and the rounds, attacks and privacy recorded so far. Every
other random draw in a run is seeded by (seed, round, client), so nothing else carries state.

Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only —
a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl_sim.config import ConfigError
from fl_sim.recorder import json_default  # the run directory's JSON: numpy numbers and arrays as plain ones

FILE = "checkpoint.pt"
VERSION = 1


def _strategies(strategy: Any) -> list[Any]:
    """The chain of wrapped strategies: ours and Flower's DP wrappers hold the next one."""
    chain = []
    while strategy is not None and len(chain) < 8:
        chain.append(strategy)
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return chain


def _encode(value: Any) -> list | None:
    """A strategy attribute as [kind, tensors/numbers], or None when it is not state we keep."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return ["num", value]
    if isinstance(value, np.ndarray):
        return ["ndarray", torch.from_numpy(np.array(value))]
    if isinstance(value, ArrayRecord):
        return ["arrayrecord", {k: torch.from_numpy(np.array(v.numpy())) for k, v in value.items()}]
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        return ["ndarray_dict", {str(k): torch.from_numpy(np.array(v)) for k, v in value.items()}]
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        return ["ndarray_list", [torch.from_numpy(np.array(v)) for v in value]]
    return None


def _decode(kind: str, value: Any) -> Any:
    if kind == "num":
        return value
    if kind == "ndarray":
        return value.numpy()
    if kind == "arrayrecord":
        return ArrayRecord({k: v for k, v in value.items()})
    if kind == "ndarray_dict":
        return {k: v.numpy() for k, v in value.items()}
    if kind == "ndarray_list":
        return [v.numpy() for v in value]
    raise ValueError(f"unknown state kind {kind!r} in the checkpoint")


def strategy_state(strategy: Any) -> list[dict]:
    """Every array-valued or numeric attribute of each strategy in the chain (public and private)."""
    out = []
    for s in _strategies(strategy):
        level = {}
        for name, value in vars(s).items():
            enc = _encode(value)
            if enc is not None:
                level[name] = enc
        out.append(level)
    return out


def restore_strategy(strategy: Any, state: list[dict]) -> None:
    chain = _strategies(strategy)
    if len(chain) != len(state):
        raise ValueError("the checkpoint's strategy does not match this run's (a different config?)")
    for s, level in zip(chain, state):
        for name, (kind, value) in level.items():
            setattr(s, name, _decode(kind, value))


def save(run_dir: Path, *, server_round: int, config: dict, model: dict[str, torch.Tensor], extra: dict | None = None,
         strategy: Any = None, rng: np.random.Generator | None = None, recorder: Any = None,
         state: dict | None = None) -> Path:
    """Write the checkpoint after ``server_round`` (atomically). ``state``: JSON-able bookkeeping
    (privacy ledgers, clients' DP histories); ``extra``: more tensors (split learning's server side)."""
    payload = {
        "version": VERSION,
        "round": int(server_round),
        "config": json.dumps(config),
        "model": {k: v.detach().cpu().clone() for k, v in model.items()},
        "extra": extra or {},
        "strategy": strategy_state(strategy) if strategy is not None else [],
        "rng": json.dumps(rng.bit_generator.state) if rng is not None else "",
        "recorder": json.dumps({"rounds": recorder.rounds, "attacks": recorder.attacks,
                                "attacks_skipped": recorder.skipped_attacks, "privacy": recorder.privacy,
                                "model_inversion": getattr(recorder, "model_inversion", None)},
                               default=json_default) if recorder is not None else "",
        "state": json.dumps(state or {}, default=json_default),
    }
    path = Path(run_dir) / FILE
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> dict:
    """The checkpoint of ``run_dir`` (JSON fields decoded); a clear error when there is none or it is bad."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: nothing to resume (checkpoints are written after each round)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("version") != VERSION:
            raise ValueError(f"version {ck.get('version')}, expected {VERSION}")
        for key in ("config", "recorder", "state"):
            ck[key] = json.loads(ck[key]) if ck[key] else {}
        ck["rng"] = json.loads(ck["rng"]) if ck["rng"] else None
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, one line naming it
        raise ConfigError(f"{path} is not a valid fl-sim checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return ck


def restore_rng(rng: np.random.Generator, state: dict | None) -> None:
    if state is not None:
        rng.bit_generator.state = state


def restore_recorder(recorder: Any, saved: dict) -> None:
    recorder.rounds = list(saved.get("rounds", []))
    recorder.attacks = list(saved.get("attacks", []))
    recorder.skipped_attacks = list(saved.get("attacks_skipped", []))
    recorder.privacy = saved.get("privacy")
    recorder.model_inversion = saved.get("model_inversion")  # a participant's attacks so far (attack.on=client)
