"""What a run produces and where it goes: the run directory. ``RunRecorder`` collects the rounds,
attacks and privacy of a run as the server loop reports them and writes ``summary.json`` (and, for a
completed run, ``report.md`` with its pictures); JSON is always written whole (temporary file, then
rename), so a reader never sees half a file."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fl_sim.report import write_report
from fl_sim.validation import MALICIOUS_ATTACKS

log = logging.getLogger("fl_sim")


def loss_exploded(loss: float, num_classes: int, cross_entropy: bool = True) -> bool:
    """A training loss that says the model diverged: non-finite, or above 4·ln(classes) (four times the
    cross-entropy of a uniform guess; diverging runs measured here go from 11 to thousands). With
    ``cross_entropy`` False (the loss adds a defense's term: MID's β·KL in bits, BiDO's dependencies, which
    are not on that scale: MID's first round trains at 7-14 and converges), only a non-finite one."""
    return not math.isfinite(loss) or (cross_entropy and loss > 4 * math.log(max(num_classes, 2)))


def new_run_dir(parent: str | os.PathLike) -> Path:
    path = Path(parent) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=json_default))
    os.replace(tmp, path)


def json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunRecorder:
    """Collects what a run produces and writes the run directory.

    The ServerApp thread calls ``started()`` once clients answered (Ray is up) and ``round(...)``
    after each round; the runner calls ``finish(status)``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.t_sim_start: float | None = None
        self.t_first_round: float | None = None
        self.t_sim_end: float | None = None
        self.rounds: list[dict] = []
        self.attacks: list[dict] = []
        self.skipped_attacks: list[dict] = []
        self.privacy: dict | None = None
        self.simulation: dict = {}  # how the clients map onto simulated nodes (fl_sim.cohorts)
        self.data_info: dict | None = None
        self.model_info: dict | None = None
        self.model_inversion: dict | None = None  # model inversion: attacker, division, target, evaluation classifier
        self.extra_timing: dict[str, float] = {}  # model inversion: prior training, attack, evaluation classifier
        self.network: dict | None = None  # what the run's Ray listens on and whom it lets in (fl_sim.network)
        self.devices: dict[str, set[str]] = {"server": set(), "clients": set(), "attacks": set()}  # where each ran
        self.summary: dict | None = None
        self.warnings: list[str] = []  # what the user should know of a run that still completed
        self._warned_loss: set[int] = set()

    # --- called while running
    def ran_on(self, party: str, *devices: str) -> None:
        """``party`` (server, clients, attacks) computed on ``devices`` ("cpu", "cuda:0")."""
        self.devices[party].update(devices)

    def simulation_starting(self) -> None:
        self.t_sim_start = time.perf_counter()

    def started(self) -> None:
        self.t_first_round = time.perf_counter()
        log.info("clients ready after %.1f s (Ray start-up)", self.t_first_round - (self.t_sim_start or self.t_start))

    def round(self, **entry: Any) -> None:
        self.rounds.append(entry)
        train = f"{entry['train_loss']:.4f}" if entry.get("train_loss") is not None else "n/a"
        fails = f"  failures {entry['failures']}" if entry.get("failures") else ""
        if entry.get("trained") is not None and entry["trained"] != len(entry["clients"]) - entry.get("failures", 0):
            fails += f"  trained {entry['trained']}"
        log.info("round %d/%d  clients %d  train_loss %s  test_loss %.4f  test_accuracy %.4f  (%.1f s)%s",
                 entry["round"], self.cfg.num_rounds, len(entry["clients"]), train, entry["test_loss"],
                 entry["test_accuracy"], entry["seconds"], fails)

    def client_losses(self, rnd: int, losses: dict[int, float], num_classes: int) -> None:
        """One warning line per client, the first time its training loss is non-finite or explodes
        (``loss_exploded``), naming the likely cause; the warnings go into summary.json too."""
        plain = not (self.cfg.defense.mid or self.cfg.defense.bido)  # their terms are not on the CE's scale
        for cid, loss in sorted(losses.items()):
            if cid in self._warned_loss or not loss_exploded(loss, num_classes, plain):
                continue
            self._warned_loss.add(cid)
            lr = self.cfg.client.lr
            text = (f"client {cid}'s training loss is {loss:.4g} in round {rnd} (a model that guesses has "
                    f"{math.log(num_classes):.2f}): training diverges, most likely because client.lr={lr:g} is too "
                    f"large for model={self.cfg.model.name}; lower it (e.g. client.lr={lr / 5:g}) or set model.lr")
            self.warnings.append(text)
            log.warning("%s", text)

    def attack(self, entry: dict) -> None:
        self.attacks.append(entry)
        if entry.get("device"):
            self.ran_on("attacks", str(entry["device"]))
        if entry.get("error"):
            log.info("attack %s round %d client %s failed: %s", entry["attack"], entry["round"], entry["client"],
                     entry["error"])
            return
        if entry.get("observed") == "model":
            top5 = f", top-5 {entry['attack_accuracy_top5']:.2f}" if entry.get("attack_accuracy_top5") is not None else ""
            if entry.get("attacker_client") is not None:  # a participant, round by round (attack.on=client)
                n = int(entry["model_round"])
                who = (f"round {entry['round']}: client {entry['attacker_client']}, a participant, from the global "
                       f"model it received ({n} round{'' if n == 1 else 's'} of training, test accuracy "
                       f"{entry['target_test_accuracy']:.3f}), reconstructed the classes it lacks")
            else:
                who = "on the final model: reconstructed the classes"
            log.info("attack %s %s %s (%d images) at attack accuracy %.2f%s, KNN distance %.1f, feature FID %.1f, "
                     "nearest private image %.1f dB  (%.1f s)", entry["attack"], who, entry["target_classes"],
                     entry["batch_size"], entry["attack_accuracy"], top5, entry["knn_distance"], entry["feature_fid"],
                     entry["nearest_psnr"], entry["seconds"])
            return
        labels = f"  label accuracy {entry['label_accuracy']:.2f}" if entry.get("label_accuracy") is not None else ""
        if entry.get("psnr") is None:  # a label-only attack
            log.info("attack %s round %d client %s (%d examples, observed %s):%s  (%.1f s)", entry["attack"],
                     entry["round"], entry["client"], entry["batch_size"], entry["observed"], labels, entry["seconds"])
            return
        log.info("%s", attack_line(entry, labels))

    def simulation_finished(self) -> None:
        self.t_sim_end = time.perf_counter()

    # --- the run directory
    def timing(self) -> dict:
        now = time.perf_counter()
        sim = (self.t_sim_end or now) - self.t_sim_start if self.t_sim_start else 0.0
        startup = (self.t_first_round - self.t_sim_start) if (self.t_first_round and self.t_sim_start) else None
        return {
            "total_seconds": now - self.t_start,
            "simulation_seconds": sim,
            "startup_seconds": startup,
            "attack_seconds": float(sum(r.get("attack_seconds", 0.0) for r in self.rounds)),  # wall time
            **self.extra_timing,
        }

    def finish(self, status: str, error: str | None = None) -> dict:
        summary: dict[str, Any] = {"status": status}
        if error is not None:
            summary["error"] = error
        summary.update({
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "rounds": self.rounds,
            "attacks": self.attacks,
            "attacks_skipped": self.skipped_attacks,
            "privacy": self.privacy,
            "timing": self.timing(),
            "data": self.data_info,
            "model": self.model_info,
            **({"model_inversion": self.model_inversion} if self.model_inversion is not None else {}),
            "network": self.network,
            "simulation": self.simulation,
            "devices": {party: sorted(d) for party, d in self.devices.items()},
            "warnings": self.warnings,
            "run_dir": str(self.run_dir.resolve()),
            "versions": _versions(),
        })
        self.summary = summary
        write_json_atomic(self.run_dir / "summary.json", summary)
        if status == "completed" and self.cfg.report:
            write_report(self.run_dir, summary)
        return summary


def _versions() -> dict:
    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("fl-sim", "flwr", "ray", "torch", "opacus", "flwr-datasets", "hydra-core", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = cuda_devices()
    return out


def cuda_devices() -> dict | None:
    """The CUDA devices this process sees (name of each, count, CUDA version); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    return {"count": n, "devices": [torch.cuda.get_device_name(i) for i in range(n)], "version": torch.version.cuda}


def attack_line(entry: dict, labels: str = "") -> str:
    """One line: who attacked, what it saw, what it got (mean PSNR over every example it targeted)."""
    who = "the malicious server" if entry["attack"] in MALICIOUS_ATTACKS else "the honest-but-curious server"
    client, n = entry["client"], entry["batch_size"]
    seen = {"client_update": f"client {client}'s model update",
            "aggregate": f"the aggregate of clients {client}",
            "activations": f"client {client}'s activations"}.get(entry.get("observed"), f"client {client}")
    per = entry.get("psnr_per_image") or []
    over = f"all {n}" if len(per) in (0, n) else f"the {len(per)} of {n} it matched"  # fewer images than examples
    good = f", {sum(p >= 20 for p in per)} of them at 20 dB or more" if per else ""
    picture = f" -> {entry['picture']}" if entry.get("picture") else ""
    return (f"attack {entry['attack']} round {entry['round']}: {who}, from {seen} ({n} training examples), "
            f"reconstructed them at mean PSNR {entry['psnr']:.2f} dB over {over}{good}, SSIM {entry['ssim']:.3f}"
            f"{labels}  ({entry['seconds']:.1f} s){picture}")
