"""Wiring the adversarial server into a run: attack from config, what the server knows, running the
round's attacks (in parallel as Ray tasks), and the evaluator that scores them against the truth.

The evaluator here is the only code that holds a client's data next to a reconstruction.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from omegaconf import DictConfig

from attacks import Knowledge, make_attack
from attacks.imprint import ImprintBlock, ImprintedModel, measurement_thresholds, random_measurement
from fl_sim.data import FederatedData
from fl_sim.metrics import score
from strategies.adversarial import AttackJob, AttackOutcome, run_jobs_sequentially

log = logging.getLogger("fl_sim")

ATTACK_RESOURCE = "fl_sim_attack"  # custom Ray resource: one unit per attack worker


def attack_from_config(a: DictConfig):
    """The attack object with its config's hyper-parameters (explicitly, per attack)."""
    if a.name == "inverting_gradients":
        return make_attack("inverting_gradients", iterations=a.iterations, restarts=a.restarts, lr=a.lr, tv=a.tv,
                           bn_prior=a.bn_prior, signed=a.signed, seed=a.seed)
    if a.name in ("dlg", "idlg"):
        return make_attack(a.name, max_evaluations=a.max_evaluations, seed=a.seed)
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
    raise ValueError(f"attack={a.name} is not known")


def wrap_model(cfg: DictConfig, model: torch.nn.Module, data: FederatedData) -> torch.nn.Module:
    """The model a malicious server sends: with attack=imprint, an imprint block goes in front.
    Its bins sit at quantiles of a random linear measurement on the attacker's public data (the
    held-out test split)."""
    if cfg.attack.name != "imprint":
        return model
    shape = data.input_shape
    m = random_measurement(math.prod(shape), cfg.seed)
    thresholds = measurement_thresholds(torch.from_numpy(data.x_test), cfg.attack.bins, m)
    return ImprintedModel(model, ImprintBlock(shape, cfg.attack.bins, thresholds, measurement=m, seed=cfg.seed))


def malicious_rewrite(cfg: DictConfig, initial: dict[str, torch.Tensor]):
    """What a malicious server does to the global model before sending it: with imprint it puts its
    block back as it built it (one local step moves the block far, as the attack needs large
    updates; the server would otherwise send a broken model next round). None when honest."""
    if cfg.attack.name != "imprint":
        return None
    block = {k: v.detach().cpu().clone() for k, v in initial.items() if k.startswith("block.")}

    def rewrite(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (block[k] if k in block else v) for k, v in state.items()}

    return rewrite


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


def _run_job_in_worker(attack, job: AttackJob, threads: int, queue=None) -> AttackOutcome:
    """A Ray task: one attack with ``threads`` threads, progress sent back through ``queue``."""
    torch.set_num_threads(threads)
    progress = None if queue is None else (lambda j, it, loss: queue.put_nowait((j.server_round, j.client, it, loss)))
    return run_jobs_sequentially(attack, [job], progress=progress)[0]


def ray_executor(workers: int, threads: int):
    """Run a round's attacks as Ray tasks, ``workers`` at a time, each holding one unit of the
    ``fl_sim_attack`` resource reserved at Ray start (the client actors keep their CPUs); progress
    (iterations, matching loss) comes back through a Ray queue."""

    def execute(attack, jobs: list[AttackJob]) -> list[AttackOutcome]:
        import ray
        from ray.util.queue import Empty, Queue

        queue = Queue(actor_options={"num_cpus": 0})
        try:
            task = ray.remote(_run_job_in_worker).options(num_cpus=0, resources={ATTACK_RESOURCE: 1}, max_retries=0)
            attack_ref = ray.put(attack)
            pending = [task.remote(attack_ref, job, threads, queue) for job in jobs]
            log.info("round %d: attacking clients %s with %s (%d in parallel)", jobs[0].server_round,
                     [j.client for j in jobs], getattr(attack, "name", attack), min(workers, len(jobs)))
            while True:
                _, not_ready = ray.wait(pending, num_returns=len(pending), timeout=2.0)
                try:
                    while True:
                        rnd, client, it, loss = queue.get_nowait()
                        log.info("  attack round %d client %s: iteration %d, matching loss %.5f",
                                 rnd, client, it, loss)
                except Empty:
                    pass
                if not not_ready:
                    break
            out = []
            for job, ref in zip(jobs, pending):
                try:
                    out.append(ray.get(ref))
                except Exception as e:  # noqa: BLE001 - a lost worker fails that attack, not the run
                    out.append(AttackOutcome(job, None, 0.0, error=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            return out
        finally:
            ray.kill(queue.actor)

    return execute


def _log_progress(job: AttackJob, it: int, loss: float) -> None:
    log.info("  attack round %d client %s: iteration %d, matching loss %.5f", job.server_round, job.client, it, loss)


def local_executor(threads: int):
    """Attacks one after the other in the server process, with ``threads`` threads like a worker."""

    def execute(attack, jobs: list[AttackJob]) -> list[AttackOutcome]:
        log.info("round %d: attacking clients %s with %s (in the server process)", jobs[0].server_round,
                 [j.client for j in jobs], getattr(attack, "name", attack))
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)  # the same thread count as an attack worker: same floating point
        try:
            return run_jobs_sequentially(attack, jobs, progress=_log_progress)
        finally:
            torch.set_num_threads(saved)

    return execute


def executor_from_config(cfg: DictConfig):
    a = cfg.attack
    if a.workers <= 0:
        return local_executor(max(1, int(a.num_cpus)))
    return ray_executor(a.workers, max(1, int(a.num_cpus)))


# --------------------------------------------------------------------------- the evaluator

def true_batch(data: FederatedData, clients: int | list[int],
               batch: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The client's (or clients') training data as [0, 1] images, and labels; ``batch``: only
    these positions of one client's data (split learning attacks one batch)."""
    ids = clients if isinstance(clients, list) else [clients]
    xs, ys = zip(*(data.client(c) for c in ids))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if batch is not None:
        x, y = x[np.asarray(batch, dtype=np.int64)], y[np.asarray(batch, dtype=np.int64)]
    x = x * data.std[None, :, None, None] + data.mean[None, :, None, None]
    return np.clip(x, 0, 1), y


def evaluate_label_guess(guess: dict, data: FederatedData) -> dict:
    """Score label leakage (classes up to a renaming) against the batch's true labels; the summary entry."""
    from attacks.label_leakage import label_accuracy_up_to_renaming

    _, y_true = true_batch(data, guess["client"], guess["batch"])
    return {"round": guess["round"], "client": guess["client"], "attack": "label_leakage", "observed": "cut_gradients",
            "batch_size": int(len(y_true)), "psnr": None, "ssim": None,
            "label_accuracy": label_accuracy_up_to_renaming(np.asarray(guess["guess"]), y_true),
            "iterations": 0, "evaluations": 0, "seconds": guess["seconds"]}


def save_grid(originals: np.ndarray, recs: np.ndarray, path: Path, title: str, max_images: int = 16) -> None:
    """Originals (top row) above their matched reconstructions (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(len(originals), max_images)
    fig, axes = plt.subplots(2, k, figsize=(1.2 * k + 0.4, 2.8), squeeze=False)
    for j in range(k):
        for row, img in ((0, originals[j]), (1, recs[j])):
            ax = axes[row][j]
            im = np.transpose(img, (1, 2, 0))
            ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("original", fontsize=8)
    axes[1][0].set_ylabel("attack", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_outcome(outcome: AttackOutcome, data: FederatedData, attack_name: str, run_dir: Path | None) -> dict:
    """Score one attack against the truth; write its picture; return the summary.json entry."""
    job = outcome.job
    x_true, y_true = true_batch(data, job.client, job.batch)
    entry = {"round": job.server_round, "client": job.client, "attack": attack_name, "observed": job.observed,
             "batch_size": int(len(y_true)), "psnr": None, "ssim": None, "label_accuracy": None,
             "iterations": 0, "evaluations": 0, "seconds": outcome.seconds}
    rec = outcome.reconstruction
    if rec is None:
        entry["error"] = outcome.error
        return entry
    recs = rec.inputs.numpy()
    if len(recs) < len(x_true):  # what the attack did not return counts as a mid-grey guess
        recs = np.concatenate([recs, np.full((len(x_true) - len(recs), *recs.shape[1:]), 0.5, recs.dtype)])
    labels_given = bool(rec.info.get("labels_given")) or job.knowledge.labels is not None
    s = score(x_true, recs, y_true, None if rec.labels is None else rec.labels.numpy(), labels_given=labels_given)
    entry.update({"psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "label_accuracy": s["label_accuracy"],
                  "iterations": rec.iterations, "evaluations": rec.evaluations,
                  "psnr_per_image": s["psnr"], "ssim_per_image": s["ssim"]})
    if rec.labels is None and not labels_given:
        entry["label_accuracy"] = None
    if run_dir is not None:
        tag = "-".join(map(str, job.client)) if isinstance(job.client, list) else str(job.client)
        name = f"attack_round{job.server_round}_client{tag}.png"
        order = np.asarray(s["order"])
        shown = np.argsort([-p for p in s["psnr"]])[:16] if len(y_true) > 16 else np.arange(len(y_true))
        save_grid(x_true[shown], recs[order[shown]], run_dir / name,
                  f"{attack_name}, round {job.server_round}, client {tag}: PSNR {s['psnr_mean']:.2f} dB, "
                  f"SSIM {s['ssim_mean']:.3f}" + (" (best 16 shown)" if len(y_true) > 16 else ""))
        entry["picture"] = name
    return entry
