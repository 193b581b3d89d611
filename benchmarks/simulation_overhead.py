"""Simulation overhead: the same federated training through Flower/Ray and as a plain PyTorch loop.

Setting (issue 2): convnet on mnist, 20 clients, 5 rounds, 1 local epoch, FedAvg, central
evaluation each round. Both runs use the same data, partitions, initial model and local training
code (``fl_sim.training.local_train``); the plain loop trains the clients one after another in this
process with all its CPU threads, the simulation on Ray actors (one CPU each by default).

    python benchmarks/simulation_overhead.py [--width 16] [--rounds 5] [--clients 20] [--out FILE]

Cross-device scale (issue 13): ``--model mlp`` trains FedAvg's 2NN on the mnist digits split over
``--clients`` clients (all sampled, 3 local epochs as the default config), ``--experiment cross_device``
FedProx's synthetic devices with logistic regression. Each side (plain loop, simulation) runs in a
process of its own, so that each peak memory is its own: the driver's (ru_maxrss) and the client
actors' (their resident memory, sampled every 0.2 s). ``--clients-per-node K`` sets the cohort size
(default: fl_sim's automatic choice; 1: one node per client, as before cohorts). ``--scale 10,100,1000``
runs the list and writes one row per size. ``--repeat R`` runs each side R times, interleaved (each side first
in turn, and each after the previous side's Ray processes are gone and the CPUs idle), and gives the medians
(the plain loop alone varies 0.44-0.80 s a round between invocations on this machine);
``--compare-dispatch`` adds the simulation with Flower's own dispatch loop (``fl_sim.dispatch`` left out).

    python benchmarks/simulation_overhead.py --model mlp --clients 1000 --rounds 3
    python benchmarks/simulation_overhead.py --experiment cross_device --scale 10,100,1000,10000 --rounds 3

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
    return {"setup_seconds": setup, "rounds": rounds, "wall_seconds": time.perf_counter() - t0,
            "driver_peak_gb": driver_peak_gb()}


class ActorMemory:
    """Peak resident memory of each client actor process (Ray's ``ray::ClientAppActor`` workers), sampled."""

    def __init__(self, every: float = 0.2):
        import threading

        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        import psutil

        while not self._stop.wait(every):
            for p in psutil.process_iter(["name", "cmdline"]):
                try:
                    title = " ".join(p.info["cmdline"] or [])
                    if "ClientAppActor" in title:
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def driver_peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def simulation(cfg, flower_dispatch: bool = False) -> dict:
    from fl_sim import dispatch
    from fl_sim.runner import run

    if flower_dispatch:  # Flower's own engine loop: it looks for the server's messages every 0.1 s
        dispatch.install = lambda: False

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, ActorMemory() as actors:
        s = run(cfg, Path(d) / "run")
    return {"startup_seconds": s["timing"]["startup_seconds"], "simulation": s["simulation"],
            "driver_peak_gb": driver_peak_gb(),
            "actor_peak_gb": max(actors.peak.values(), default=0) / 2**30, "actors": len(actors.peak),
            "rounds": [{"round": r["round"], "seconds": r["seconds"], "test_accuracy": r["test_accuracy"]}
                       for r in s["rounds"]],
            "wall_seconds": time.perf_counter() - t0}


def steady(rounds: list[dict]) -> float:
    """Mean seconds per round after the first (which pays one-off warm-up)."""
    rest = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    return statistics.mean(rest)


def overrides(args, clients: int) -> list[str]:
    """The config of one measurement: the convnet setting of issue 2, or a cross-device one."""
    common = [f"num_clients={clients}", f"num_rounds={args.rounds}", "device=cpu", "report=false", "checkpoint=false",
              f"backend.client_resources.num_cpus={args.num_cpus_per_client}", "attack=none"]
    if args.clients_per_node is not None:
        common.append(f"backend.clients_per_node={args.clients_per_node}")
    if args.experiment:
        return [f"experiment={args.experiment}", "strategy.fraction_train=1.0", *common]
    if args.model == "mlp":
        return ["dataset=mnist", "model=mlp", *common]
    return ["dataset=mnist", "model=convnet", f"model.width={args.width}", "client.local_epochs=1", *common]


def one(args) -> dict:
    """One side (``--one plain|simulation``) in this process: its result as JSON on stdout's last line."""
    from fl_sim.config import compose

    cfg = compose(overrides(args, args.clients))
    out = plain_loop(cfg) if args.one == "plain" else simulation(cfg, args.one == "flower-dispatch")
    out["steady_round_seconds"] = steady(out["rounds"])
    print(json.dumps(out))
    return out


def settle(limit: float = 60.0) -> float:
    """Wait until no Ray process is left from the previous side and the CPUs are idle (both under ``limit``
    seconds), so that one side's shutdown does not slow the next; the seconds waited."""
    import psutil

    t0 = time.perf_counter()
    ray_names = ("raylet", "gcs_server", "ray::", "dashboard", "log_monitor", "default_worker")
    while time.perf_counter() - t0 < limit:
        alive = [p for p in psutil.process_iter(["name", "cmdline"])
                 if any(n in " ".join(p.info["cmdline"] or [p.info["name"] or ""]) for n in ray_names)]
        if not alive and psutil.cpu_percent(interval=1.0) < 20:
            break
        time.sleep(0.5)
    return time.perf_counter() - t0


def side(args, which: str, clients: int) -> dict:
    import subprocess

    settle()

    cmd = [sys.executable, __file__, "--one", which, "--clients", str(clients), "--rounds", str(args.rounds),
           "--width", str(args.width), "--model", args.model, "--num-cpus-per-client", str(args.num_cpus_per_client)]
    if args.experiment:
        cmd += ["--experiment", args.experiment]
    if args.clients_per_node is not None:
        cmd += ["--clients-per-node", str(args.clients_per_node)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{which} with {clients} clients failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def scale(args) -> None:
    """One row per size: plain loop and simulation, each in its own process, side by side."""
    rows = []
    for n in [int(v) for v in args.scale.split(",")]:
        runs = {"plain": [], "simulation": [], "flower-dispatch": []}
        sides = ["plain", "simulation", "flower-dispatch"][: 3 if args.compare_dispatch else 2]
        for i in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every side,
            for which in sides[i % len(sides):] + sides[: i % len(sides)]:  # each side first in turn
                runs[which].append(side(args, which, n))
        steady_of = {k: [r["steady_round_seconds"] for r in v] for k, v in runs.items()}
        med = {k: statistics.median(v) for k, v in steady_of.items() if v}
        plain, sim = runs["plain"][-1], runs["simulation"][-1]
        row = {"clients": n, **sim["simulation"],
               "plain_steady_round_seconds": med["plain"],
               "simulation_steady_round_seconds": med["simulation"],
               "ratio_steady_round": med["simulation"] / med["plain"],
               "invocations": args.repeat,
               "each_steady_round_seconds": {k: v for k, v in steady_of.items() if v},
               "simulation_first_round_seconds": statistics.median(r["rounds"][0]["seconds"] for r in runs["simulation"]),
               "startup_seconds": statistics.median(r["startup_seconds"] for r in runs["simulation"]),
               "driver_peak_gb": max(r["driver_peak_gb"] for r in runs["simulation"]),
               "actor_peak_gb": max(r["actor_peak_gb"] for r in runs["simulation"]), "actors": sim["actors"],
               "plain_driver_peak_gb": max(r["driver_peak_gb"] for r in runs["plain"]),
               "final_test_accuracy": {"plain": plain["rounds"][-1]["test_accuracy"],
                                       "simulation": sim["rounds"][-1]["test_accuracy"]},
               "wall_seconds": {"plain": plain["wall_seconds"], "simulation": sim["wall_seconds"]}}
        if args.compare_dispatch:
            flower = runs["flower-dispatch"][-1]
            row["flower_dispatch"] = {"steady_round_seconds": med["flower-dispatch"],
                                      "ratio_steady_round": med["flower-dispatch"] / med["plain"],
                                      "startup_seconds": flower["startup_seconds"],
                                      "driver_peak_gb": flower["driver_peak_gb"],
                                      "final_test_accuracy": flower["rounds"][-1]["test_accuracy"]}
            print(f"{n:>7} clients, Flower's dispatch loop: {med['flower-dispatch']:7.2f} s/round "
                  f"(ratio {row['flower_dispatch']['ratio_steady_round']:.2f})", flush=True)
        rows.append(row)
        print(f"{n:>7} clients on {row['nodes']:>4} nodes: {row['simulation_steady_round_seconds']:7.2f} s/round "
              f"(plain {row['plain_steady_round_seconds']:.2f}, ratio {row['ratio_steady_round']:.2f}), start-up "
              f"{row['startup_seconds']:.1f} s, driver peak {row['driver_peak_gb']:.2f} GB, actor peak "
              f"{row['actor_peak_gb']:.2f} GB", flush=True)
    from fl_sim.config import compose

    cfg = compose(overrides(args, rows[0]["clients"]))
    setting = {"config_overrides": overrides(args, rows[0]["clients"]),
               "dataset": cfg.dataset.name, "model": cfg.model.name, "hidden": list(cfg.model.hidden),
               "rounds": args.rounds, "local_epochs": cfg.client.local_epochs, "batch_size": cfg.client.batch_size,
               "fraction_train": cfg.strategy.fraction_train, "cpus": os.cpu_count(),
               "client_num_cpus": args.num_cpus_per_client, "python": platform.python_version(),
               "torch": torch.__version__,
               "reference": "plain: the same clients trained one after another in one process with all its threads "
                            "(fl_sim.training.local_train, FedAvg in double precision, central evaluation); "
                            "simulation: fl-sim's run on Flower/Ray, the setting a user gets",
               "steady": "mean seconds per round after the first; with --repeat, the median over invocations "
                         "(each_steady_round_seconds lists them all)"}
    Path(args.out).write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16, help="convnet width (paper: 64)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--num-cpus-per-client", type=float, default=1.0)
    ap.add_argument("--model", default="convnet", choices=["convnet", "mlp"])
    ap.add_argument("--experiment", default=None, help="a preset instead (cross_device: FedProx's synthetic devices)")
    ap.add_argument("--clients-per-node", type=int, default=None)
    ap.add_argument("--scale", default=None, help="comma-separated client counts: one row each")
    ap.add_argument("--one", default=None, choices=["plain", "simulation", "flower-dispatch"], help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1,
                    help="invocations of each side per size, interleaved; the row gives their medians and each one")
    ap.add_argument("--compare-dispatch", action="store_true",
                    help="with --scale: also the simulation with Flower's own dispatch loop (0.1 s polls), a column beside")
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    if args.model == "mlp" or args.experiment or args.scale:
        args.scale = args.scale or str(args.clients)
        scale(args)
        return

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
