"""The evaluator: the only code that holds a client's data next to a reconstruction. It scores each
attack's outcome against the truth (PSNR / SSIM after Hungarian matching, label accuracy; for model
inversion the field's protocol under the evaluation classifier), draws the originals above the
reconstructions, and returns the ``summary.json`` entry. Attacks never see it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attacks.base import Reconstruction
from attacks.label_leakage import label_accuracy_up_to_renaming
from fl_sim.data import FederatedData
from fl_sim.evaluation_classifier import EvaluationClassifier
from fl_sim.metrics import frechet_distance, nearest, psnr, score, ssim
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


def save_grid(originals: np.ndarray, recs: np.ndarray, path: Path, title: str, max_images: int = 16,
              rows: tuple[str, str] = ("original", "attack")) -> None:
    """Originals (top row) above their matched reconstructions (bottom row); ``rows``: the rows' names."""
    import matplotlib  # imported when drawing: it costs the driver's start-up (and the actors' imports) otherwise

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    k = min(len(originals), max_images)
    width = max(1.2 * k + 0.4, 3.6)  # a single image still leaves room for its title
    title = textwrap.fill(title, max(30, int(width * 14)))  # about 14 characters an inch at 9 pt
    fig, axes = plt.subplots(2, k, figsize=(width, 2.8 + 0.15 * title.count("\n")), squeeze=False)
    for j in range(k):
        for row, img in ((0, originals[j]), (1, recs[j])):
            ax = axes[row][j]
            im = np.transpose(img, (1, 2, 0))
            ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel(rows[0], fontsize=8)
    axes[1][0].set_ylabel(rows[1], fontsize=8)
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
             "iterations": 0, "evaluations": 0, "seconds": outcome.seconds,
             "device": str(outcome.extra.get("device", job.knowledge.device)),  # where the attack computed
             **({"threads": outcome.extra["threads"]} if "threads" in outcome.extra else {}),  # its torch threads
             **({"gpu_ids": outcome.extra["gpu_ids"]} if "gpu_ids" in outcome.extra else {})}  # Ray's GPUs for it
    rec = outcome.reconstruction
    if rec is None:
        entry["error"] = outcome.error
        return entry
    recs = rec.inputs.detach().cpu().numpy()  # an attack on a GPU may return CUDA tensors
    if len(recs) < len(x_true):  # what the attack did not return counts as a mid-grey guess
        recs = np.concatenate([recs, np.full((len(x_true) - len(recs), *recs.shape[1:]), 0.5, recs.dtype)])
    labels_given = bool(rec.info.get("labels_given")) or job.knowledge.labels is not None
    s = score(x_true, recs, y_true, None if rec.labels is None else rec.labels.cpu().numpy(), labels_given=labels_given)
    entry.update({"psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "label_accuracy": s["label_accuracy"],
                  "iterations": rec.iterations, "evaluations": rec.evaluations,
                  "psnr_per_image": s["psnr"], "ssim_per_image": s["ssim"]})
    if rec.labels is None and not labels_given:
        entry["label_accuracy"] = None
    if run_dir is not None:
        tag = "-".join(map(str, job.client)) if isinstance(job.client, list) else str(job.client)
        name = f"attack_round{job.server_round}_client{tag}.png"
        order = np.asarray(s["order"])
        shown = np.arange(len(y_true))
        if len(y_true) > 16:  # 16 spread over the ranking, best to worst: the picture is not the best few
            ranked = np.argsort([-p for p in s["psnr"]], kind="stable")
            shown = ranked[np.linspace(0, len(ranked) - 1, 16).round().astype(int)]
        save_grid(x_true[shown], recs[order[shown]], run_dir / name,
                  f"{attack_name}, round {job.server_round}, client {tag}: mean PSNR {s['psnr_mean']:.2f} dB, "
                  f"SSIM {s['ssim_mean']:.3f} over all {len(y_true)}" +
                  (" (16 shown, from the best PSNR to the worst)" if len(y_true) > 16 else ""))
        entry["picture"] = name
    return entry


# --------------------------------------------------------------------------- model inversion

def evaluate_model_inversion(rec: Reconstruction, data: FederatedData, judge: EvaluationClassifier, *,
                             attack_name: str, server_round: int, seconds: float, run_dir: Path | None,
                             tag: str = "") -> dict:
    """Score a model inversion with the field's protocol; the ``summary.json`` entry (``observed: "model"``).

    - attack accuracy: the share of reconstructions the evaluation classifier puts in their target class
      (top-1; top-5 when it knows more than 5 classes), among *every* class of the dataset;
    - KNN distance: per reconstruction, the smallest squared L2 distance in the evaluation classifier's
      penultimate features to the private training images of its class, averaged;
    - feature FID: the Fréchet distance between those features of the reconstructions and of the private
      images of the target classes (not Inception's FID: no Inception weights here);
    - each reconstruction's nearest private image (by that distance) and their PSNR / SSIM.
    ``tag`` goes into the pictures' names (e.g. ``_round3`` when a participant attacks every round)."""
    images = np.clip(rec.inputs.detach().cpu().numpy().astype(np.float32), 0, 1)
    model_labels = rec.labels.cpu().numpy().astype(np.int64)
    dataset_labels = np.asarray(data.dataset_labels, dtype=np.int64)
    wanted = dataset_labels[model_labels]  # the dataset's label of each reconstruction's target class
    normalised = (images - data.mean[None, :, None, None]) / data.std[None, :, None, None]
    logits = judge.logits(normalised)
    top1 = logits.argmax(1) == wanted
    top5 = (np.argsort(-logits, 1)[:, :5] == wanted[:, None]).any(1) if judge.num_classes > 5 else None
    features = judge.features(normalised)
    knn = np.zeros(len(images))
    near_images = np.zeros_like(images)
    private_features = []
    for c in sorted(set(model_labels.tolist())):
        own = np.flatnonzero(data.y_train == c)  # every client's training images of class c: the private data
        f_private = judge.features(data.x_train[own])
        private_features.append(f_private)
        mine = np.flatnonzero(model_labels == c)
        d2, idx = nearest(features[mine], f_private)
        knn[mine] = d2
        near = data.x_train[own[idx]] * data.std[None, :, None, None] + data.mean[None, :, None, None]
        near_images[mine] = np.clip(near, 0, 1)
    near_psnr = [psnr(near_images[i], images[i]) for i in range(len(images))]
    near_ssim = [ssim(near_images[i], images[i]) for i in range(len(images))]
    per_class = {str(int(dataset_labels[c])): float(top1[model_labels == c].mean()) for c in sorted(set(model_labels))}
    entry = {"round": server_round, "client": None, "attack": attack_name, "observed": "model",
             "target_classes": [int(dataset_labels[c]) for c in sorted(set(model_labels.tolist()))],
             "per_class": int(len(images) // max(len(per_class), 1)), "batch_size": int(len(images)),
             "attack_accuracy": float(top1.mean()), "attack_accuracy_top5": None if top5 is None else float(top5.mean()),
             "attack_accuracy_per_class": per_class, "knn_distance": float(knn.mean()),
             "feature_fid": frechet_distance(features, np.concatenate(private_features)),
             "nearest_psnr": float(np.mean(near_psnr)), "nearest_ssim": float(np.mean(near_ssim)),
             "psnr": None, "ssim": None, "label_accuracy": None,
             "iterations": rec.iterations, "evaluations": rec.evaluations, "seconds": seconds}
    if run_dir is not None:
        entry["pictures"] = []
        for c in sorted(set(model_labels.tolist())):
            mine = np.flatnonzero(model_labels == c)
            name = f"inversion_{attack_name}{tag}_class{int(dataset_labels[c])}.png"
            save_grid(images[mine], near_images[mine], run_dir / name,
                      f"{attack_name}{f', round {server_round}' if tag else ''}, class {int(dataset_labels[c])}: "
                      f"attack accuracy {top1[mine].mean():.2f}, "
                      f"nearest PSNR {np.mean([near_psnr[i] for i in mine]):.1f} dB",
                      rows=("reconstruction", "nearest private"))
            entry["pictures"].append(name)
    return entry
