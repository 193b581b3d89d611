"""Cohorts (fl_sim.cohorts): many virtual clients per simulated node, each still its own client."""

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fl_sim.cohorts import (COHORT_KEY, CohortGrid, auto_clients_per_node, clients_per_node, in_cohort, num_nodes,
                            pack, train_cohort, unpack, virtual_id)
from fl_sim.config import ConfigError, compose
from fl_sim.validation import validate


def _instructions(clients, shared, extra=None):
    out = {}
    for c in clients:
        content = extra[c] if extra and c in extra else shared
        out[c] = Message(content, dst_node_id=virtual_id(c), message_type="train")
    return out


def _resolved(overrides):
    cfg = compose(overrides)
    cfg.backend.clients_per_node = auto_clients_per_node(cfg)  # as fl_sim.runner.run does
    return cfg


def test_clients_per_node_auto_keeps_one_node_per_client_up_to_4_per_actor_and_10_at_least():
    two = ["backend.num_cpus=2"]  # 2 client actors: 10 nodes
    assert auto_clients_per_node(compose(two + ["num_clients=10"])) == 1
    hundred = _resolved(two + ["num_clients=100"])
    assert clients_per_node(hundred) == 10 and num_nodes(hundred) == 10
    assert num_nodes(_resolved(two + ["num_clients=10001"])) == 10  # 1,001 per node, the last one 992
    sixteen = _resolved(["backend.num_cpus=16", "num_clients=1000"])  # 16 actors: 64 nodes
    assert clients_per_node(sixteen) == 16 and num_nodes(sixteen) == 63
    assert auto_clients_per_node(compose(two + ["num_clients=1000", "defense=secagg"])) == 1
    assert num_nodes(compose(["num_clients=7", "backend.clients_per_node=3"])) == 3
    # unresolved (flwr run: a SuperNode per client), null is one node per client
    assert clients_per_node(compose(["num_clients=1000"])) == 1 and num_nodes(compose(["num_clients=1000"])) == 1000


@pytest.mark.parametrize("overrides, words", [
    (["backend.clients_per_node=0"], "backend.clients_per_node must be at least 1"),
    (["backend.clients_per_node=4", "defense=secagg"], "cohorts are for federated runs without SecAgg+"),
    (["backend.clients_per_node=4", "scenario=split", "model=mlp", "attack=none"], "cohorts are for federated runs"),
])
def test_bad_clients_per_node_is_one_line(overrides, words):
    with pytest.raises(ConfigError, match=words):
        validate(compose(overrides))


def test_pack_carries_shared_records_once_and_a_clients_own_records_beside_them(task_identity):
    model = ArrayRecord({"w": torch.zeros(3)})
    config = ConfigRecord({"server-round": 1})
    shared = RecordDict({"arrays": model, "config": config})
    tampered = RecordDict({"arrays": ArrayRecord({"w": torch.ones(3)}), "config": config})
    content = pack(_instructions([4, 5, 6], shared, {5: tampered}))
    records = [k for k in content.keys() if k != COHORT_KEY]
    assert len(records) == 3  # the global model, the config, client 5's own model
    assert content[COHORT_KEY]["clients"] == [4, 5, 6]


def _node_context(node_id=7):
    return Context(run_id=1, node_id=node_id, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_train_cohort_gives_each_client_its_own_id_state_and_failure(task_identity):
    """Every client trains with its own partition id and its own state record (kept in the node's context
    under its id, across rounds); one client's exception fails that client only."""
    seen = []

    def train_one(msg, ctx):
        cid = int(ctx.node_config["partition-id"])
        seen.append(cid)
        if cid == 2:
            raise RuntimeError("client 2 crashed")
        count = int(ctx.state["mine"]["n"]) + 1 if "mine" in ctx.state else 1
        ctx.state["mine"] = ConfigRecord({"n": count, "cid": cid})
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10 + cid})}), reply_to=msg)

    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})
    ins = _instructions([1, 2, 3], shared)
    packed = Message(pack(ins), dst_node_id=7, message_type="train")
    node = _node_context()
    for _ in range(2):  # two rounds on the same node context
        reply = train_cohort(packed, node, train_one)
    assert seen == [1, 2, 3, 1, 2, 3]
    assert {k: dict(v) for k, v in node.state.items()} == {"client1.mine": {"n": 2, "cid": 1},
                                                          "client3.mine": {"n": 2, "cid": 3}}
    # the server side: one reply per client, from its virtual node; the crash is client 2's error
    back = unpack(reply, ins)
    by_src = {m.metadata.src_node_id: m for m in back}
    assert set(by_src) == {virtual_id(1), virtual_id(2), virtual_id(3)}
    assert by_src[virtual_id(2)].has_error() and "client 2 crashed" in by_src[virtual_id(2)].error.reason
    assert int(by_src[virtual_id(3)].content["metrics"]["num-examples"]) == 13
    assert not by_src[virtual_id(1)].has_error()


def test_a_cohorts_straggler_is_its_own_and_past_the_timeout_its_reply_never_arrives(task_identity):
    """Each client's simulated delay is its own (as on a device of its own): a straggler past round_timeout
    is missing from the node's reply, as a lone straggler's reply would be; one within it is kept, and the
    node answers when that client would have (its delay), not after the sum of its clients' delays."""
    delays = {0: 0.0, 1: 0.3, 2: 5.0, 3: 0.3}
    members = []

    def train_one(msg, ctx):
        cid = int(ctx.node_config["partition-id"])
        members.append(in_cohort(ctx))
        return Message(RecordDict({"client": ConfigRecord({"partition-id": cid, "delay": delays[cid]})}), reply_to=msg)

    ins = _instructions([0, 1, 2, 3], RecordDict({"config": ConfigRecord({"server-round": 1})}))
    packed = Message(pack(ins), dst_node_id=7, message_type="train")
    t = time.monotonic()
    reply = train_cohort(packed, _node_context(), train_one, round_timeout=2.0)
    took = time.monotonic() - t
    assert members == [True] * 4 and not in_cohort(_node_context())
    back = {m.metadata.src_node_id: m for m in unpack(reply, ins)}
    assert set(back) == {virtual_id(0), virtual_id(1), virtual_id(3)}  # client 2 (5 s > 2 s) never answers
    assert not any(m.has_error() for m in back.values())
    assert 0.3 <= took < 0.55  # the slowest kept client's 0.3 s, once: not 0.3 + 0.3 (nor 5)


def test_a_node_that_fails_as_a_whole_fails_each_of_its_clients(task_identity):
    ins = _instructions([0, 1], RecordDict({"config": ConfigRecord({"server-round": 1})}))
    packed = Message(pack(ins), dst_node_id=7, message_type="train")
    packed.metadata.__dict__["_message_id"] = "m1"
    dead = Message(error=Error(3, "actor died"), reply_to=packed)
    back = unpack(dead, ins)
    assert [m.has_error() and m.error.reason == "actor died" for m in back] == [True, True]
    assert {m.metadata.src_node_id for m in back} == {virtual_id(0), virtual_id(1)}


class _Grid:
    """Two host nodes that answer a cohort message by training nothing: each client echoes its round."""

    def __init__(self):
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append((m.metadata.dst_node_id, list(m.content[COHORT_KEY]["clients"])))
            m.metadata.__dict__["_message_id"] = f"to{m.metadata.dst_node_id}"
            out.append(train_cohort(m, _node_context(m.metadata.dst_node_id), lambda msg, ctx: Message(
                RecordDict({"client": ConfigRecord({"partition-id": int(ctx.node_config["partition-id"])})}),
                reply_to=msg)))
        return out


def test_cohort_grid_sends_one_message_per_host_and_returns_one_reply_per_client(task_identity):
    cfg = compose(["num_clients=5", "backend.clients_per_node=2"])
    inner = _Grid()
    grid = CohortGrid(inner, {0: 100, 1: 101, 2: 102}, cfg)
    assert grid.get_node_ids() == [virtual_id(c) for c in range(5)]
    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})
    replies = grid.send_and_receive(list(_instructions([0, 3, 4, 1], shared).values()))
    assert sorted(inner.sent) == [(100, [0, 1]), (101, [3]), (102, [4])]
    assert sorted((m.metadata.src_node_id, int(m.content["client"]["partition-id"])) for m in replies) == [
        (virtual_id(c), c) for c in (0, 1, 3, 4)]
    with pytest.raises(ValueError, match="no client of this run"):
        grid.send_and_receive([Message(shared, dst_node_id=5, message_type="train")])


@pytest.mark.e2e
def test_a_cohort_run_equals_one_node_per_client_with_dp_budgets_and_crashes(compose, tmp_path):
    """The same run with 6 clients on 6 nodes and on 2 nodes of 3: bit-identical rounds, failures, stragglers and
    per-client DP budgets (kept in each client's own state across rounds), on the real simulation."""
    from fl_sim.runner import run

    common = ["dataset=digits", "model=mlp", "model.hidden=[32]", "num_clients=6", "num_rounds=2", "client.lr=0.1",
              "client.local_epochs=1", "attack=none", "defense=dpsgd", "faults.client_crash_rate=0.25",
              "faults.straggler_rate=0.25", "faults.straggler_seconds=0.2"]
    alone = run(compose(common + ["backend.clients_per_node=1"]), tmp_path / "alone")
    cohort = run(compose(common + ["backend.clients_per_node=3"]), tmp_path / "cohort")
    assert sum(r["failures"] for r in alone["rounds"]) > 0  # the premise: some client crashed, some straggled
    assert sum(r["stragglers"] for r in alone["rounds"]) > 0
    drop = {"seconds", "attack_seconds"}
    assert ([{k: v for k, v in r.items() if k not in drop} for r in cohort["rounds"]]
            == [{k: v for k, v in r.items() if k not in drop} for r in alone["rounds"]])
    assert cohort["privacy"]["clients"] == alone["privacy"]["clients"]
    assert all(len(c["rounds"]) >= 1 for c in cohort["privacy"]["clients"].values())
    assert cohort["simulation"] == {"nodes": 2, "clients_per_node": 3}
    assert alone["simulation"] == {"nodes": 6, "clients_per_node": 1}


def test_summary_and_report_at_scale_keep_sizes_not_a_row_per_client(tmp_path):
    """Beyond 100 clients: every client's size and the label totals instead of a histogram per client; the
    report draws the sizes and summarises ε over the clients (min, median, max) with the 20 that spent most."""
    import numpy as np

    from fl_sim.config import compose
    from fl_sim.data import build_federated_data
    from fl_sim.report import write_report
    from fl_sim.runner import clients_info

    cfg = compose(["experiment=cross_device", "num_clients=150"])
    d = build_federated_data(cfg.dataset, cfg.partition, 150, cfg.seed)
    info = clients_info(d)
    assert info["clients"] == [] and len(info["client_sizes"]["each"]) == 150
    assert sum(info["label_totals"]) == len(d.y_train) == sum(info["client_sizes"]["each"])
    assert info["client_sizes"]["max"] == max(len(p) for p in d.partitions)
    small = clients_info(build_federated_data(cfg.dataset, cfg.partition, 5, cfg.seed))
    assert [c["client"] for c in small["clients"]] == list(range(5)) and "each" not in small["client_sizes"]

    eps = {str(c): {"epsilon": 1.0 + c / 100, "rounds": [1] if c % 2 else [1, 2], "noise_multiplier": 1.0,
                    "sample_rate": 0.5} for c in range(150)}
    summary = {"status": "completed", "config": {**{k: cfg[k] for k in ("scenario", "dataset", "model", "partition",
                                                                         "strategy", "client", "attack", "defense")},
                                                 "num_clients": 150, "num_rounds": 2, "seed": 0},
               "rounds": [{"round": 1, "train_loss": 2.0, "test_loss": 2.0, "test_accuracy": 0.1, "clients": [0, 1],
                           "seconds": 1.0}],
               "timing": {"total_seconds": 1.0, "simulation_seconds": 1.0},
               "data": {**info, "num_train": len(d.y_train), "num_test": len(d.y_test), "input_shape": [60, 1, 1],
                        "num_classes": 10},
               "model": {"parameters": 610}, "simulation": {"nodes": 2, "clients_per_node": 100},
               "privacy": {"mechanism": "dpsgd", "accountant": "rdp", "delta": 1e-5, "epsilon": 2.49,
                           "infinite": False, "clients": eps, "epsilon_per_round": []},
               "attacks": []}
    from omegaconf import OmegaConf
    summary["config"] = OmegaConf.to_container(OmegaConf.create(summary["config"]), resolve=True)
    text = write_report(tmp_path, summary).read_text()
    assert "150 clients hold" in text and (tmp_path / "client_sizes.png").exists()
    assert "simulated on 2 nodes of up to 100 clients each" in text
    assert "ε over the 150 clients that trained: min 1.000, median 1.750, max 2.490" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1") and "| 0.5 |" in ln]
    assert len(rows) == 20 and rows[0].startswith("| 149 | 2.490")
    # a client without noise (ε null in summary.json: infinite) spent most of all
    summary["privacy"]["clients"]["7"]["epsilon"] = None
    text = write_report(tmp_path, summary).read_text()
    assert "min 1.000, median 1.760, max ∞" in text and "| 7 | ∞ |" in text  # client 7 (1.07) moved to the top
    assert np.isfinite(info["client_sizes"]["mean"])


def test_many_attack_entries_are_summarised_per_round_with_the_best_listed():
    from fl_sim.config import compose
    from fl_sim.report import attacks_section

    from omegaconf import OmegaConf

    cfg = compose(["attack=inverting_gradients_short", "attack.target_clients=[]"])
    entries = [{"round": r, "client": c, "observed": "client_update", "batch_size": 4, "psnr": 10.0 + c / 10,
                "ssim": 0.1, "label_accuracy": 1.0, "iterations": 20, "seconds": 0.2,
                **({"picture": f"attack_round{r}_client{c}.png"} if c < 20 else {})}
               for r in (1, 2) for c in range(120)]
    entries[5]["psnr"], entries[5]["error"] = None, "boom"
    text = "\n".join(attacks_section({"attacks": entries, "config": OmegaConf.to_container(cfg, resolve=True)}))
    assert "| 1 | 120 | 16.00 | 21.90 | 20 | 1 |" in text  # 119 scored: the mean of 10.0 .. 21.9 without 10.5
    assert "| 2 | 120 | 15.95 | 21.90 | 20 | 0 |" in text
    assert "The 10 best of the 240 reconstructions" in text
    assert text.count("| client_update |") == 10 and "![round" not in text  # the best have no picture drawn


def test_a_round_draws_at_most_attack_pictures_pictures_and_scores_every_attack(tmp_path):

    from attacks import Knowledge, Reconstruction
    from fl_sim.config import compose
    from fl_sim.evaluator import true_batch
    from fl_sim.recorder import RunRecorder
    from fl_sim.server import score_attacks
    from fl_sim.workspace import workspace
    from strategies.adversarial import AttackJob, AttackOutcome

    cfg = compose(["dataset=digits", "model=mlp", "num_clients=30", "attack=inverting_gradients_short",
                   "attack.target_clients=[]", "attack.pictures=3"])
    ws = workspace(cfg, "server")

    class Done:
        skipped = []

        def take_outcomes(self):
            out = []
            for c in reversed(range(8)):  # out of order: pictures go to the first clients by id
                x = torch.from_numpy(true_batch(ws.data, c)[0])  # perfect reconstructions, as [0, 1] images
                job = AttackJob(1, c, "client_update", None, Knowledge(ws.model, ws.data.input_shape, 10))
                out.append(AttackOutcome(job, Reconstruction(x, None), 0.1))
            return out

    rec = RunRecorder(cfg, tmp_path)
    score_attacks(Done(), cfg, ws, rec)
    assert [a["client"] for a in rec.attacks] == list(range(8)) and all(a["psnr"] > 30 for a in rec.attacks)
    assert [a.get("picture") for a in rec.attacks][:4] == [f"attack_round1_client{c}.png" for c in range(3)] + [None]
    assert sorted(p.name for p in tmp_path.glob("attack_*.png")) == [f"attack_round1_client{c}.png" for c in range(3)]
