"""Defenses on the outgoing update, as Flower client mods (Message API).

A mod sits between the ClientApp and the network: it remembers the model the server sent, lets the
client train, then rewrites the reply's model as ``sent + transform(reply - sent)``. Only floating
point arrays are touched (BatchNorm's integer step counter passes unchanged).

- ``prune_mod(ratio)``: magnitude pruning — per layer, the ``ratio`` of update entries smallest in
  magnitude are set to zero, the top ``1 - ratio`` kept (Zhu et al., "Deep Leakage from Gradients",
  NeurIPS 2019, §5: DLG fails from about 20% pruning on their setting).
- ``quantize_mod(bits)``: each layer's update rounded to ``2**bits`` evenly spaced levels between its
  minimum and maximum.
- ``noise_mod(std, seed_fn)``: Gaussian noise N(0, std²) on every update entry (no clipping, so no
  DP guarantee by itself; Flower's ``LocalDpMod`` is the clipped, (ε, δ) variant).

Transforms are plain functions on ``{name: ndarray}`` so that they are testable without Flower.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

Transform = Callable[[dict[str, np.ndarray], Message, Context], dict[str, np.ndarray]]


def prune_update(update: dict[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """Zero the ``floor(ratio * size)`` smallest-magnitude entries of each array."""
    out = {}
    for k, u in update.items():
        drop = int(np.floor(ratio * u.size))
        pruned = u.copy()
        if drop:
            pruned.reshape(-1)[np.argsort(np.abs(u).ravel(), kind="stable")[:drop]] = 0
        out[k] = pruned
    return out


def quantize_update(update: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """Round each array to 2**bits evenly spaced levels spanning its [min, max]."""
    levels = 2 ** bits - 1
    out = {}
    for k, u in update.items():
        lo, hi = float(u.min(initial=0)), float(u.max(initial=0))
        if hi == lo:
            out[k] = u
            continue
        step = (hi - lo) / levels
        out[k] = (lo + np.round((u - lo) / step) * step).astype(u.dtype)
    return out


def update_mod(name: str, transform: Transform):
    """A Flower mod applying ``transform`` to the update (reply - sent) of a train message."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        sent = _only_array_record(msg)
        reply = call_next(msg, context)
        if reply.has_error() or sent is None:
            return reply
        key, returned = _only_array_record_item(reply)
        if key is None:
            return reply
        before = {k: v.numpy() for k, v in sent.items()}
        after = {k: v.numpy() for k, v in returned.items()}
        if before.keys() != after.keys():
            raise ValueError(f"{name}: the reply's arrays do not match the model sent")
        floats = [k for k, v in after.items() if np.issubdtype(v.dtype, np.floating)]
        update = {k: after[k].astype(np.float64) - before[k].astype(np.float64) for k in floats}
        new = transform(update, msg, context)
        arrays = {k: Array((before[k].astype(np.float64) + new[k]).astype(after[k].dtype)) if k in new
                  else Array(after[k]) for k in after}
        reply.content[key] = ArrayRecord(arrays)
        return reply

    mod.__name__ = f"{name}_mod"
    return mod


def prune_mod(ratio: float):
    return update_mod("prune", lambda u, _m, _c: prune_update(u, ratio))


def quantize_mod(bits: int):
    return update_mod("quantize", lambda u, _m, _c: quantize_update(u, bits))


def noise_mod(std: float, seed_fn: Callable[[Message, Context], int]):
    """Gaussian noise on the update; ``seed_fn(msg, context)`` seeds it (reproducible runs)."""

    def add_noise(update, msg, context):
        rng = np.random.default_rng(seed_fn(msg, context))
        return {k: u + rng.normal(0.0, std, size=u.shape) for k, u in update.items()}

    return update_mod("noise", add_noise)


def _only_array_record(msg: Message) -> ArrayRecord | None:
    records = list(msg.content.array_records.values())
    return records[0] if len(records) == 1 else None


def _only_array_record_item(msg: Message) -> tuple[str | None, ArrayRecord | None]:
    items = list(msg.content.array_records.items())
    return items[0] if len(items) == 1 else (None, None)
