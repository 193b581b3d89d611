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


def discover_clients(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Ask every node which client (partition) it is; return {client id: node id}."""
    deadline = time.time() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.time() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {num_clients} clients connected")
        time.sleep(0.05)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"client discovery failed: {reply.error.reason}")
        node_of[int(reply.content["client"]["partition-id"])] = reply.metadata.src_node_id
    return node_of


def train_config(cfg: DictConfig, server_round: int) -> ConfigRecord:
    """The hyper-parameters the server sends with a round's model (what an attacker on the server knows)."""
    c = cfg.client
    return ConfigRecord({
        "server-round": server_round, "lr": float(c.lr), "local-epochs": int(c.local_epochs),
        "batch-size": int(c.batch_size), "optimizer": str(c.optimizer), "momentum": float(c.momentum),
        "weight-decay": float(c.weight_decay),
    })
