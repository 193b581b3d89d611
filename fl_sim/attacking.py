"""The adversarial server's wiring: the attack from its config, what the server knows about a reply,
where a round's attacks run (in parallel as Ray tasks on a reserved resource, or in the server
process), and the ``AdversarialStrategy`` around the run's strategy. Scoring is the evaluator's
(``fl_sim.evaluator``); what a malicious server sends is ``fl_sim.malicious``'s."""

from __future__ import annotations

import logging
import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from omegaconf import DictConfig

from attacks import Knowledge, make_attack
from fl_sim.data import FederatedData
from fl_sim.malicious import tamper, untamper
from fl_sim.training import resolve_device
from fl_sim.workspace import Workspace, initial_model
from strategies.adversarial import AdversarialStrategy, AttackJob, AttackOutcome, run_jobs_sequentially

log = logging.getLogger("fl_sim")

ATTACK_RESOURCE = "fl_sim_attack"  # custom Ray resource: one unit per attack worker


def attack_from_config(a: DictConfig):
    """The attack object with its config's hyper-parameters (explicitly, per attack)."""
    if a.name == "inverting_gradients":
        return make_attack("inverting_gradients", iterations=a.iterations, restarts=a.restarts, lr=a.lr, tv=a.tv,
                           bn_prior=a.bn_prior, signed=a.signed, train_mode=a.bn_mode == "train", seed=a.seed)
    if a.name in ("dlg", "idlg"):
        return make_attack(a.name, max_evaluations=a.max_evaluations, train_mode=a.bn_mode == "train", seed=a.seed)
    if a.name in ("analytic", "imprint"):
        return make_attack(a.name)
    if a.name == "rmle":
        return make_attack("rmle", iterations=a.iterations, lr=a.lr, tv=a.tv, seed=a.seed)
    if a.name == "inverse_network":
        return make_attack("inverse_network", epochs=a.iterations, lr=a.lr, seed=a.seed)
    if a.name == "unsplit":
        return make_attack("unsplit", rounds=a.iterations, lr_input=a.lr, tv=a.tv, seed=a.seed)
    if a.name == "fsha":
        return make_attack("fsha", lr_encoder=a.lr, lr_discriminator=a.lr, gradient_penalty=a.gradient_penalty,
                           seed=a.seed)
    if a.name == "mi_face":
        return make_attack("mi_face", iterations=a.iterations, lr=a.lr, patience=a.patience, tv=a.tv,
                           per_class=a.per_class, precision=a.precision, seed=a.seed)
    if a.name == "gmi":
        return make_attack("gmi", iterations=a.iterations, lr=a.lr, momentum=a.momentum, lam=a.lam,
                           restarts=a.restarts, per_class=a.per_class, latent_dim=a.latent_dim, width=a.gan_width,
                           gan_steps=a.gan_steps, gan_batch_size=a.gan_batch_size, gan_lr=a.gan_lr,
                           critic_steps=a.critic_steps, gradient_penalty=a.gradient_penalty, precision=a.precision,
                           seed=a.seed)
    if a.name == "kedmi":
        return make_attack("kedmi", iterations=a.iterations, lr=a.lr, lam=a.lam, samples=a.samples,
                           per_class=a.per_class, latent_dim=a.latent_dim, width=a.gan_width, gan_steps=a.gan_steps,
                           gan_batch_size=a.gan_batch_size, gan_lr=a.gan_lr, critic_steps=a.critic_steps,
                           precision=a.precision, seed=a.seed)
    if a.name == "plgmi":
        return make_attack("plgmi", iterations=a.iterations, lr=a.lr, restarts=a.restarts, per_class=a.per_class,
                           top_k=a.top_k, alpha=a.alpha, latent_dim=a.latent_dim, width=a.gan_width,
                           gan_steps=a.gan_steps, gan_batch_size=a.gan_batch_size, gan_lr=a.gan_lr,
                           critic_steps=a.critic_steps, precision=a.precision, seed=a.seed)
    if a.name == "deepinversion":
        return make_attack("deepinversion", iterations=a.iterations, lr=a.lr, bn_weight=a.bn_weight, tv=a.tv,
                           per_class=a.per_class, precision=a.precision, seed=a.seed)
    if a.name == "hitaj":
        return make_attack("hitaj", iterations=a.iterations, lr=a.lr, per_class=a.per_class, injected=a.injected,
                           latent_dim=a.latent_dim, width=a.gan_width, batch_size=a.gan_batch_size,
                           precision=a.precision, seed=a.seed)
    raise ValueError(f"attack={a.name} is not known")


def knowledge_fn(cfg: DictConfig, model: torch.nn.Module, data: FederatedData):
    """What the server knows about a reply: the architecture, the hyper-parameters it sent, the
    number of examples the client reported; labels only if the threat model grants them."""

    def knowledge(server_round: int, arrays: ArrayRecord, config: ConfigRecord, reply: Message) -> Knowledge:
        n = int(reply.content["metrics"]["num-examples"])
        labels = None
        if cfg.attack.labels_known:
            cid = int(reply.content["client"]["partition-id"])
            labels = torch.from_numpy(data.client(cid)[1])
        return Knowledge(model=model, input_shape=data.input_shape, num_classes=data.num_classes,
                         lr=float(config["lr"]), local_epochs=int(config["local-epochs"]),
                         batch_size=int(config["batch-size"]), num_examples=n, labels=labels,
                         mean=tuple(data.mean.tolist()), std=tuple(data.std.tolist()))

    return knowledge


def run_on(device: str, jobs: list[AttackJob], run) -> list[AttackOutcome]:
    """Run ``run(jobs)`` with every job's knowledge on ``device``; each outcome says where it ran."""
    for job in jobs:
        job.knowledge.device = device
    out = run(jobs)
    for o in out:
        o.extra["device"] = device
    return out


def attack_threads(num_cpus: float | None, free_cpus: int, parallel: int) -> int:
    """Threads of one attack: ``attack.num_cpus`` when set; otherwise the CPUs free while the round's attacks
    run, shared by the attacks that run at once. Rounds are synchronous: the client actors wait for the next
    round while the server attacks, so their CPUs are free then."""
    if num_cpus is not None:
        return max(1, int(num_cpus))
    return max(1, int(free_cpus) // max(1, int(parallel)))


def machine_cpus(cfg: DictConfig) -> int:
    """The CPUs of this machine that the run may use: ``backend.num_cpus``, else all of them."""
    return int(cfg.backend.num_cpus) if cfg.backend.num_cpus is not None else (os.cpu_count() or 1)


def _run_job_in_worker(attack, job: AttackJob, threads: int | None, device: str = "cpu", gpus: float = 0.0,
                       queue=None, parallel: int = 1) -> AttackOutcome:
    """A Ray task: one attack with ``threads`` threads (None: this node's CPUs shared by the ``parallel``
    attacks of the round) on the device this worker resolves (``device``: auto, cpu, cuda, cuda:N; a GPU
    only when Ray assigned ``gpus`` > 0 of one, the rule clients follow), progress sent back through ``queue``."""
    torch.set_num_threads(threads or attack_threads(None, os.cpu_count() or 1, parallel))
    progress = None if queue is None else (lambda j, it, loss: queue.put_nowait((j.server_round, j.client, it, loss)))
    try:
        here = str(resolve_device(device, gpu_assigned=gpus > 0))
    except ValueError as e:
        return AttackOutcome(job, None, 0.0, error=str(e))
    outcome = run_on(here, [job], lambda js: run_jobs_sequentially(attack, js, progress=progress))[0]
    outcome.extra["threads"] = torch.get_num_threads()
    if gpus > 0:
        import ray

        outcome.extra["gpu_ids"] = [str(i) for i in ray.get_gpu_ids()]  # the GPUs Ray gave this task
    return outcome


def attack_task_options(gpus: float) -> dict:
    """The Ray options of an attack task: no CPU of the clients' (one unit of the reserved ``fl_sim_attack``
    resource instead; its threads are ``attack.num_cpus``), ``attack.num_gpus`` of a GPU (Ray shows a task
    the GPUs it asked for, and none to a task that asked for none)."""
    return {"num_cpus": 0, "num_gpus": float(gpus), "resources": {ATTACK_RESOURCE: 1}, "max_retries": 0}


def targets_text(jobs: list[AttackJob]) -> str:
    """"clients [0, 3]", or for many targets "120 clients (0, 3, 5, ...)"."""
    ids = [j.client for j in jobs]
    if len(ids) <= 20:
        return f"clients {ids}"
    return f"{len(ids)} clients ({', '.join(map(str, ids[:3]))}, ...)"


def ray_executor(workers: int, threads: int | None, device: str = "cpu", gpus: float = 0.0, fallback=None,
                 free_cpus: int | None = None):
    """Run a round's attacks as Ray tasks, ``workers`` at a time, each holding one unit of the
    ``fl_sim_attack`` resource reserved at Ray start (the client actors keep their CPUs) and ``gpus`` of a
    GPU, with ``threads`` threads each (None: ``free_cpus`` shared by the attacks running at once, or, on a
    cluster, the CPUs of the task's node; ``attack_threads``); progress (iterations, matching loss) comes back through a Ray queue. When the client actors hold
    so much of the GPUs that no attack task fits (they keep theirs for the whole run), the round's attacks
    run in ``fallback`` (the server process) instead of waiting forever."""

    def execute(attack, jobs: list[AttackJob]) -> list[AttackOutcome]:
        import ray  # Ray is up by now (the simulation started it); importing it costs a second otherwise

        if gpus > 0 and fallback is not None and ray.available_resources().get("GPU", 0.0) + 1e-9 < gpus:
            log.warning("round %d: attack.num_gpus=%g but the client actors leave %.2f GPU free: the attacks run "
                        "in the server process (lower backend.client_resources.num_gpus or attack.num_gpus)",
                        jobs[0].server_round, gpus, ray.available_resources().get("GPU", 0.0))
            return fallback(attack, jobs)
        from ray.util.queue import Empty, Queue

        queue = Queue(actor_options={"num_cpus": 0})
        try:
            task = ray.remote(_run_job_in_worker).options(**attack_task_options(gpus))
            attack_ref = ray.put(attack)
            parallel = min(workers, len(jobs))
            n = threads if threads is not None or free_cpus is None else attack_threads(None, free_cpus, parallel)
            log.info("round %d: attacking %s with %s (%d in parallel%s)", jobs[0].server_round,
                     targets_text(jobs), getattr(attack, "name", attack), parallel,
                     f", {n} threads each" if n is not None else "")
            # Submitted in waves of twice the workers, each result collected as it ends: with many targets a
            # round, only the running and next attacks' observations are in Ray's object store at once.
            out: list[AttackOutcome | None] = [None] * len(jobs)
            running: dict = {}
            waiting = list(enumerate(jobs))
            while waiting or running:
                while waiting and len(running) < 2 * parallel:
                    i, job = waiting.pop(0)
                    running[task.remote(attack_ref, job, n, device, gpus, queue, parallel)] = i
                done, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
                for ref in done:
                    i = running.pop(ref)
                    try:
                        out[i] = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a lost worker fails that attack, not the run
                        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                        out[i] = AttackOutcome(jobs[i], None, 0.0, error=reason)
                try:
                    while True:
                        rnd, client, it, loss = queue.get_nowait()
                        log.info("  attack round %d client %s: iteration %d, matching loss %.5f",
                                 rnd, client, it, loss)
                except Empty:
                    pass
            return out
        finally:
            ray.kill(queue.actor)

    return execute


def _log_progress(job: AttackJob, it: int, loss: float) -> None:
    log.info("  attack round %d client %s: iteration %d, matching loss %.5f", job.server_round, job.client, it, loss)


def local_executor(threads: int, device: str = "cpu"):
    """Attacks one after the other in the server process, with ``threads`` threads, on the server's own
    ``device``."""

    def execute(attack, jobs: list[AttackJob]) -> list[AttackOutcome]:
        log.info("round %d: attacking %s with %s (in the server process, %s, %d threads)",
                 jobs[0].server_round, targets_text(jobs), getattr(attack, "name", attack), device, threads)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = run_on(device, jobs, lambda js: run_jobs_sequentially(attack, js, progress=_log_progress))
        finally:
            torch.set_num_threads(saved)
        for o in out:
            o.extra["threads"] = threads
        return out

    return execute


def server_device(cfg: DictConfig) -> str:
    """The device the server process computes on (its central evaluation, attacks run there)."""
    return str(resolve_device(str(cfg.device)))


def _local(cfg: DictConfig):
    """Attacks in the server process, one at a time: ``attack.num_cpus`` threads, or the machine's CPUs."""
    return local_executor(attack_threads(cfg.attack.num_cpus, machine_cpus(cfg), 1), server_device(cfg))


def executor_from_config(cfg: DictConfig):
    a = cfg.attack
    local = _local(cfg)
    if a.workers <= 0:
        return local
    threads = None if a.num_cpus is None else attack_threads(a.num_cpus, 0, 1)
    free = machine_cpus(cfg) if cfg.backend.ray_address is None else None  # a cluster: each task's node's CPUs
    return ray_executor(a.workers, threads, str(cfg.device), float(a.num_gpus), fallback=local, free_cpus=free)


def attack_executor(cfg: DictConfig):
    """Ray tasks on the reserved attack resource, or this process when the cluster has none."""
    a = cfg.attack
    executor = executor_from_config(cfg)
    if a.workers > 0:
        import ray  # Ray is up by now (the simulation started it); importing it costs a second otherwise

        if ray.cluster_resources().get(ATTACK_RESOURCE, 0) < 1:
            log.warning("the Ray cluster has no '%s' resource: attacks run in the server process "
                        "(start Ray nodes with --resources='{\"%s\": N}' to run them in parallel)",
                        ATTACK_RESOURCE, ATTACK_RESOURCE)
            executor = _local(cfg)
    return executor


def adversarial_server(cfg: DictConfig, inner, ws: Workspace, client_of: dict[int, int]) -> AdversarialStrategy:
    """The honest-but-curious (or, with imprint, malicious) server around ``inner``."""
    a = cfg.attack
    executor = attack_executor(cfg)
    scratch = initial_model(cfg, ws.data)
    return AdversarialStrategy(
        inner, attack_from_config(a), knowledge_fn(cfg, scratch, ws.data),
        client_of=lambda m: client_of.get(m.metadata.src_node_id, -1),
        targets=set(a.target_clients) or None, rounds=set(a.rounds) or None, executor=executor,
        tamper=tamper(cfg, ws.data), untamper=untamper,
        recipient_of=lambda m: client_of.get(m.metadata.dst_node_id, -1))

