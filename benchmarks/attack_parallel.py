"""Parallel attacks: K targeted clients attacked as Ray tasks vs one after the other.

The same K inverting-gradients jobs (FedSGD, one CIFAR-10 image each, convnet width 16) run
(a) sequentially in this process, each with ``--threads`` threads, and (b) through fl_sim's Ray
executor with ``--workers`` attack workers of ``--threads`` threads each (the executor the simulation
uses, with its ``fl_sim_attack`` resource). Ideal: (b) takes K / workers times one attack.

    python benchmarks/attack_parallel.py [--clients 4] [--workers 2] [--threads 1] [--iterations 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import fl_sim._quiet  # noqa: F401
import torch

from attacks import Knowledge, Observation
from attacks.inverting_gradients import InvertingGradients
from fl_sim.attacking import ATTACK_RESOURCE, ray_executor
from fl_sim.loaders import load_foolbox_samples
from fl_sim.models import build_model
from strategies.adversarial import AttackJob


def jobs(k: int) -> list[AttackJob]:
    images, labels = load_foolbox_samples("cifar10_samples")
    torch.manual_seed(0)
    model = build_model("convnet", (3, 32, 32), 10, width=16).eval()
    out = []
    for i in range(k):
        x, y = torch.from_numpy(images[i:i + 1]), torch.from_numpy(labels[i:i + 1])
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        out.append(AttackJob(1, i, "client_update", Observation.from_gradients(model, g),
                             Knowledge(model, (3, 32, 32), 10)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    attack = InvertingGradients(iterations=args.iterations, train_mode=False)
    work = jobs(args.clients)

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    singles = []
    for job in work:
        t1 = time.perf_counter()
        attack.reconstruct(job.observation, job.knowledge)
        singles.append(time.perf_counter() - t1)
    sequential = time.perf_counter() - t

    import ray

    ray.init(num_cpus=os.cpu_count(), resources={ATTACK_RESOURCE: args.workers}, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    execute = ray_executor(args.workers, args.threads)
    t = time.perf_counter()
    outcomes = execute(attack, work)
    parallel = time.perf_counter() - t
    ray.shutdown()
    assert all(o.reconstruction is not None for o in outcomes), [o.error for o in outcomes]

    one = sum(singles) / len(singles)
    result = {"clients": args.clients, "workers": args.workers, "threads_per_attack": args.threads,
              "iterations": args.iterations, "cpus": os.cpu_count(), "one_attack_seconds": one,
              "sequential_seconds": sequential, "parallel_seconds": parallel,
              "speedup": sequential / parallel, "parallel_in_units_of_one_attack": parallel / one,
              "ideal_in_units_of_one_attack": args.clients / args.workers}
    print(f"{args.clients} attacks, {args.workers} workers x {args.threads} thread(s), {os.cpu_count()} CPUs")
    print(f"one attack            {one:8.1f} s")
    print(f"sequential            {sequential:8.1f} s")
    print(f"parallel (Ray tasks)  {parallel:8.1f} s  = {parallel / one:.2f} x one attack "
          f"(ideal {args.clients / args.workers:.2f}); speed-up {sequential / parallel:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
