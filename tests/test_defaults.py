"""Every shipped dataset × model trains with its defaults (issue 14): three FedAvg rounds through the
client's own training function, without Ray, with the learning rate, optimizer and batch size the
configuration gives the pair, each client holding one batch. The loss of the global model must stay
finite and fall, and no client's training loss may explode (the threshold of the run's warning line).

One local step per round (client.local_epochs=1; the default is 3): a learning rate that diverges does
so in its first steps (ConvNet at 0.05 averaged a loss of 18 over its first three, measured), and a
step of the paper's ConvNet on 32 MNIST digits costs about 3 s on 2 cores. MNIST and the digits have
two IID clients of one batch each. The *_samples datasets hold 10 training images of 10 (or 100)
classes: split in two, each client's handful of classes pulls the average away from the other's, so
they train as one client of 10. The global loss is taken with BatchNorm on the batch's own statistics:
after three steps the running statistics are still mostly their initial values. The datasets a user
points at a folder (mnist_idx, cifar_pickle, huggingface) give the same shapes as MNIST and CIFAR and
are not in the matrix. FedProx's synthetic devices are vectors, which only the MLP takes (any other model is
refused with one line): synthetic × mlp is in the matrix, with the MLP's defaults and with the logistic
regression of experiment=cross_device."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fl_sim.client import plain_train
from fl_sim.protocol import train_config
from fl_sim.recorder import loss_exploded
from fl_sim.data import build_federated_data
from fl_sim.workspace import initial_model

DATASETS = {"mnist": 2, "digits": 2, "cifar10_samples": 1, "cifar100_samples": 1, "fashion_mnist_samples": 1}
MODELS = ["cnn", "mlp", "lenet", "convnet", "resnet18"]
ROUNDS = 3


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model = copy.deepcopy(model).train()  # BatchNorm on the batch's statistics; the model's own stay as they are
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


PAIRS = [(d, m, []) for d in DATASETS for m in MODELS] + [
    ("synthetic", "mlp", []), ("synthetic", "mlp", ["experiment=cross_device", "num_clients=2"])]


@pytest.mark.parametrize("dataset, model, extra", PAIRS, ids=[f"{d}-{m}{'-' + e[0] if e else ''}" for d, m, e in PAIRS])
def test_every_dataset_and_model_trains_with_its_defaults(compose, dataset, model, extra):
    if dataset.endswith("_samples"):
        pytest.importorskip("foolbox")
    clients = DATASETS.get(dataset, 2)
    cfg = compose([f"dataset={dataset}", f"model={model}", f"num_clients={clients}", "attack=none",
                   "client.local_epochs=1", *extra])
    n = cfg.client.batch_size
    data = build_federated_data(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed, 0.0)
    net = initial_model(cfg, data)
    batches = [tuple(torch.from_numpy(a[:n]) for a in data.client(cid)) for cid in range(clients)]
    x_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    losses, client_losses = [_loss(net, x_all, y_all)], []
    for rnd in range(1, ROUNDS + 1):
        conf = train_config(cfg, rnd)
        replies = []
        for cid, (x, y) in enumerate(batches):
            net.load_state_dict(global_state)
            state, loss, _ = plain_train(net, x, y, conf, torch.Generator().manual_seed(rnd * 10 + cid), cfg)
            replies.append(state)
            client_losses.append(loss)
        global_state = {k: (sum(s[k].double() for s in replies) / clients).to(v.dtype) if v.is_floating_point()
                        else replies[0][k] for k, v in global_state.items()}
        net.load_state_dict(global_state)
        losses.append(_loss(net, x_all, y_all))
    said = f"{dataset} × {model} at lr {cfg.client.lr:g}: global loss {[round(v, 3) for v in losses]}, " \
           f"clients' {[round(v, 3) for v in client_losses]}"
    assert all(math.isfinite(v) for v in losses), said
    assert not any(loss_exploded(v, data.num_classes) for v in client_losses), said
    assert losses[-1] < losses[0], said


def test_a_client_whose_loss_explodes_gets_one_warning_line_naming_the_learning_rate(compose, tmp_path, caplog):
    from fl_sim.recorder import RunRecorder

    cfg = compose(["model=convnet", "client.lr=0.05", "attack=none"])
    rec = RunRecorder(cfg, tmp_path)
    with caplog.at_level("WARNING", logger="fl_sim"):
        rec.client_losses(1, {0: 1.9, 1: float("nan"), 2: 18.0}, num_classes=10)
        rec.client_losses(2, {0: 2.1, 1: float("nan"), 2: 40.0, 3: 9.0}, num_classes=10)  # 9.0 < 4·ln(10)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 2 and lines == rec.warnings  # clients 1 and 2, once each
    assert lines[0].startswith("client 1's training loss is nan in round 1") and "client 2's" in lines[1]
    assert all("client.lr=0.05" in t and "model=convnet" in t for t in lines)
    assert loss_exploded(float("inf"), 2) and not loss_exploded(4 * math.log(100) - 0.01, 100)
    assert rec.finish("completed")["warnings"] == lines
    mid = RunRecorder(compose(["defense=mid", "attack=none"]), tmp_path / "mid")  # loss = CE + β·KL (bits)
    mid.client_losses(1, {0: 7.6, 1: 14.2, 2: float("nan")}, num_classes=5)  # MID's first rounds, measured
    assert len(mid.warnings) == 1 and mid.warnings[0].startswith("client 2's training loss is nan")
