"""The client's Flower mods: what acts on the update after local training, in order from the
innermost out: client-side clipping (central DP), pruning, quantisation, noise, local DP (Flower's
``LocalDpMod``), then SecAgg+ masking (``secaggplus_mod``). The defenses themselves live in
``defenses``; this module reads the config per message (``flwr run`` knows it only then) and seeds
every random draw per (seed, round, client)."""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from omegaconf import DictConfig

from defenses.mods import noise_mod, prune_mod, quantize_mod
from fl_sim.cohorts import is_cohort
from fl_sim.sampling import round_seed


def server_round_of(msg: Message) -> int:
    """The round of a train message, in the Message-API or the legacy (SecAgg+) format."""
    for name, record in msg.content.config_records.items():
        if "server-round" in record:
            return int(record["server-round"])
    return 0


def seeded_local_dp_mod(d: DictConfig, seed_fn: Callable[[Message, Context], int]):
    """Flower's ``LocalDpMod`` (clip the update to ``clipping_norm``, add Gaussian noise for a nominal
    (local_epsilon, delta) per release). It draws from NumPy's global generator: seeded per round and
    client here, so that runs reproduce."""
    inner = LocalDpMod(float(d.clipping_norm), float(d.local_sensitivity or d.clipping_norm),
                       float(d.local_epsilon), float(d.delta))

    def mod(msg: Message, context: Context, call_next) -> Message:
        replies: list[Message] = []

        def keep(m: Message, c: Context) -> Message:
            replies.append(call_next(m, c))
            return replies[-1]

        np.random.seed(seed_fn(msg, context) % 2**32)
        out = inner(msg, context, keep)
        # A client out of budget sends no model; LocalDpMod would turn that into a malformed error
        # reply that Flower drops (the server then waits for round_timeout): pass it on unchanged.
        if replies and not replies[-1].has_error() and not replies[-1].content.array_records:
            return replies[-1]
        return out

    return mod


def secagg_mod(get_cfg: Callable[[Context], DictConfig]):
    """Flower's ``secaggplus_mod`` when ``defense=secagg`` (outermost: it masks the final update)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        cfg = get_cfg(context)
        if not cfg.defense.secagg:
            return call_next(msg, context)
        # SecAgg+ quantises with stochastic rounding from NumPy's global generator: seeded per round and
        # client so that runs reproduce (the masks cancel exactly; the rounding would not)
        np.random.seed(round_seed(cfg.seed + 4, server_round_of(msg), int(context.node_config["partition-id"])) % 2**32)
        return secaggplus_mod(msg, context, call_next)

    return mod


def update_defenses_mod(get_cfg: Callable[[Context], DictConfig]):
    """One Flower mod applying the configured update defenses (``defenses.mods``) in order:
    prune, then quantize, then noise — the config is read per message (``flwr run`` knows it only then)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if is_cohort(msg):  # each of its clients' updates passes through the defenses on its own (fl_sim.cohorts)
            return call_next(msg, context)
        cfg = get_cfg(context)
        d, seed, chain = cfg.defense, cfg.seed, call_next
        wanted = []
        if d.local_dp:  # outermost: clips and noises the final update (Flower's LocalDpMod)
            wanted.append(seeded_local_dp_mod(d, lambda m, c: round_seed(
                seed + 3, server_round_of(m), int(c.node_config["partition-id"]))))
        if d.noise:
            wanted.append(noise_mod(float(d.noise_std), lambda m, c: round_seed(
                seed + 1, server_round_of(m), int(c.node_config["partition-id"]))))
        if d.quantize:
            wanted.append(quantize_mod(int(d.quantize_bits)))
        if d.prune:
            wanted.append(prune_mod(float(d.prune_ratio)))
        if d.central_dp and d.central_side == "client":  # innermost: clip the update as trained
            wanted.append(fixedclipping_mod if d.central_clipping == "fixed" else adaptiveclipping_mod)
        for m in reversed(wanted):  # innermost first: prune acts right after training
            chain = functools.partial(m, call_next=chain)
        return chain(msg, context)

    return mod
