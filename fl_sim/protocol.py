"""What every server loop (federated, SecAgg+, split) says to the clients through Flower's Grid:
who is there (client discovery), which of them this round concerns (a view of the grid), and the
round's train config (the hyper-parameters the server sends)."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig


class SampledGrid:
    """A view of the Grid showing only the nodes sampled for this round (seeded by fl_sim)."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class ClientsMissing(RuntimeError):
    """The federation does not hold the ``num_clients`` clients the config asks for: the run cannot start."""


def _size_of(reply: Message) -> int | None:
    """The federation size a discovery reply states (its node config's ``num-partitions``); None: unsaid."""
    if reply.has_error():
        raise RuntimeError(f"client discovery failed: {reply.error.reason}")
    size = int(reply.content["client"].get("num-partitions", -1))
    return size if size > 0 else None


def _refuse_other_size(size: int | None, k: int, cfg: DictConfig) -> None:
    if size is not None and size != k:
        n = int(cfg.num_clients)
        needs = f"num_clients={n}" if k == n else \
            f"the run needs {k} (num_clients={n} at backend.clients_per_node={cfg.backend.clients_per_node})"
        other = f"num_clients={size}" if k == n else "other num_clients or backend.clients_per_node"
        raise ClientsMissing(
            f"the federation has {size} SuperNodes but {needs}: give it {k} (simulation: "
            f"`flwr federation simulation-config @none/default local --num-supernodes {k}`; deployment: {k} "
            f"SuperNodes with --node-config 'partition-id=I num-partitions={k}') or run with {other}")


def discover_clients(grid: Grid, cfg: DictConfig, k: int | None = None) -> dict[int, int]:
    """Ask every node which client (partition) it is; return {client id: node id}. ``k``: the number
    of nodes expected (default ``num_clients``; with cohorts, ``fl_sim.cohorts.num_nodes``).

    Every reply also says how many partitions the node's federation has: a federation of another size
    than ``num_clients`` (``flwr run`` with too few or too many SuperNodes) is refused at once, with both
    numbers and the command that fixes it. When all ``num_clients`` nodes are there at the first look (a
    simulation registers them all before the server starts), they are asked together, so that every
    client actor loads its data at the same time. Otherwise the first node to connect is asked alone,
    so that a federation of another size fails at once, and the server waits ``backend.connect_timeout``
    seconds (not the round timeout) for the others; fewer fail the run with one line. Answering the
    query, a client loads its data: that is work, bounded by ``round_timeout``."""
    k, timeout = int(cfg.num_clients if k is None else k), float(cfg.backend.connect_timeout)
    deadline, probed = time.monotonic() + timeout, False
    while len(node_ids := list(grid.get_node_ids())) < k:
        if node_ids and not probed:
            probed, asked = True, time.monotonic()
            probe = Message(RecordDict(), dst_node_id=node_ids[0], message_type="query")
            for reply in grid.send_and_receive([probe], timeout=float(cfg.round_timeout)):  # it loads its data
                _refuse_other_size(_size_of(reply), k, cfg)
            deadline += time.monotonic() - asked  # the wait for the others starts now
            continue
        if time.monotonic() > deadline:
            cause = ("no SuperNode connected: is the federation's runtime up?" if not node_ids else
                     "the others never registered: start the missing SuperNodes, or raise backend.connect_timeout "
                     "if they are slow to start (in fl-sim's own simulation: Ray could not start the client actors)")
            raise ClientsMissing(f"{len(node_ids)} of {k} clients connected after {timeout:g} s: {cause}")
        time.sleep(0.05)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=float(cfg.round_timeout)):  # each loads its data first
        _refuse_other_size(_size_of(reply), k, cfg)
        node_of[int(reply.content["client"]["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(k)) - set(node_of))
    if missing:
        raise ClientsMissing(f"{len(node_of)} of {k} clients answered discovery within round_timeout="
                             f"{float(cfg.round_timeout):g} s (no reply from partitions {missing[:10]})")
    return node_of


def train_config(cfg: DictConfig, server_round: int) -> ConfigRecord:
    """The hyper-parameters the server sends with a round's model (what an attacker on the server knows)."""
    c = cfg.client
    return ConfigRecord({
        "server-round": server_round, "lr": float(c.lr), "local-epochs": int(c.local_epochs),
        "batch-size": int(c.batch_size), "optimizer": str(c.optimizer), "momentum": float(c.momentum),
        "weight-decay": float(c.weight_decay),
    })
