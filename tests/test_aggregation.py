"""The server's weighted mean reads the replies' arrays in place and gives Flower's result bit for bit;
the simulation engine hands the server's messages to the actors when the server pushes them."""

import queue
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, fedavg, strategy_utils

from fl_sim import dispatch
from strategies import aggregation
from strategies.registry import make_strategy

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py: Flower's messages need a run id

FLOWERS = strategy_utils.aggregate_arrayrecords if not getattr(
    strategy_utils.aggregate_arrayrecords, "_fl_sim", False) else None


def flowers_mean():
    """Flower's own function (kept before anything replaced it; the module's source otherwise)."""
    if FLOWERS is not None:
        return FLOWERS
    import importlib.util

    spec = importlib.util.find_spec("flwr.serverapp.strategy.strategy_utils")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh copy: not the patched name
    return module.aggregate_arrayrecords


def replies(seed=0, n=9, extra=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arrays = {"fc.weight": Array(rng.standard_normal((6, 5)).astype(np.float32)),
                  "fc.bias": Array(rng.standard_normal(6).astype(np.float32)),
                  "bn.num_batches_tracked": Array(np.array(i * 3, dtype=np.int64)),
                  "scale": Array(np.asfortranarray(rng.standard_normal((3, 4))))}  # float64, Fortran order
        extra_record = ArrayRecord({"other": Array(rng.standard_normal((2, 2)).astype(np.float16))})
        more = {"more": extra_record} if extra else {}
        out.append(RecordDict({"arrays": ArrayRecord(arrays), **more,
                               "metrics": MetricRecord({"num-examples": int(rng.integers(1, 60)), "loss": 0.1})}))
    return out


def test_the_mean_is_flowers_bit_for_bit_for_every_dtype_shape_and_order():
    records = replies()
    ours, theirs = aggregation.aggregate_arrayrecords(records, "num-examples"), flowers_mean()(records, "num-examples")
    assert list(ours) == list(theirs)
    for key in theirs:
        a, b = ours[key].numpy(), theirs[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert np.array_equal(a, b), key
    # a weighted mean, not an identity: the first reply alone differs from it
    assert not np.array_equal(ours["fc.weight"].numpy(), records[0]["arrays"]["fc.weight"].numpy())


def test_flowers_strategies_use_it_once_a_strategy_is_made_and_aggregate_as_before():
    records = replies(seed=1, n=5, extra=False)  # FedAvg takes one ArrayRecord a reply
    expected = flowers_mean()(records, "num-examples")
    make_strategy("fedavg")
    assert fedavg.aggregate_arrayrecords is aggregation.aggregate_arrayrecords
    assert strategy_utils.aggregate_arrayrecords is aggregation.aggregate_arrayrecords
    assert aggregation.install()  # idempotent
    from flwr.app import Message

    msgs = [Message(content=r, dst_node_id=i + 1, message_type="train") for i, r in enumerate(records)]
    got = [Message(content=r, reply_to=m) for r, m in zip(records, msgs)]
    arrays, _ = FedAvg(min_available_nodes=0, min_train_nodes=1).aggregate_train(1, got)
    for key in expected:
        assert np.array_equal(arrays[key].numpy(), expected[key].numpy()), key


class FakeState:
    """A link state with messages stored for node 1 after the test pushes them."""

    def __init__(self):
        self.stored: list[str] = []
        self.looks = 0

    def get_message_ins(self, node_id, limit):
        self.looks += 1
        taken, self.stored = self.stored[:limit], self.stored[limit:]
        return taken


def test_a_push_wakes_the_engines_dispatch_at_once(monkeypatch):
    monkeypatch.setattr(dispatch, "FLOWER_WAIT", 60.0)  # without the wake, the message would wait a minute
    state, q, stop = FakeState(), queue.Queue(), threading.Event()
    thread = threading.Thread(target=dispatch.add_messages_to_queue, args=(state, q, {1: 0}, stop), daemon=True)
    thread.start()
    try:
        with pytest.raises(queue.Empty):
            q.get(timeout=0.2)  # nothing stored: nothing handed on, and the thread waits

        class Grid:
            def push_messages(self, messages):
                state.stored.extend(messages)
                return [f"id-{m}" for m in messages]

        grid = Grid()
        dispatch.wake_on_push(grid)
        dispatch.wake_on_push(grid)  # wrapped once
        assert grid.push_messages(["a", "b"]) == ["id-a", "id-b"]
        # one message per node and look, as Flower's loop; the second follows without the wait
        assert q.get(timeout=10) == "a"
        assert q.get(timeout=10) == "b"
    finally:
        stop.set()
        dispatch._pushed.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_install_replaces_flowers_dispatch_loop_with_the_same_arguments():
    from flwr.server.superlink.fleet.vce import vce_api

    before = vce_api.add_messages_to_queue
    try:
        assert dispatch.install()
        assert vce_api.add_messages_to_queue is dispatch.add_messages_to_queue
        assert dispatch.install()
    finally:
        vce_api.add_messages_to_queue = before
