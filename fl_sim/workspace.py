"""The per-process workspace: each process (the driver, every Ray client actor) loads the data and
builds the model once per config and reuses them for every message, so that a client call costs
its training, not a reload. Also the seeded initial global model every party starts from."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from defenses.dpsgd import make_dp_compatible
from defenses.inversion import add_bottleneck
from fl_sim.data import FederatedData, build_federated_data
from fl_sim.malicious import wrap_model
from fl_sim.models import build_model
from fl_sim.training import resolve_device
from fl_sim.validation import MODEL_ATTACKS


@dataclass
class Workspace:
    """A process's data and a scratch model (weights are always loaded before use)."""

    data: FederatedData
    model: torch.nn.Module
    device: torch.device
    tensors: dict  # cid -> (x, y) on device, built on first use

    def client_tensors(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cid not in self.tensors:
            x, y = self.data.client(cid)
            self.tensors[cid] = (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
        return self.tensors[cid]

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "test" not in self.tensors:
            self.tensors["test"] = (torch.from_numpy(self.data.x_test).to(self.device),
                                    torch.from_numpy(self.data.y_test).to(self.device))
        return self.tensors["test"]


_WORKSPACES: dict[tuple[str, str], Workspace] = {}
_KEYS: dict[int, tuple[DictConfig, str]] = {}  # id(cfg) -> (cfg, its key), for read-only configs


def _data_key(cfg: DictConfig) -> str:
    """The parts of the config that shape data and model, as a key. A read-only config (the client app's:
    every client asks once per message) has its key remembered; it cannot change afterwards."""
    readonly = bool(OmegaConf.is_readonly(cfg))
    known = _KEYS.get(id(cfg)) if readonly else None
    if known is not None and known[0] is cfg:
        return known[1]
    keys = ("dataset", "partition", "num_clients", "seed", "model", "attack", "defense", "device")  # shapes data/model
    key = json.dumps({k: OmegaConf.to_container(cfg[k]) if isinstance(cfg[k], DictConfig) else cfg[k]
                      for k in keys}, sort_keys=True)
    if readonly:
        if len(_KEYS) > 64:
            _KEYS.clear()
        _KEYS[id(cfg)] = (cfg, key)
    return key


def private_classes(cfg: DictConfig) -> list[int] | None:
    """Model inversion's disjoint-classes protocol: the classes the clients hold (``[]``: the lower half of
    the dataset's; the rest is the attacker's public data). None when the run divides no classes."""
    a = cfg.attack
    if a.name in MODEL_ATTACKS and a.auxiliary == "disjoint_classes":
        return [int(c) for c in a.private_classes]
    return None


def architecture(cfg: DictConfig, data: FederatedData) -> torch.nn.Module:
    """The configured model, shaped by the dataset (fresh weights from torch's global generator)."""
    return build_model(cfg.model.name, data.input_shape, data.num_classes, width=cfg.model.width,
                       hidden=tuple(cfg.model.hidden), activation=cfg.model.activation)


def initial_model(cfg: DictConfig, data: FederatedData) -> torch.nn.Module:
    """The seeded initial global model (same seed -> same weights), on the CPU; with attack=imprint,
    the malicious server's version (an imprint block in front)."""
    torch.manual_seed(cfg.seed)
    model = architecture(cfg, data)
    if cfg.defense.dpsgd:  # every party uses the architecture Opacus can train (BatchNorm -> GroupNorm)
        model, _ = make_dp_compatible(model)
    if cfg.defense.mid:  # every party (the attacker too) holds the model with MID's bottleneck
        add_bottleneck(model, int(cfg.defense.mid_dim), sample_at_eval=str(cfg.defense.mid_eval) == "sample")
    return wrap_model(cfg, model, data)


def workspace(cfg: DictConfig, role: str) -> Workspace:
    """Data and model for this process, built once per config. ``role``: "client" or "server"."""
    key = (_data_key(cfg), role)
    if key not in _WORKSPACES:
        if role == "client":
            cpus = max(1, int(cfg.backend.client_resources.num_cpus))
            torch.set_num_threads(cpus)
            device = resolve_device(cfg.device, gpu_assigned=cfg.backend.client_resources.num_gpus > 0)
        else:
            device = resolve_device(cfg.device)
        data = build_federated_data(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed,
                                    float(cfg.attack.auxiliary_fraction), private_classes(cfg))
        model = initial_model(cfg, data).to(device)
        _WORKSPACES[key] = Workspace(data, model, device, {})
    return _WORKSPACES[key]
