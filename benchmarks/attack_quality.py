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

Those are the *reference* setting (BatchNorm in eval mode, one FedSGD gradient). A simulated client
trains in train mode and sends its model after its local steps, so the *live* settings observe that:

- ig_b1_train: the update of fl_sim's own local training (``fl_sim.training.local_train``, BatchNorm in
  train mode, ``--local-steps`` steps at ConvNet's default learning rate), attacked with the replay in
  train mode, as a run's inverting_gradients does (``attack.bn_mode=train``).
- ig_b1_train_bnprior: the same with GradInversion's BatchNorm prior (``--bn-prior``), its targets solved
  from the running statistics the update carries (exact for one local step).

``--live-run`` also runs fl-sim itself (cifar10_samples, 10 clients of one image, ConvNet, batch 1,
``--local-steps`` local epochs, inverting_gradients on client 0 for ``--live-iterations``) and reports its
seconds per iteration beside ig_b1_train's, measured in this process: ``live_vs_benchmark``.

``cost_multiple`` = seconds per objective evaluation / seconds of one plain training step (forward,
backward, SGD step, train mode) of the same model on the same batch, measured in this process.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from attacks.base import Knowledge, Observation
from attacks.dlg import DLG
from attacks.inverting_gradients import InvertingGradients
from fl_sim.config import compose
from fl_sim.loaders import load_foolbox_samples
from fl_sim.metrics import score
from fl_sim.models import build_model
from fl_sim.training import local_train

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


def observe_update(model, x01, y, mean, std, lr: float, steps: int) -> Observation:
    """The live observation: the model a client returns after ``steps`` local steps of fl_sim's own
    training (train mode, plain SGD at ``lr``), running statistics included."""
    client = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in client.state_dict().items()}
    local_train(client, (x01 - mean) / std, y, epochs=steps, batch_size=len(y), lr=lr,
                generator=torch.Generator().manual_seed(0))
    return Observation(before, {k: v.detach().clone() for k, v in client.state_dict().items()})


def run_setting(name, attack, model, images, labels, batch, groups, mean, std, device: str = "cpu",
                live: tuple[float, int] | None = None) -> dict:
    """``live``: (lr, local steps) of a client's real update to observe instead of the FedSGD gradient."""
    psnrs, ssims, label_hits, evals, secs, iters = [], [], [], 0, 0.0, 0
    step_times = []
    for g in groups:
        x01 = torch.from_numpy(images[g]).to(device)
        y = torch.from_numpy(labels[g]).to(device)
        if live is None:
            obs = observe(model, x01, y, mean, std)
            know = Knowledge(model, tuple(x01.shape[1:]), 10, lr=1.0, batch_size=batch, num_examples=batch,
                             mean=CIFAR10_MEAN, std=CIFAR10_STD, device=device)
        else:
            obs = observe_update(model, x01, y, mean, std, *live)
            know = Knowledge(model, tuple(x01.shape[1:]), 10, lr=live[0], local_epochs=live[1], batch_size=batch,
                             num_examples=batch, mean=CIFAR10_MEAN, std=CIFAR10_STD, device=device)
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


def live_run(args) -> dict:
    """fl-sim itself, the live setting ig_b1_train measures in this process: its attack's seconds per
    iteration (the attack's own clock: reconstruction only, not the run) and threads."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fl_sim", "dataset=cifar10_samples", "model=convnet", "num_clients=10",
               "num_rounds=1", "client.batch_size=1", f"client.local_epochs={args.local_steps}",
               "attack=inverting_gradients", f"attack.iterations={args.live_iterations}", "attack.target_clients=[0]",
               "report=false", "checkpoint=false", f"hydra.run.dir={tmp}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"live run failed: {done.stderr[-2000:]}")
        entry = json.loads((Path(tmp) / "summary.json").read_text())["attacks"][0]
    print(f"  live run: client 0, {entry['iterations']} iterations in {entry['seconds']:.1f} s, "
          f"PSNR {entry['psnr']:.2f} dB, {entry.get('threads')} threads", flush=True)
    return {"command": " ".join(["fl-sim"] + cmd[3:-1]), "iterations": entry["iterations"],
            "seconds": entry["seconds"], "seconds_per_iteration": entry["seconds"] / max(entry["evaluations"], 1),
            "threads": entry.get("threads"), "psnr": entry["psnr"], "ssim": entry["ssim"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--settings", default="ig_b1,ig_b4,ig_b8,dlg_b1")
    ap.add_argument("--dlg-images", type=int, default=None, help="DLG on the first K images only (default: all)")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--dlg-evaluations", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where the model, its gradient and the attack compute")
    ap.add_argument("--local-steps", type=int, default=1, help="live settings: the client's local steps")
    ap.add_argument("--bn-prior", type=float, default=0.01, help="ig_b1_train_bnprior: the prior's weight")
    ap.add_argument("--live-run", action="store_true", help="also time fl-sim's own attack (live_vs_benchmark)")
    ap.add_argument("--live-iterations", type=int, default=100)
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
    live_lr = float(compose(["model=convnet"]).client.lr)  # what a run's ConvNet clients train with
    results["setting"]["live"] = {"lr": live_lr, "local_steps": args.local_steps, "bn_prior": args.bn_prior,
                                  "batchnorm": "train mode (the client's and the replay's)"}
    results["setting"]["reference"] = {"batchnorm": "eval mode", "observation": "one FedSGD gradient"}
    for name in args.settings.split(","):
        live = None
        if name in ("ig_b1_train", "ig_b1_train_bnprior"):
            groups = [[i] for i in range(n)]
            live = (live_lr, args.local_steps)
            attack = InvertingGradients(iterations=args.iterations, restarts=1, train_mode=True,
                                        bn_prior=args.bn_prior if name.endswith("bnprior") else 0.0)
        elif name == "ig_b1":
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
        results[name] = run_setting(name, attack, model, images, labels, batch, groups, mean, std, args.device,
                                    live=live)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.live_run:
        results["live_run"] = live_run(args)
        bench = results.get("ig_b1_train")
        if bench:
            ratio = results["live_run"]["seconds_per_iteration"] / bench["seconds_per_evaluation"]
            results["live_vs_benchmark"] = {
                "ratio": ratio, "live_seconds_per_iteration": results["live_run"]["seconds_per_iteration"],
                "benchmark_seconds_per_iteration": bench["seconds_per_evaluation"],
                "same": "ConvNet-64, batch 1, train-mode BatchNorm, "
                        f"{args.local_steps} local step(s) replayed, lr {live_lr:g}, CIFAR-10 sample images"}
            print(f"live run: {ratio:.2f}x the benchmark's seconds per iteration "
                  f"({results['live_run']['threads']} threads in the run, {torch.get_num_threads()} here)")
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
