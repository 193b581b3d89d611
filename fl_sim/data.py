"""Data: a loaded dataset (``fl_sim.loaders``) held out into a test split, divided into private and
public classes for model inversion, and partitioned over the clients with flwr-datasets' partitioners
over the (seeded, shuffled) training split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_sim.config import ConfigError
from fl_sim.loaders import load_arrays


@dataclass
class FederatedData:
    """Training split partitioned over clients, plus the held-out test split.

    ``x_*`` are normalised with ``mean``/``std`` (per channel, from the training
    split) when the dataset config asks for it; ``x * std + mean`` gives [0, 1] images.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    partitions: list[np.ndarray]  # indices into x_train, one array per client
    num_classes: int
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)
    x_aux: np.ndarray | None = None  # the attacker's own data (normalised), disjoint from every client's
    y_aux: np.ndarray | None = None
    # Model inversion's division of the classes (``private_classes``): the clients hold the private ones,
    # relabelled 0..P-1 (``classes[i]`` is model class i's label in the dataset); the attacker's auxiliary
    # data are the other, public classes (``y_aux`` in the dataset's labels). ``x_test_all``/``y_test_all``:
    # the whole test split, every class, dataset labels (the evaluation classifier's test).
    classes: tuple[int, ...] | None = None
    x_test_all: np.ndarray | None = None
    y_test_all: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def dataset_labels(self) -> tuple[int, ...]:
        """The dataset's label of each class of the model (the identity without a division of classes)."""
        return self.classes if self.classes is not None else tuple(range(self.num_classes))

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.partitions[cid]
        return self.x_train[idx], self.y_train[idx]

    def label_histograms(self) -> list[list[int]]:
        return [np.bincount(self.y_train[p], minlength=self.num_classes).tolist() for p in self.partitions]


# --------------------------------------------------------------------------- loaders

def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping class proportions; returns (train_idx, test_idx), each shuffled."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and round(test_fraction * len(y)) >= len(counts[counts > 0]) else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.asarray(tr), np.asarray(te)


def make_partitioner(part_cfg, num_clients: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if part_cfg.name == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if part_cfg.name == "dirichlet":
        return DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=part_cfg.alpha,
                                    min_partition_size=part_cfg.min_partition_size, self_balancing=False,
                                    shuffle=True, seed=seed)
    if part_cfg.name == "pathological":
        return PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                       num_classes_per_partition=part_cfg.classes_per_client,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    raise ConfigError(f"partition={part_cfg.name} is not known; choose iid, dirichlet or pathological")


def partition_indices(y: np.ndarray, part_cfg, num_clients: int, seed: int) -> list[np.ndarray]:
    """Client index arrays over ``y`` from a flwr-datasets partitioner."""
    import datasets

    if num_clients > len(y):
        raise ConfigError(f"num_clients={num_clients} exceeds the {len(y)} training examples; "
                          "lower num_clients or use a larger dataset")
    num_classes = int(y.max()) + 1
    if part_cfg.name == "pathological" and part_cfg.classes_per_client > num_classes:
        raise ConfigError(f"partition.classes_per_client={part_cfg.classes_per_client} exceeds the "
                          f"{num_classes} classes of the dataset")
    table = datasets.Dataset.from_dict({"index": np.arange(len(y)), "label": y})
    partitioner = make_partitioner(part_cfg, num_clients, seed)
    partitioner.dataset = table
    try:
        parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as e:
        raise ConfigError(f"partition={part_cfg.name} cannot split {len(y)} examples over "
                          f"{num_clients} clients: {e}") from e
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"partition={part_cfg.name} leaves clients {empty[:5]} without data; "
                          "lower num_clients, or raise partition.alpha / partition.classes_per_client")
    return parts


def synthetic_data(ds_cfg, part_cfg, num_clients: int, seed: int) -> FederatedData:
    """FedProx's synthetic devices (``fl_sim.synthetic``), one per client: with partition=natural each
    client holds its device's training examples; another partition pools them and splits the pool."""
    from fl_sim.synthetic import generate

    x, y, owner, x_test, y_test = generate(ds_cfg, num_clients, seed)
    if part_cfg.name == "natural":
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(num_clients + 1))
        parts = [order[bounds[k]:bounds[k + 1]] for k in range(num_clients)]
    else:
        parts = partition_indices(y, part_cfg, num_clients, seed)
    d = x.shape[1]
    return FederatedData(x, y, x_test, y_test, parts, int(ds_cfg.classes), np.zeros(d, np.float32),
                         np.ones(d, np.float32))


def divide_classes(num_classes: int, private: list[int] | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(private classes, public classes) of a dataset; ``private`` empty: the lower half of the classes."""
    chosen = tuple(sorted(set(int(c) for c in private))) or tuple(range(num_classes // 2))
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"attack.private_classes={list(private)} names classes the dataset does not have "
                          f"(it has 0..{num_classes - 1})")
    public = tuple(c for c in range(num_classes) if c not in chosen)
    if not chosen or not public:
        raise ConfigError(f"attack.private_classes={list(chosen)} leaves the attacker no public class of the "
                          f"{num_classes}: its auxiliary data would be empty; name fewer private classes")
    return chosen, public


def build_federated_data(ds_cfg, part_cfg, num_clients: int, seed: int, auxiliary_fraction: float = 0.0,
                         private_classes: list[int] | tuple[int, ...] | None = None) -> FederatedData:
    """Load, hold out the test split, set ``auxiliary_fraction`` of the training pool aside as the
    attacker's data (stratified, seeded), normalise, partition the rest over the clients.

    ``private_classes`` (model inversion's ``disjoint_classes`` protocol): only those classes go to the
    clients (relabelled 0..P-1, in order) and to the test split the global model is evaluated on; the
    training examples of every other class are the attacker's auxiliary public data (``[]``: the lower
    half of the classes is private)."""
    if ds_cfg.name == "synthetic":  # generated per device: the devices are the clients (partition=natural)
        return synthetic_data(ds_cfg, part_cfg, num_clients, seed)
    if part_cfg.name == "natural":
        raise ConfigError(f"partition=natural keeps the clients a dataset generates itself (dataset=synthetic); "
                          f"dataset={ds_cfg.name} has none: choose partition=iid, dirichlet or pathological")
    x, y, x_test, y_test = load_arrays(ds_cfg)
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"dataset={ds_cfg.name}: expected N images with N labels, got {x.shape} and {y.shape}")
    if y.min() < 0:
        raise ConfigError(f"dataset={ds_cfg.name}: labels must be non-negative integers")
    if x_test is not None and (x_test.shape[1:] != x.shape[1:] or len(x_test) != len(y_test) or len(x_test) == 0):
        raise ConfigError(f"dataset={ds_cfg.name}: the test split holds {x_test.shape} images and {len(y_test)} "
                          f"labels; expected N images of the training shape {x.shape[1:]} with N labels")
    if not (np.isfinite(x).all() and (x_test is None or np.isfinite(x_test).all())):
        raise ConfigError(f"dataset={ds_cfg.name}: the images hold NaN or Inf values")
    rng = np.random.default_rng(seed)
    if x_test is None:
        if ds_cfg.max_examples:
            keep = rng.permutation(len(y))[: ds_cfg.max_examples]
            x, y = x[keep], y[keep]
        tr, te = stratified_split(y, ds_cfg.test_fraction, seed)
        x_test, y_test, x, y = x[te], y[te], x[tr], y[tr]
    else:
        perm = rng.permutation(len(y))[: ds_cfg.max_examples or None]
        x, y = x[perm], y[perm]
    num_classes = int(max(y.max(), y_test.max())) + 1
    x_aux = y_aux = None
    classes = x_test_all = y_test_all = None
    if private_classes is not None:
        classes, _ = divide_classes(num_classes, private_classes)
        relabel = np.full(num_classes, -1, np.int64)
        relabel[list(classes)] = np.arange(len(classes))
        mine, mine_test = np.isin(y, classes), np.isin(y_test, classes)
        x_aux, y_aux = x[~mine], y[~mine]
        x_test_all, y_test_all = x_test, y_test
        x, y, x_test, y_test = x[mine], relabel[y[mine]], x_test[mine_test], relabel[y_test[mine_test]]
        if len(y) == 0 or len(y_aux) == 0 or len(y_test) == 0:
            raise ConfigError(f"dataset={ds_cfg.name}: dividing its classes into private {list(classes)} and public "
                              f"leaves {len(y)} private training, {len(y_aux)} public and {len(y_test)} private test "
                              "examples; every part needs some (use more data or other attack.private_classes)")
        num_classes = len(classes)
    elif auxiliary_fraction > 0:
        tr, aux = stratified_split(y, auxiliary_fraction, seed + 1)
        x_aux, y_aux, x, y = x[aux], y[aux], x[tr], y[tr]
    if ds_cfg.normalize:
        mean = x.mean(axis=(0, 2, 3))
        std = x.std(axis=(0, 2, 3)) + 1e-8
    else:
        mean, std = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    norm = lambda a: ((a - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)  # noqa: E731
    parts = partition_indices(y, part_cfg, num_clients, seed)
    return FederatedData(norm(x), y, norm(x_test), y_test, parts, num_classes,
                         mean.astype(np.float32), std.astype(np.float32),
                         None if x_aux is None else norm(x_aux), y_aux, classes,
                         None if x_test_all is None else norm(x_test_all), y_test_all)
