"""A server that refuses poisoned numbers: a wrapper around any Flower strategy (as Flower's
``DifferentialPrivacyServerSideFixedClipping`` wraps one) that drops every reply holding NaN or
Inf before the inner strategy aggregates.

One diverged or faulty client would otherwise turn the global model into NaN for everyone: a
weighted mean with one NaN term is NaN. The wrapper checks every array of every ``ArrayRecord``
in a reply (the returned model) and every number of its ``MetricRecord`` s (``num-examples``
weighs the mean), remembers what it rejected and why in ``rejected``, logs a warning, and hands
the remaining replies to ``inner`` unchanged.

    >>> guard = RejectNonFinite(FedAvg())
    >>> arrays, metrics = guard.aggregate_train(1, replies)   # non-finite replies left out
    >>> guard.rejected
    [{'round': 1, 'node_id': 7, 'reason': "array 'fc.weight' holds 3 non-finite values (nan)"}]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("fl_sim")


def values_of(array: Array) -> np.ndarray:
    """An array's values, flat, read in place: NumPy's serialisation ends with the raw values, so the
    header need not be parsed (``Array.numpy`` parses it and copies; at a thousand replies a round that
    was half the server's time). Other serialisations go through ``Array.numpy``."""
    dtype = np.dtype(array.dtype) if array.stype == "numpy.ndarray" else None
    if dtype is None or dtype.hasobject:
        return array.numpy().ravel()
    n = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer(array.data, dtype=dtype, offset=len(array.data) - n)


def non_finite_reason(reply: Message) -> str | None:
    """Why ``reply`` must not be aggregated (the first non-finite array or metric), or None if it is clean.

    Replies that carry an error are not judged here (they hold no update).
    """
    if reply.has_error():
        return None
    for record in reply.content.array_records.values():
        for key, array in record.items():
            a = values_of(array)
            if not np.issubdtype(a.dtype, np.inexact):
                continue  # integers (e.g. BatchNorm's num_batches_tracked) are always finite
            bad = ~np.isfinite(a)
            if bad.any():
                kinds = [k for k, hit in (("nan", np.isnan(a).any()), ("inf", np.isinf(a).any())) if hit]
                return f"array {key!r} holds {int(bad.sum())} non-finite value(s) ({', '.join(kinds)})"
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return f"metric {key!r} is not finite ({value})"
    return None


class RejectNonFinite(Strategy):
    """Drop replies with NaN/Inf, remember them, delegate the rest to ``inner``.

    Parameters
    ----------
    inner : Strategy
        Any Flower strategy; it aggregates the clean replies unchanged.
    client_of : callable (Message) -> int, optional
        The client id behind a reply; when given, each entry of ``rejected`` also names the client.

    Attributes
    ----------
    rejected : list of dict
        ``{"round", "node_id", "reason"}`` (+ ``"client"``) for every reply left out, in order.
    """

    def __init__(self, inner: Strategy, client_of: Callable[[Message], int] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.client_of = client_of
        self.rejected: list[dict] = []

    def __repr__(self) -> str:
        return f"RejectNonFinite(inner={self.inner!r}, rejected={len(self.rejected)})"

    def summary(self) -> None:
        log.info("RejectNonFinite: replies holding NaN/Inf are left out of aggregation; inner strategy:")
        self.inner.summary()

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies fit to aggregate; the others are logged and recorded in ``rejected``."""
        kept = []
        for reply in replies:
            reason = non_finite_reason(reply)
            if reason is None:
                kept.append(reply)
                continue
            entry = {"round": server_round, "node_id": reply.metadata.src_node_id, "reason": reason}
            who = f"node {entry['node_id']}"
            if self.client_of is not None:
                entry["client"] = self.client_of(reply)
                who = f"client {entry['client']}"
            self.rejected.append(entry)
            log.warning("round %d: %s's update rejected, not aggregated: %s", server_round, who, reason)
        return kept

    # --- what the server sends: delegated
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    # --- what the server receives: screened, then delegated
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.screen(server_round, replies)
        if not kept:
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    # --- evaluation: unchanged
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
