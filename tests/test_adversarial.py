"""The adversarial server wrapper: it sees per-client replies, gives the attack only what a server
observes, and leaves aggregation to the inner Flower strategy unchanged."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from attacks import Knowledge, Reconstruction
from strategies.adversarial import AdversarialStrategy


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class FakeGrid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


class SpyAttack:
    name = "spy"

    def __init__(self):
        self.calls = []

    def reconstruct(self, observation, knowledge, progress=None):
        self.calls.append((observation, knowledge))
        return Reconstruction(torch.zeros(1, 1, 2, 2), None)


def test_wrapper_observes_each_targeted_reply_and_delegates_aggregation_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    sent = ArrayRecord({k: v.clone() for k, v in model.state_dict().items()})
    client_data = {101: torch.rand(5, 4), 102: torch.rand(7, 4)}  # held by the test, never by the server
    spy = SpyAttack()

    def knowledge(rnd, arrays, config, reply):
        return Knowledge(model, (1, 2, 2), 3, lr=float(config["lr"]),
                         num_examples=int(reply.content["metrics"]["num-examples"]))

    adv = AdversarialStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=0, min_train_nodes=1),
                              spy, knowledge, client_of=lambda m: m.metadata.src_node_id, targets={102})
    msgs = list(adv.configure_train(1, sent, ConfigRecord({"lr": 0.1}), FakeGrid([101, 102])))
    replies = []
    for m in msgs:
        node = m.metadata.dst_node_id
        local = {k: v + node for k, v in model.state_dict().items()}  # a distinct update per client
        content = RecordDict({"arrays": ArrayRecord(local),
                              "metrics": MetricRecord({"num-examples": len(client_data[node])})})
        replies.append(Message(content=content, reply_to=m))
    # the same replies through the bare strategy, for comparison
    plain, _ = FedAvg(fraction_evaluate=0.0).aggregate_train(1, replies)
    agg, _ = adv.aggregate_train(1, replies)
    for k in plain:
        np.testing.assert_array_equal(agg[k].numpy(), plain[k].numpy())

    assert len(spy.calls) == 1  # only the target
    obs, know = spy.calls[0]
    assert obs.kind == "client_update"
    for k, v in model.state_dict().items():
        assert torch.equal(obs.before[k], v)  # what the server sent
        assert torch.equal(obs.after[k], v + 102)  # what client 102 returned
    assert know.num_examples == 7 and know.lr == 0.1 and know.labels is None
    # nothing the attack received has the client's data in it
    tensors = list(obs.before.values()) + list(obs.after.values()) + list(know.model.state_dict().values())
    assert not any(t.shape == client_data[102].shape for t in tensors)
    assert not any(torch.equal(t, client_data[102]) for t in tensors if t.shape == client_data[102].shape)
    outcomes = adv.take_outcomes()
    assert [(o.job.server_round, o.job.client) for o in outcomes] == [(1, 102)] and adv.take_outcomes() == []
    # the job holds the reply's own arrays (no second copy of the update while the round's attacks wait)
    held = outcomes[0].job.observation
    reply_102 = next(m for m in replies if m.metadata.src_node_id == 102)
    assert held.received is reply_102.content["arrays"] and held.sent is sent


def test_a_malicious_server_tampers_with_the_targets_model_only_and_aggregates_the_models_own_arrays():
    """tamper: the target is sent the changed model (an extra array here), the others the model as it is;
    the attack sees the target's reply next to what it was sent; the inner strategy aggregates the
    model's own arrays of every reply, so the global model keeps its architecture."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    sent = ArrayRecord({k: v.clone() for k, v in model.state_dict().items()})
    spy = SpyAttack()

    def tamper(state):
        return {"block.w": torch.full((2,), 7.0), **{"base." + k: v for k, v in state.items()}}

    def untamper(state):
        return {k[5:]: v for k, v in state.items() if k.startswith("base.")}

    adv = AdversarialStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=0, min_train_nodes=1), spy,
                              lambda rnd, arrays, config, reply: Knowledge(model, (1, 2, 2), 3),
                              client_of=lambda m: m.metadata.src_node_id, targets={102}, rounds={2},
                              tamper=tamper, untamper=untamper, recipient_of=lambda m: m.metadata.dst_node_id)
    for rnd in (1, 2):  # round 1 is not attacked: nobody's model is changed
        msgs = list(adv.configure_train(rnd, sent, ConfigRecord({"lr": 0.1}), FakeGrid([101, 102])))
        got = {m.metadata.dst_node_id: m.content["arrays"].to_torch_state_dict() for m in msgs}
        assert set(got[101]) == set(model.state_dict())
        assert set(got[102]) == (set(model.state_dict()) if rnd == 1 else
                                 {"block.w"} | {"base." + k for k in model.state_dict()})
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            local = {k: v + node for k, v in got[node].items()}
            replies.append(Message(content=RecordDict({"arrays": ArrayRecord(local),
                                                       "metrics": MetricRecord({"num-examples": 1})}), reply_to=m))
        agg, _ = adv.aggregate_train(rnd, replies)
        assert set(agg) == set(model.state_dict())  # the honest architecture
        for k, v in model.state_dict().items():
            np.testing.assert_allclose(agg[k].numpy(), (v + 101.5).numpy(), rtol=1e-6)
    (obs, _), = spy.calls  # round 2's target
    assert torch.equal(obs.before["block.w"], torch.full((2,), 7.0))
    assert torch.equal(obs.after["block.w"], torch.full((2,), 109.0))


def test_wrapper_skips_a_target_that_failed_and_says_so():
    model = torch.nn.Linear(2, 2)
    adv = AdversarialStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=0, min_train_nodes=1),
                              SpyAttack(), lambda *a: None, client_of=lambda m: m.metadata.src_node_id,
                              targets={5})
    msgs = list(adv.configure_train(3, ArrayRecord(model.state_dict()), ConfigRecord({"lr": 0.1}), FakeGrid([5, 6])))
    from flwr.app import Error

    replies = []
    for m in msgs:
        if m.metadata.dst_node_id == 5:
            replies.append(Message(Error(code=0, reason="crashed"), reply_to=m))
        else:
            replies.append(Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                               "metrics": MetricRecord({"num-examples": 3})}), reply_to=m))
    adv.aggregate_train(3, [r for r in replies if not r.has_error()] + [r for r in replies if r.has_error()])
    assert adv.take_outcomes() == []
    assert adv.skipped == [{"round": 3, "client": 5, "reason": "the client failed this round"}]
