"""Our own logic around Flower: local training, FedProx term, seeded sampling, strategy mapping."""

import numpy as np
import pytest
import torch
from flwr.serverapp import strategy as fs

from fl_sim.sampling import round_seed, sample_clients
from fl_sim.training import evaluate, local_train
from strategies import STRATEGIES, make_strategy


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return x, y


def test_local_training_lowers_the_loss():
    x, y = _toy()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    before, _ = evaluate(m, x, y)
    loss, steps = local_train(m, x, y, epochs=5, batch_size=16, lr=0.5, generator=torch.Generator().manual_seed(0))
    after, acc = evaluate(m, x, y)
    assert steps == 20 and after < before * 0.7 and acc > 0.8


def test_fedprox_term_keeps_weights_closer_to_the_start():
    x, y = _toy()
    dist = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        start = [p.detach().clone() for p in m.parameters()]
        local_train(m, x, y, epochs=5, batch_size=16, lr=0.1, proximal_mu=mu,
                    generator=torch.Generator().manual_seed(0))
        dist[mu] = sum(((p - s) ** 2).sum().item() for p, s in zip(m.parameters(), start))
    assert dist[10.0] < 0.5 * dist[0.0]


def test_client_sampling_is_seeded_sorted_and_follows_flower_rule():
    a = sample_clients(np.random.default_rng(1), 10, 0.35, 1)
    b = sample_clients(np.random.default_rng(1), 10, 0.35, 1)
    assert a == b == sorted(a) and len(a) == 3
    assert len(sample_clients(np.random.default_rng(1), 10, 0.05, 2)) == 2  # at least the minimum
    assert round_seed(0, 1, 2) == round_seed(0, 1, 2) != round_seed(0, 2, 2)


@pytest.mark.parametrize("name,cls", [("fedavg", fs.FedAvg), ("fedprox", fs.FedProx), ("fedadam", fs.FedAdam),
                                      ("fedyogi", fs.FedYogi), ("fedavgm", fs.FedAvgM),
                                      ("fedmedian", fs.FedMedian), ("fedtrimmedavg", fs.FedTrimmedAvg),
                                      ("krum", fs.Krum)])
def test_each_strategy_name_is_flowers_own_class(name, cls):
    s = make_strategy(name)
    assert type(s) is cls and s.fraction_train == 1.0 and s.fraction_evaluate == 0.0
    assert name in STRATEGIES
