"""Where attacks compute (issue 17): the Ray options of an attack task, the device a worker resolves
for its attack (``device=auto|cpu|cuda``, the clients' rule), the server's own device for attacks in
its process, and no wait for a GPU the client actors hold. Checked without a GPU; the CUDA branches run
where torch sees one."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from attacks import Knowledge, Reconstruction
from fl_sim.attacking import ATTACK_RESOURCE, _run_job_in_worker, attack_task_options, local_executor, ray_executor
from strategies.adversarial import AttackJob

CUDA = torch.cuda.is_available()


class WhereAttack:
    """Records the device its knowledge names, and computes there."""

    name = "where"

    def __init__(self):
        self.devices = []

    def reconstruct(self, observation, knowledge, progress=None):
        self.devices.append(knowledge.device)
        x = torch.zeros(1, 1, 2, 2, device=knowledge.device) + 0.5
        return Reconstruction(x.cpu(), None)


def job(client: int = 0) -> AttackJob:
    know = Knowledge(model=torch.nn.Linear(4, 2), input_shape=(1, 2, 2), num_classes=2)
    return AttackJob(server_round=1, client=client, observed="client_update", observation=None, knowledge=know)


def test_an_attack_task_asks_ray_for_its_gpu_share_and_no_client_cpu():
    assert attack_task_options(0.5) == {"num_cpus": 0, "num_gpus": 0.5, "resources": {ATTACK_RESOURCE: 1},
                                        "max_retries": 0}
    assert attack_task_options(0.0)["num_gpus"] == 0.0  # Ray then hides every GPU from the task


@pytest.mark.parametrize("device, gpus, expected", [
    ("cpu", 0.0, "cpu"),
    ("cpu", 0.5, "cpu"),                                    # device=cpu wins (validation refuses gpus with it)
    ("auto", 0.0, "cpu"),                                   # no GPU assigned: the CPU, GPU or not
    ("auto", 0.5, "cuda" if CUDA else "cpu"),               # assigned, and torch sees it: the GPU
    ("cuda", 0.5, "cuda" if CUDA else "error"),
])
def test_a_worker_resolves_its_device_as_clients_do_and_its_knowledge_carries_it(monkeypatch, device, gpus,
                                                                                  expected):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get_gpu_ids=lambda: [0]))
    attack, j = WhereAttack(), job()
    out = _run_job_in_worker(attack, j, threads=1, device=device, gpus=gpus)
    if expected == "error":
        assert out.reconstruction is None and "no CUDA device is visible" in out.error and attack.devices == []
        return
    assert out.error is None and attack.devices == [expected] and out.extra["device"] == expected
    assert j.knowledge.device == expected and out.reconstruction.inputs.device.type == "cpu"
    assert ("gpu_ids" in out.extra) is (gpus > 0)


def test_attacks_in_the_server_process_use_the_servers_device():
    attack = WhereAttack()
    out = local_executor(1, "cpu")(attack, [job(0), job(1)])
    assert attack.devices == ["cpu", "cpu"] and [o.extra["device"] for o in out] == ["cpu", "cpu"]


def test_an_attack_uses_the_cpus_the_idle_clients_leave_and_parallel_attacks_share_them(compose):
    """attack.num_cpus unset: a lone attack takes every CPU of the run (the clients wait for the next round
    while the server attacks), attacks running at once split them; attack.num_cpus=N is N threads."""
    from fl_sim.attacking import attack_threads, executor_from_config

    assert [attack_threads(None, 2, k) for k in (1, 2, 3)] == [2, 1, 1]
    assert attack_threads(None, 16, 3) == 5 and attack_threads(3, 2, 2) == 3 and attack_threads(0.5, 8, 1) == 1
    saved = torch.get_num_threads()
    for overrides, threads in ((["backend.num_cpus=3"], 3), (["backend.num_cpus=3", "attack.num_cpus=1"], 1)):
        cfg = compose(["attack.workers=0", "device=cpu", *overrides])
        out = executor_from_config(cfg)(WhereAttack(), [job(0)])
        assert out[0].extra["threads"] == threads and torch.get_num_threads() == saved


def test_attacks_run_in_the_server_process_when_the_client_actors_leave_too_little_gpu(monkeypatch, caplog):
    """Client actors hold their GPU share for the whole run: an attack task asking for more than is left
    would wait forever. The round's attacks run in the server process instead, with one warning."""
    monkeypatch.setitem(sys.modules, "ray",
                        types.SimpleNamespace(available_resources=lambda: {"CPU": 2.0, "GPU": 0.25}))
    served = []

    def fallback(attack, jobs):
        served.extend(jobs)
        return []

    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        ray_executor(2, 1, "auto", 0.5, fallback=fallback)(WhereAttack(), [job(0), job(1)])
    assert [j.client for j in served] == [0, 1]
    assert "attack.num_gpus=0.5 but the client actors leave 0.25 GPU free" in caplog.text


@pytest.mark.parametrize("overrides, gpus, cap", [
    (["attack.num_gpus=0.5", "backend.client_resources.num_gpus=0.25"], 1, 1),   # 1 GPU: 2 x 0.5 kept is all of
    # it but one actor's share: one actor
    (["attack.num_gpus=0.25", "attack.workers=2", "backend.client_resources.num_gpus=0.25"], 1, 2),
    (["attack.num_gpus=0.5", "attack.workers=4", "backend.client_resources.num_gpus=0.5"], 1, 1),  # one actor stays
    (["attack.num_gpus=0.5", "backend.client_resources.num_gpus=0.25"], 0, None),  # no GPU: nothing to keep
    (["attack.num_gpus=0", "backend.client_resources.num_gpus=0.25"], 1, None),     # attacks want no GPU
    (["attack.num_gpus=0.5", "backend.client_resources.num_gpus=0"], 1, None),      # clients take none
    (["attack.num_gpus=0.5", "attack.workers=1", "backend.client_resources.num_gpus=0.25", "backend.num_cpus=2"],
     1, None),                                                                   # 2 actors fit beside it already
])
def test_a_local_instance_keeps_gpu_room_for_the_attack_tasks(monkeypatch, overrides, gpus, cap):
    """Client actors keep their GPU share for the whole run: the local instance gets only the CPUs of as
    many actors as leave ``attack.workers`` GPU shares free."""
    from fl_sim.config import compose
    from fl_sim.runner import backend_config, client_actor_cap

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = compose(["dataset=digits", "model=mlp", "attack=dlg", "attack.workers=2", *overrides])
    assert client_actor_cap(cfg) == cap
    init = backend_config(cfg)["init_args"]
    assert init.get("num_cpus") == (cap if cap is not None else (2 if "backend.num_cpus=2" in overrides else None))


@pytest.mark.skipif(CUDA, reason="a machine without a GPU")
def test_client_gpu_shares_on_a_machine_without_a_gpu_are_one_line_not_an_empty_actor_pool():
    from fl_sim.config import ConfigError, compose
    from fl_sim.validation import validate

    with pytest.raises(ConfigError, match=r"backend.client_resources.num_gpus=0.25 but torch sees no GPU") as e:
        validate(compose(["dataset=digits", "model=mlp", "attack=none", "backend.client_resources.num_gpus=0.25"]))
    assert "\n" not in str(e.value)
    # a Ray instance told it has GPUs (backend.num_gpus), or a cluster, is the user's word
    validate(compose(["dataset=digits", "model=mlp", "attack=none", "backend.client_resources.num_gpus=0.25",
                      "backend.num_gpus=1"]))
