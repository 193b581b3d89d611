"""The simulation hands the server's messages to the client actors as soon as the server pushes them.

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) moves messages from its link state
to its workers in a thread, ``add_messages_to_queue``, that looks at every node and then sleeps 0.1 s. A
round's messages therefore wait 0.05 s on average, and up to 0.1 s, before any client starts: about a tenth
of a 100-client round on 2 cores (benchmarks/results/simulation_100_clients.json). Looking more often would
cost a lock and a scan of every stored message per node, in the driver that shares the cores with the actors.

Here that thread also wakes when the server pushes (``wake_on_push`` on the server's in-memory Grid), so it
looks once per push, at once, and otherwise as Flower does. Both halves run in the driver of
``fl_sim.runner``'s simulation, where the ServerApp and the engine share a process; under ``flwr run`` the
engine is another process and keeps its own loop. Installed for Flower 1.41 only: another layout keeps
Flower's own (slower) loop.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

FLOWER_WAIT = 0.1  # seconds: Flower's own interval, kept as the fallback when no push wakes the thread
_pushed = threading.Event()


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Flower's ``vce_api.add_messages_to_queue`` (same arguments, same work per look: at most one message
    per node), woken by a push as well as every 0.1 s."""
    while not f_stop.is_set():
        _pushed.clear()  # before looking: a push during the look sets it again, and the next look comes at once
        found = False
        for node_id in nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
                found = True
        if not found:  # a node with a second message waiting gets it at the next look, without the wait
            _pushed.wait(FLOWER_WAIT)


add_messages_to_queue._fl_sim = True


def install() -> bool:
    """Put ``add_messages_to_queue`` in Flower's engine when its layout is the one it replaces; whether it
    is there."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    flowers = getattr(vce_api, "add_messages_to_queue", None)
    if flowers is None:
        return False
    if getattr(flowers, "_fl_sim", False):
        return True
    if list(inspect.signature(flowers).parameters) != ["state", "queue", "nodes_mapping", "f_stop"]:
        return False
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def wake_on_push(grid: Any) -> None:
    """After each of ``grid``'s pushes, wake the engine's thread that hands messages to the workers."""
    push = grid.push_messages
    if getattr(push, "_fl_sim", False):
        return

    def push_messages(messages):
        ids = push(messages)
        _pushed.set()
        return ids

    push_messages._fl_sim = True
    grid.push_messages = push_messages
