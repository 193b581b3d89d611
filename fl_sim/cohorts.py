"""Cohorts: many virtual clients per simulated node, for cross-device scale.

Flower's simulation engine pays for every node: its in-memory link state looks up each node's
messages by scanning every stored message, ten times a second, so a round costs about 17.5 ms per
node before any training at 1,000 nodes on 2 cores, and the driver keeps a context per node
(``benchmarks/simulation_overhead.py --scale`` measures it). With ``backend.clients_per_node`` K > 1
the run has ceil(num_clients / K) nodes, and node h hosts clients h·K … h·K + K − 1. A round still
speaks to *clients*: the strategy, the adversarial server, the guard, the privacy ledger and the
failure accounting see one train message and one reply per client, addressed by a virtual node id
(``CohortGrid``). Only the transport is packed: the messages to one node's sampled clients travel as
one message (records they share, such as the global model, once), and its reply carries one update
per client (``pack``/``unpack``). On the node, every client trains in turn with its own partition,
seeds, mods and its own state (DP budget) kept in the node's Flower context under its id
(``train_cohort``). A client that fails (drop-out, crash) fails alone; a node whose process dies
takes its sampled clients of that round with it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Callable, Iterable

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode
from omegaconf import DictConfig

COHORT_KEY = "fl_sim.cohort"  # the packing record of a cohort message (and of its reply)
VIRTUAL_BASE = 1 << 48  # virtual node ids: VIRTUAL_BASE + client id (server side only)
MEMBER_KEY = "fl_sim.cohort-member"  # in a client's node_config within a cohort message
AUTO_MIN_NODES = 10  # ``clients_per_node: null``: at least this many nodes, and 4 per client actor


def auto_nodes(cfg: DictConfig) -> int:
    """How many nodes ``clients_per_node: null`` aims at: 4 per client actor (so that the actors stay busy
    while a slow cohort finishes), at least ``AUTO_MIN_NODES``. Each node costs a message a round (about
    17.5 ms in Flower's engine at 1,000 nodes), each cohort's reply holds its clients' updates: fewer nodes
    cost less a round until the replies grow large (benchmarks/results/simulation_nodes.json, README)."""
    cpus = cfg.backend.num_cpus or os.cpu_count() or 1
    slots = max(1, int(cpus / float(cfg.backend.client_resources.num_cpus)))
    return max(AUTO_MIN_NODES, 4 * slots)


def auto_clients_per_node(cfg: DictConfig) -> int:
    """What ``backend.clients_per_node: null`` means in fl-sim's own simulation (``fl_sim.runner`` sets it
    once, in the driver, so that every party maps clients to nodes alike): one node per client up to
    ``auto_nodes`` clients, ceil(num_clients / auto_nodes) clients per node beyond, for federated runs
    without SecAgg+ (SecAgg+ and split learning keep one node per client)."""
    k = cfg.backend.get("clients_per_node")
    if k is not None:
        return int(k)
    if cfg.scenario.name == "split" or cfg.defense.secagg:
        return 1
    return max(1, math.ceil(int(cfg.num_clients) / auto_nodes(cfg)))


def clients_per_node(cfg: DictConfig) -> int:
    """K, the clients each node hosts: ``backend.clients_per_node``; null (not resolved: ``flwr run``,
    whose federation has a SuperNode per client) is 1."""
    k = cfg.backend.get("clients_per_node")
    return 1 if k is None else int(k)


def num_nodes(cfg: DictConfig) -> int:
    """How many simulated nodes (Flower SuperNodes) the run has."""
    return math.ceil(int(cfg.num_clients) / clients_per_node(cfg))


def virtual_id(client: int) -> int:
    return VIRTUAL_BASE + int(client)


class CohortGrid:
    """The Grid as the server loop sees it with cohorts: one virtual node per client. Messages to
    virtual nodes are packed per host node on the way out and unpacked on the way back."""

    def __init__(self, grid: Any, host_node: dict[int, int], cfg: DictConfig):
        self._grid = grid
        self._k = clients_per_node(cfg)
        self._n = int(cfg.num_clients)
        self._host_node = dict(host_node)  # host (partition id) -> Flower node id

    def node_of(self) -> dict[int, int]:
        """{client: virtual node id}."""
        return {c: virtual_id(c) for c in range(self._n)}

    def get_node_ids(self) -> list[int]:
        return [virtual_id(c) for c in range(self._n)]

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        by_host: dict[int, dict[int, Message]] = {}
        for m in messages:
            c = int(m.metadata.dst_node_id) - VIRTUAL_BASE
            if not 0 <= c < self._n:
                raise ValueError(f"message to node {m.metadata.dst_node_id}, which is no client of this run")
            by_host.setdefault(c // self._k, {})[c] = m
        packed = {}
        for host, ins in by_host.items():
            first = next(iter(ins.values()))
            out = Message(pack(ins), dst_node_id=self._host_node[host], message_type=first.metadata.message_type)
            packed[host] = (out, ins)
        replies: list[Message] = []
        host_of_node = {node: host for host, node in self._host_node.items()}
        for reply in self._grid.send_and_receive([m for m, _ in packed.values()], timeout=timeout):
            replies += unpack(reply, packed[host_of_node[reply.metadata.src_node_id]][1])
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _pack_records(per_client: dict[int, RecordDict]) -> RecordDict:
    """One RecordDict holding every client's records, each distinct record object once."""
    out: dict[str, Any] = {}
    names: dict[int, str] = {}  # id(record) -> its name in ``out``
    index: dict[str, Any] = {"clients": [int(c) for c in per_client]}
    for c, content in per_client.items():
        refs = []
        for key, record in content.items():
            if id(record) not in names:
                names[id(record)] = f"r{len(names)}"
                out[names[id(record)]] = record
            refs.append(f"{key}={names[id(record)]}")
        index[f"c{c}"] = refs
    return RecordDict({**out, COHORT_KEY: ConfigRecord(index)})


def _unpack_records(content: RecordDict) -> dict[int, RecordDict]:
    index = content[COHORT_KEY]
    per_client = {}
    for c in index["clients"]:
        refs = index.get(f"c{c}", [])
        per_client[int(c)] = RecordDict({key: content[name] for key, name in (r.split("=", 1) for r in refs)})
    return per_client


def pack(instructions: dict[int, Message]) -> RecordDict:
    """The content of one node's cohort message: each sampled client's train message."""
    return _pack_records({c: m.content for c, m in instructions.items()})


def unpack(reply: Message, instructions: dict[int, Message]) -> list[Message]:
    """A node's cohort reply as one reply per client, each from that client's virtual node (a node
    that failed as a whole fails each of its clients with its error)."""
    if reply.has_error():
        return [Message(error=Error(reply.error.code, reply.error.reason), reply_to=m) for m in instructions.values()]
    index = reply.content[COHORT_KEY]
    out = [Message(content=rd, reply_to=instructions[c]) for c, rd in _unpack_records(reply.content).items()
           if c in instructions]
    for c in index.get("failed", []):
        error = Error(int(index[f"code{c}"]), str(index[f"error{c}"]))
        out.append(Message(error=error, reply_to=instructions[int(c)]))
    return out


def is_cohort(msg: Message) -> bool:
    return msg.has_content() and COHORT_KEY in msg.content


def _owner(c: int) -> str:
    return f"client{c}"


def _state_key(c: int, key: str) -> str:
    """Where client ``c``'s state record ``key`` lives in its node's context."""
    return f"{_owner(c)}.{key}"


def in_cohort(context: Context) -> bool:
    """Whether ``context`` is a client's within a cohort message (``train_cohort`` made it)."""
    return bool(context.node_config.get(MEMBER_KEY, False))


def train_cohort(msg: Message, context: Context, train_one: Callable[[Message, Context], Message],
                 round_timeout: float | None = None) -> Message:
    """A node's cohort message: every client in it trains in turn (``train_one``: the client's
    training with its mods), in its own context (partition id, state kept under its id in the
    node's); one reply carries every client's reply, and the failures, each with its reason.

    Stragglers stay per client: a client reports its simulated delay (``client.delay``) without
    sleeping it, as if on a device of its own, so its delay is not its cohort's. A client whose
    training plus delay reaches ``round_timeout`` is left out of the reply (the server finds no reply
    from it, as from a lone straggler); the node then waits until the slowest client it kept would have
    answered. One difference remains: a round whose straggler was left out ends when the others have
    answered, where with one node per client the server waits for it until ``round_timeout``."""
    per_client = _unpack_records(msg.content)
    replies: dict[int, RecordDict] = {}
    failed: dict[str, Any] = {"failed": []}
    kept: dict[str, dict[str, Any]] = {}  # the node's state by client: "client<c>" -> {key: record}
    for k, v in context.state.items():
        owner, _, key = k.partition(".")
        kept.setdefault(owner, {})[key] = v
    start, finish = time.monotonic(), 0.0  # finish: when the slowest client kept would have answered
    for c, content in per_client.items():
        state = RecordDict(kept.get(_owner(c), {}))
        ctx = Context(run_id=context.run_id, node_id=context.node_id,
                      node_config={**context.node_config, "partition-id": c, MEMBER_KEY: True}, state=state,
                      run_config=context.run_config)
        sub = Message(content=content, metadata=copy.copy(msg.metadata))  # as if sent to this client alone
        began = time.monotonic()
        try:
            out = train_one(sub, ctx)
        except Exception as e:  # noqa: BLE001 - one client's failure is that client's, as Flower reports it
            failed["failed"].append(c)
            wrapped = ClientAppException(str(e))  # reported as Flower reports a client's exception
            failed[f"code{c}"] = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            failed[f"error{c}"] = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
            continue
        for k, v in ctx.state.items():
            context.state[_state_key(c, k)] = v
        if out.has_error():
            failed["failed"].append(c)
            failed[f"code{c}"], failed[f"error{c}"] = int(out.error.code), str(out.error.reason)
            continue
        delay = float(out.content["client"].get("delay", 0.0)) if "client" in out.content else 0.0
        own = time.monotonic() - began + delay  # the client's time on a device of its own
        if round_timeout is not None and delay > 0 and own >= round_timeout:
            continue  # a straggler past the round's timeout: its reply never arrives
        finish = max(finish, own)
        replies[c] = out.content
    time.sleep(max(0.0, finish - (time.monotonic() - start)))
    content = _pack_records(replies)
    index = dict(content[COHORT_KEY].items())
    content[COHORT_KEY] = ConfigRecord({**index, **failed})
    return Message(content=content, reply_to=msg)
