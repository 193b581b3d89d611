"""The NaN/Inf guard: a client update holding a non-finite number is rejected and reported, never
averaged into the global model; the clean replies are aggregated by the real Flower strategy."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies.guard import RejectNonFinite, non_finite_reason


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class FakeGrid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def fedavg():
    return FedAvg(fraction_evaluate=0.0, min_available_nodes=0, min_train_nodes=1)


def round_of_replies(guard, states, num_examples, rnd=1):
    """Send the global model to one node per entry of ``states`` and answer with that node's state."""
    model = torch.nn.Linear(3, 2)
    msgs = list(guard.configure_train(rnd, ArrayRecord(model.state_dict()), ConfigRecord({"lr": 0.1}),
                                      FakeGrid(sorted(states))))
    replies = []
    for m in msgs:
        node = m.metadata.dst_node_id
        content = RecordDict({"arrays": ArrayRecord(states[node]),
                              "metrics": MetricRecord({"num-examples": num_examples[node], "train_loss": 0.5})})
        replies.append(Message(content=content, reply_to=m))
    return sorted(replies, key=lambda m: m.metadata.src_node_id)  # Flower samples nodes in random order


def state(value, **overrides):
    s = {"weight": torch.full((2, 3), float(value)), "bias": torch.full((2,), float(value))}
    s.update(overrides)
    return s


def test_nan_and_inf_updates_are_left_out_and_the_rest_equals_fedavg_of_the_clean_replies():
    nan_weight = torch.ones(2, 3)
    nan_weight[0, 1] = float("nan")
    states = {11: state(1.0), 12: state(0.0, weight=nan_weight), 13: state(4.0),
              14: state(2.0, bias=torch.tensor([1.0, float("inf")]))}
    examples = {11: 10, 12: 10, 13: 30, 14: 10}
    guard = RejectNonFinite(fedavg(), client_of=lambda m: m.metadata.src_node_id - 10)
    replies = round_of_replies(guard, states, examples, rnd=2)

    arrays, metrics = guard.aggregate_train(2, replies)

    clean = [m for m in replies if m.metadata.src_node_id in (11, 13)]
    expected, expected_metrics = fedavg().aggregate_train(2, clean)
    for k in expected:
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k].numpy())
    # (1 * 10 + 4 * 30) / 40 = 3.25: the weighted mean of the two clean clients only
    np.testing.assert_allclose(arrays["weight"].numpy(), np.full((2, 3), 3.25), rtol=1e-6)
    assert np.isfinite(arrays["bias"].numpy()).all() and metrics["train_loss"] == expected_metrics["train_loss"]
    assert guard.rejected == [
        {"round": 2, "node_id": 12, "reason": "array 'weight' holds 1 non-finite value(s) (nan)", "client": 2},
        {"round": 2, "node_id": 14, "reason": "array 'bias' holds 1 non-finite value(s) (inf)", "client": 4},
    ]


def test_rejection_is_logged_as_a_warning_naming_the_client(caplog):
    guard = RejectNonFinite(fedavg(), client_of=lambda m: 7)
    replies = round_of_replies(guard, {5: state(float("-inf"))}, {5: 3})
    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        assert guard.aggregate_train(1, replies) == (None, None)  # nothing left to aggregate
    assert "round 1: client 7's update rejected, not aggregated: array 'weight' holds 6 non-finite" in caplog.text


def test_a_non_finite_weight_metric_is_rejected_too():
    """num-examples weighs the mean: NaN there poisons the average as surely as NaN in the model."""
    guard = RejectNonFinite(fedavg())
    replies = round_of_replies(guard, {1: state(1.0), 2: state(3.0)}, {1: 5, 2: float("nan")})
    arrays, _ = guard.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["weight"].numpy(), np.ones((2, 3), np.float32))
    assert guard.rejected == [{"round": 1, "node_id": 2, "reason": "metric 'num-examples' is not finite (nan)"}]


def test_clean_replies_pass_unchanged_and_error_replies_are_not_judged():
    guard = RejectNonFinite(fedavg())
    replies = round_of_replies(guard, {1: state(1.0), 2: state(3.0)}, {1: 1, 2: 1})
    arrays, _ = guard.aggregate_train(1, replies)
    plain, _ = fedavg().aggregate_train(1, replies)
    for k in plain:
        np.testing.assert_array_equal(arrays[k].numpy(), plain[k].numpy())
    assert guard.rejected == []
    failed = Message(Error(code=0, reason="crashed"), reply_to=replies[0])
    assert non_finite_reason(failed) is None  # a failure is Flower's to count, not a poisoned update
    ints = RecordDict({"arrays": ArrayRecord({"n": torch.tensor([3])}), "metrics": MetricRecord({"num-examples": 1})})
    assert non_finite_reason(Message(content=ints, reply_to=replies[0])) is None


def test_evaluation_and_configuration_are_delegated():
    inner = fedavg()
    guard = RejectNonFinite(inner)
    model = torch.nn.Linear(2, 2)
    sent = list(guard.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord({"lr": 0.1}), FakeGrid([1, 2])))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2]
    assert list(guard.configure_evaluate(1, ArrayRecord(model.state_dict()), ConfigRecord({}), FakeGrid([1]))) == []
    assert "RejectNonFinite(inner=" in repr(guard)


def test_values_of_reads_every_dtype_and_order_in_place_as_array_numpy_does():
    import numpy as np
    from flwr.app import Array

    from strategies.guard import values_of

    cases = [np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.random.rand(5, 7)), np.array(3.5),
             np.array([], dtype=np.float32), np.arange(5, dtype=np.int64), np.zeros((2, 3), dtype=np.float16),
             np.array([1.0, np.nan, np.inf], dtype=np.float32)]
    for a in cases:
        got, want = values_of(Array(a)), Array(a).numpy()
        assert got.dtype == want.dtype and got.size == want.size
        assert np.array_equal(np.sort(got), np.sort(want.ravel()), equal_nan=True)
