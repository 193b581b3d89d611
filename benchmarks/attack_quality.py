"""Gradient-inversion quality and cost on real CIFAR-10 images, in breaching's reference setting.

Setting (issue 3): the real CIFAR-10 test images shipped with foolbox (image i = i-th file by name),
Geiping et al.'s ConvNet at width 64 (2.9 M parameters), random initialisation with a fixed seed,
one gradient (FedSGD) computed in eval mode, CIFAR-10 mean/std normalisation, PSNR/SSIM on [0, 1]
images (fl_sim.metrics: Hungarian matching, scikit-image).

    python benchmarks/attack_quality.py [--images N] [--settings ig_b1,ig_b4,ig_b8,dlg_b1]
                                        [--dlg-images K] [--iterations 1000] [--device cuda] --out FILE

- ig_b1: inverting_gradients on each image alone, labels by iDLG.
- ig_b4 / ig_b8: consecutive groups of 4 / 8 images as one batch, batch label recovery.
- dlg_b1: DLG (L-BFGS, labels optimised jointly), at most 3,000 objective evaluations.

``cost_multiple`` = seconds per objective evaluation / seconds of one plain training step (forward,
backward, SGD step, train mode) of the same model on the same batch, measured in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from attacks.base import Knowledge, Observation
from attacks.dlg import DLG
from attacks.inverting_gradients import InvertingGradients
from fl_sim.loaders import load_foolbox_samples
from fl_sim.metrics import score
from fl_sim.models import build_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def training_step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 10) -> float:
    m = __import__("copy").deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def observe(model, x01, y, mean, std) -> Observation:
    """The FedSGD observation: the gradient of the true batch, eval mode, mean-reduced cross-entropy."""
    model.eval()
    loss = torch.nn.functional.cross_entropy(model((x01 - mean) / std), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return Observation.from_gradients(model, grads)


def run_setting(name, attack, model, images, labels, batch, groups, mean, std, device: str = "cpu") -> dict:
    psnrs, ssims, label_hits, evals, secs, iters = [], [], [], 0, 0.0, 0
    step_times = []
    for g in groups:
        x01 = torch.from_numpy(images[g]).to(device)
        y = torch.from_numpy(labels[g]).to(device)
        obs = observe(model, x01, y, mean, std)
        know = Knowledge(model, tuple(x01.shape[1:]), 10, lr=1.0, batch_size=batch, num_examples=batch,
                         mean=CIFAR10_MEAN, std=CIFAR10_STD, device=device)
        t = time.perf_counter()
        rec = attack.reconstruct(obs, know)
        if device != "cpu":
            torch.cuda.synchronize()  # the GPU's work is done before the clock stops
        secs += time.perf_counter() - t
        evals += rec.evaluations
        iters = rec.iterations
        s = score(x01.cpu().numpy(), rec.inputs.detach().cpu().numpy(), y.cpu().numpy(), rec.labels.cpu().numpy())
        psnrs += s["psnr"]
        ssims += s["ssim"]
        label_hits.append(s["label_accuracy"])
        step_times.append(training_step_seconds(model, (x01 - mean) / std, y))
        print(f"  {name} images {list(g)}: PSNR {[round(p, 2) for p in s['psnr']]}  "
              f"SSIM {[round(v, 3) for v in s['ssim']]}  labels {rec.labels.tolist()} (true {y.tolist()})  "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    spe = secs / max(evals, 1)
    step = statistics.median(step_times)
    return {"psnr": psnrs, "ssim": ssims, "label_accuracy": float(np.mean(label_hits)), "iterations": iters,
            "evaluations": evals, "seconds_per_evaluation": spe, "training_step_seconds": step,
            "cost_multiple": spe / step, "images": [int(i) for g in groups for i in g]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--settings", default="ig_b1,ig_b4,ig_b8,dlg_b1")
    ap.add_argument("--dlg-images", type=int, default=None, help="DLG on the first K images only (default: all)")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--dlg-evaluations", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where the model, its gradient and the attack compute")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()

    images, labels = load_foolbox_samples("cifar10_samples")
    images, labels = images[: args.images], labels[: args.images]
    torch.manual_seed(args.seed)
    model = build_model("convnet", (3, 32, 32), 10, width=64).to(args.device)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1).to(args.device)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1).to(args.device)
    n = len(images)
    print(f"convnet width 64, {sum(p.numel() for p in model.parameters()):,} parameters; {n} images; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    results: dict = {"setting": {"images": n, "model": "convnet", "width": 64, "seed": args.seed,
                                 "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "device": args.device,
                                 "cuda_device": torch.cuda.get_device_name(args.device) if args.device != "cpu" else None}}
    for name in args.settings.split(","):
        if name == "ig_b1":
            groups = [[i] for i in range(n)]
            attack = InvertingGradients(iterations=args.iterations, restarts=1, train_mode=False)
        elif name in ("ig_b4", "ig_b8"):
            b = int(name[-1])
            groups = [list(range(i, i + b)) for i in range(0, n - b + 1, b)]
            attack = InvertingGradients(iterations=args.iterations, restarts=1, train_mode=False)
        elif name == "dlg_b1":
            k = args.dlg_images or n
            groups = [[i] for i in range(min(k, n))]
            attack = DLG(max_evaluations=args.dlg_evaluations, train_mode=False)
        else:
            raise SystemExit(f"unknown setting {name}")
        if not groups:
            print(f"{name}: needs more images", flush=True)
            continue
        batch = len(groups[0])
        results[name] = run_setting(name, attack, model, images, labels, batch, groups, mean, std, args.device)
        Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n{'setting':8} {'images':>8} {'PSNR med':>9} {'PSNR mean':>9} {'SSIM mean':>9} {'labels':>7} "
          f"{'evals':>7} {'s/eval':>7} {'cost x':>7}")
    for name in args.settings.split(","):
        r = results.get(name)
        if r:
            print(f"{name:8} {len(r['psnr']):>8} {statistics.median(r['psnr']):>9.2f} {np.mean(r['psnr']):>9.2f} "
                  f"{np.mean(r['ssim']):>9.3f} {r['label_accuracy']:>7.2f} {r['evaluations']:>7} "
                  f"{r['seconds_per_evaluation']:>7.3f} {r['cost_multiple']:>7.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
