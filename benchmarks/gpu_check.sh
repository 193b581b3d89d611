#!/usr/bin/env bash
# The GPU check (issue 17), for a machine with a CUDA GPU; about 5 minutes. From the repository root, in
# the project's environment (torch with CUDA, `pip install -e '.[test]'`):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. a federated run with device=cuda, clients on a quarter GPU each and attacks on half a GPU each, as
#    Ray tasks: every client and every attack must report a CUDA device (summary.json `devices`, each
#    attack entry's `device` and `gpu_ids`). The client actors keep their share for the whole run: fl-sim
#    gives the local Ray only as many as leave the attack tasks' shares free (here one actor);
# 2. the same device rule for DP-SGD (Opacus, its noise drawn on the GPU), split learning (the cut's
#    tensors), SecAgg+, and a model inversion (GMI: its GAN prior and latent search in the server process);
# 3. inverting gradients on 2 real CIFAR-10 images, on the GPU and on the CPU side by side
#    (benchmarks/attack_quality.py): seconds per iteration and PSNR of both.
# Writes OUT_DIR/gpu_check.json; exits non-zero at the first check that fails.
set -euo pipefail
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"

TINY="dataset=digits model=mlp num_clients=4 num_rounds=2 report=false device=cuda"
GPU="backend.client_resources.num_gpus=0.25"
fl-sim $TINY $GPU attack=inverting_gradients attack.iterations=100 attack.target_clients=[0,1] \
    attack.workers=2 attack.num_gpus=0.5 hydra.run.dir="$OUT/attacks"
fl-sim $TINY $GPU attack=none defense=dpsgd hydra.run.dir="$OUT/dpsgd"
fl-sim $TINY $GPU attack=none scenario=split hydra.run.dir="$OUT/split"
fl-sim $TINY $GPU attack=none defense=secagg hydra.run.dir="$OUT/secagg"
fl-sim $TINY $GPU attack=gmi attack.gan_steps=50 attack.iterations=50 hydra.run.dir="$OUT/gmi"

python benchmarks/attack_quality.py --images 2 --settings ig_b1 --iterations 300 --device cuda --out "$OUT/ig_cuda.json"
python benchmarks/attack_quality.py --images 2 --settings ig_b1 --iterations 300 --device cpu --out "$OUT/ig_cpu.json"

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = {}
for run in ("attacks", "dpsgd", "split", "secagg", "gmi"):
    s = json.loads((out / run / "summary.json").read_text())
    assert s["status"] == "completed", (run, s.get("error"))
    d = s["devices"]
    cuda = lambda names: bool(names) and all(n.startswith("cuda") for n in names)
    assert cuda(d["server"]) or (run == "split" and d["server"] == ["cpu"]), (run, d)  # split: server part on CPU
    if run != "gmi":  # clients train on the GPU Ray gave them
        assert cuda(d["clients"]), (run, d)
    if run in ("attacks", "gmi"):
        assert cuda(d["attacks"]) and all(a["device"].startswith("cuda") for a in s["attacks"]), (run, d)
    if run == "attacks":
        assert all(a.get("gpu_ids") for a in s["attacks"]), s["attacks"]
    report[run] = {"devices": d, "cuda": s["versions"]["cuda"], "seconds": s["timing"]["total_seconds"]}
gpu, cpu = (json.loads((out / f"ig_{k}.json").read_text())["ig_b1"] for k in ("cuda", "cpu"))
report["inverting_gradients"] = {
    "setting": "benchmarks/attack_quality.py ig_b1, 2 CIFAR-10 images, 300 iterations, eval mode (reference)",
    "seconds_per_iteration": {"cuda": gpu["seconds_per_evaluation"], "cpu": cpu["seconds_per_evaluation"]},
    "speedup": cpu["seconds_per_evaluation"] / gpu["seconds_per_evaluation"],
    "psnr": {"cuda": gpu["psnr"], "cpu": cpu["psnr"]}}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report["inverting_gradients"], indent=1))
print("gpu check passed:", out / "gpu_check.json")
EOF
