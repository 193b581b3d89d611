"""Attacks on what a federated or split-learning server observes (pure PyTorch; no Flower, no fl_sim)."""
