"""Simulation overhead: the same federated training through Flower/Ray and as a plain PyTorch loop.

Setting (issue 2): convnet on mnist, 20 clients, 5 rounds, 1 local epoch, FedAvg, central
evaluation each round. Both runs use the same data, partitions, initial model and local training
code (``fl_sim.training.local_train``); the plain loop trains the clients one after another in this
process with all its CPU threads, the simulation on Ray actors (one CPU each by default).

    python benchmarks/simulation_overhead.py [--width 16] [--rounds 5] [--clients 20] [--out FILE]

Prints a table and writes JSON (default: benchmarks/simulation_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fl_sim._quiet  # noqa: F401
import torch


def plain_loop(cfg) -> dict:
    """Sequential FedAvg in this process: the reference."""
    from fl_sim.sampling import round_seed, sample_clients
    from fl_sim.workspace import initial_model
    from fl_sim.data import build_federated_data
    from fl_sim.training import evaluate, local_train
    import numpy as np

    t0 = time.perf_counter()
    data = build_federated_data(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed)
    global_model = initial_model(cfg, data)
    work = initial_model(cfg, data)
    xs = {c: tuple(map(torch.from_numpy, data.client(c))) for c in range(cfg.num_clients)}
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    setup = time.perf_counter() - t0
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1]))
    rounds = []
    for rnd in range(1, cfg.num_rounds + 1):
        t = time.perf_counter()
        sampled = sample_clients(rng, cfg.num_clients, cfg.strategy.fraction_train, cfg.strategy.min_train_clients)
        states, weights = [], []
        for c in sampled:
            work.load_state_dict(global_model.state_dict())
            x, y = xs[c]
            local_train(work, x, y, epochs=cfg.client.local_epochs, batch_size=cfg.client.batch_size,
                        lr=cfg.client.lr, generator=torch.Generator().manual_seed(round_seed(cfg.seed, rnd, c)))
            states.append({k: v.detach().clone() for k, v in work.state_dict().items()})
            weights.append(len(x))
        total = sum(weights)
        avg = {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
               for k in states[0]}
        global_model.load_state_dict(avg)
        _, acc = evaluate(global_model, xt, yt, cfg.eval_batch_size)
        rounds.append({"round": rnd, "seconds": time.perf_counter() - t, "test_accuracy": acc})
    return {"setup_seconds": setup, "rounds": rounds, "wall_seconds": time.perf_counter() - t0}


def simulation(cfg) -> dict:
    from fl_sim.runner import run

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        s = run(cfg, Path(d) / "run")
    return {"startup_seconds": s["timing"]["startup_seconds"],
            "rounds": [{"round": r["round"], "seconds": r["seconds"], "test_accuracy": r["test_accuracy"]}
                       for r in s["rounds"]],
            "wall_seconds": time.perf_counter() - t0}


def steady(rounds: list[dict]) -> float:
    """Mean seconds per round after the first (which pays one-off warm-up)."""
    rest = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    return statistics.mean(rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16, help="convnet width (paper: 64)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--num-cpus-per-client", type=float, default=1.0)
    args = ap.parse_args()

    from fl_sim.config import compose

    cfg = compose(["dataset=mnist", "model=convnet", f"model.width={args.width}", f"num_clients={args.clients}",
                   f"num_rounds={args.rounds}", "client.local_epochs=1", "device=cpu", "report=false",
                   f"backend.client_resources.num_cpus={args.num_cpus_per_client}"])
    print(f"convnet(width {args.width}) on mnist, {args.clients} clients, {args.rounds} rounds, 1 local epoch; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", flush=True)
    plain = plain_loop(cfg)
    print(f"plain loop done in {plain['wall_seconds']:.1f} s", flush=True)
    sim = simulation(cfg)
    print(f"simulation done in {sim['wall_seconds']:.1f} s", flush=True)

    result = {
        "setting": {"model": "convnet", "width": args.width, "dataset": "mnist", "clients": args.clients,
                    "rounds": args.rounds, "local_epochs": 1, "batch_size": cfg.client.batch_size,
                    "client_num_cpus": args.num_cpus_per_client, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "plain": {**plain, "steady_round_seconds": steady(plain["rounds"])},
        "simulation": {**sim, "steady_round_seconds": steady(sim["rounds"])},
    }
    result["ratio_steady_round"] = result["simulation"]["steady_round_seconds"] / result["plain"]["steady_round_seconds"]
    result["ratio_wall"] = sim["wall_seconds"] / plain["wall_seconds"]
    result["targets"] = {"ratio_steady_round_max": 1.3, "startup_seconds_max": 10.0,
                         "ratio_met": result["ratio_steady_round"] <= 1.3,
                         "startup_met": (sim["startup_seconds"] or 1e9) < 10.0}

    print(f"\n{'':24}{'plain loop':>12}{'simulation':>12}")
    print(f"{'wall seconds':24}{plain['wall_seconds']:>12.1f}{sim['wall_seconds']:>12.1f}")
    print(f"{'start-up seconds':24}{plain['setup_seconds']:>12.1f}{sim['startup_seconds']:>12.1f}")
    print(f"{'first round seconds':24}{plain['rounds'][0]['seconds']:>12.2f}{sim['rounds'][0]['seconds']:>12.2f}")
    print(f"{'steady s/round':24}{result['plain']['steady_round_seconds']:>12.2f}"
          f"{result['simulation']['steady_round_seconds']:>12.2f}")
    print(f"{'final test accuracy':24}{plain['rounds'][-1]['test_accuracy']:>12.4f}"
          f"{sim['rounds'][-1]['test_accuracy']:>12.4f}")
    print(f"steady-state ratio simulation/plain: {result['ratio_steady_round']:.2f} (target <= 1.3)")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
