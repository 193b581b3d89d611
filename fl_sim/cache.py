"""The cache of networks fl-sim trains for attacks and for their evaluation: a model-inversion attack's
GAN prior, the evaluation classifier. Each is trained once for what it depends on (the data it saw,
its settings, its seed; the key hashes them all) and reused by later runs and sweep points.

Where: ``cache_dir`` in the config, else ``$FL_SIM_CACHE``, else ``~/.cache/fl_sim`` (``$XDG_CACHE_HOME``
if set). Clearing it is deleting that folder; nothing else refers to it. Files are written to a
temporary name, then renamed, and loaded with ``torch.load(weights_only=True)``: a cached file cannot run
code. A file that does not load is ignored (and retrained over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fl_sim")


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FL_SIM_CACHE"):
        return Path(os.environ["FL_SIM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fl_sim"


def fingerprint(*parts: Any) -> str:
    """A hex digest of arrays, tensors, state dicts and JSON-able values, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict) and part and all(torch.is_tensor(v) for v in part.values()):
            for k, v in part.items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        elif torch.is_tensor(part):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def load(kind: str, key: str, cache_dir: str | None = None) -> dict | None:
    """The cached state of ``kind`` (e.g. "gmi-prior") under ``key``; None when there is none."""
    path = cache_root(cache_dir) / kind / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is retrained, not fatal
        log.warning("cache entry %s does not load (%s): training anew", path, type(e).__name__)
        return None


def save(kind: str, key: str, state: dict, cache_dir: str | None = None) -> Path:
    folder = cache_root(cache_dir) / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
