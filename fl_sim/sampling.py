"""Seeded draws that make a run reproducible: which clients train in a round, and the seed of a
client's own randomness in a round. Each depends only on the run's seed, the round and the client,
so a run, a resumed run and a run on another Ray cluster draw the same."""

from __future__ import annotations

import numpy as np


def num_sampled(num_clients: int, fraction: float, minimum: int) -> int:
    """Flower's rule: int(n * fraction) clients a round, at least ``minimum``, at most n."""
    return min(num_clients, max(int(num_clients * fraction), minimum))


def sample_clients(rng: np.random.Generator, num_clients: int, fraction: float, minimum: int) -> list[int]:
    """``num_sampled`` clients drawn from a seeded generator; sorted."""
    k = num_sampled(num_clients, fraction, minimum)
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def round_seed(seed: int, server_round: int, cid: int) -> int:
    """Seed of a client's local shuffling in a round: depends only on (seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, cid]).generate_state(1)[0])
