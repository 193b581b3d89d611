"""The evaluator: the only code that holds a client's data next to a reconstruction. It scores each
attack's outcome against the truth (PSNR / SSIM after Hungarian matching, label accuracy), draws the
originals above the reconstructions, and returns the ``summary.json`` entry. Attacks never see it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attacks.label_leakage import label_accuracy_up_to_renaming
from fl_sim.data import FederatedData
from fl_sim.metrics import score
from strategies.adversarial import AttackOutcome


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
    _, y_true = true_batch(data, guess["client"], guess["batch"])
    return {"round": guess["round"], "client": guess["client"], "attack": "label_leakage", "observed": "cut_gradients",
            "batch_size": int(len(y_true)), "psnr": None, "ssim": None,
            "label_accuracy": label_accuracy_up_to_renaming(np.asarray(guess["guess"]), y_true),
            "iterations": 0, "evaluations": 0, "seconds": guess["seconds"]}


def save_grid(originals: np.ndarray, recs: np.ndarray, path: Path, title: str, max_images: int = 16) -> None:
    """Originals (top row) above their matched reconstructions (bottom row)."""
    import matplotlib  # imported when drawing: it costs the driver's start-up (and the actors' imports) otherwise

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
