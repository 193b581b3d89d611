import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def compose():
    from fl_sim.runner import compose as _compose

    return _compose


@pytest.fixture(scope="session")
def digits():
    """sklearn's real 8x8 digits as (N, 1, 8, 8) float tensors in [0, 1] and int labels."""
    import torch

    from fl_sim.data import load_digits

    x, y = load_digits()
    return torch.from_numpy(x), torch.from_numpy(y)
