"""Models, shaped by the dataset: ``build_model(name, input_shape, num_classes, ...)``.

- ``mlp``: fully connected, ``hidden`` layer sizes.
- ``cnn``: the CNN of McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (AISTATS 2017): two 5x5 conv layers (32, 64 channels) each with 2x2 max-pooling,
  a 512-unit linear layer (1.66 M parameters on MNIST). The default: small and fast on a CPU.
- ``lenet``: the LeNet of Zhu et al., "Deep Leakage from Gradients" (NeurIPS 2019):
  three 5x5 conv layers of 12 channels (strides 2, 2, 1) with sigmoid activations, one linear layer.
- ``convnet``: the ConvNet of Geiping et al., "Inverting Gradients" (NeurIPS 2020): eight 3x3 conv
  layers of widths w, 2w, 2w, 4w, 4w, 4w, 4w, 4w, each with BatchNorm and ReLU, 3x3 max-pooling after
  the 6th and 8th, one linear layer (width 64 on 32x32 inputs: 2.9 M parameters).
- ``resnet18``: ResNet-18 in its CIFAR form (3x3 stem, no max-pool), He et al. 2016.

Linear layers are sized by a dry run on the input shape, so every model takes any image size it
can reduce; a shape it cannot take raises ``ValueError`` naming the model and the shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}


def _flat_size(body: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(math.prod(body(torch.zeros(1, *input_shape)).shape[1:]))


class MLP(nn.Module):
    def __init__(self, input_shape, num_classes, hidden=(200, 200), activation="relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LeNet(nn.Module):
    """DLG's LeNet (Zhu et al. 2019): sigmoid activations, so its gradients are twice differentiable."""

    def __init__(self, input_shape, num_classes, activation="sigmoid"):
        super().__init__()
        act = ACTIVATIONS[activation]
        c = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), act(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(_flat_size(self.body, input_shape), num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class CNN(nn.Module):
    """FedAvg's CNN (McMahan et al. 2017)."""

    def __init__(self, input_shape, num_classes, hidden=512):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(input_shape[0], 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(_flat_size(self.body, input_shape), hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def _conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class ConvNet(nn.Module):
    """Geiping et al.'s ConvNet (their width-64 form has 2.9 M parameters on CIFAR-10)."""

    def __init__(self, input_shape, num_classes, width=64):
        super().__init__()
        w = width
        widths = [input_shape[0], w, 2 * w, 2 * w, 4 * w, 4 * w, 4 * w, 4 * w, 4 * w]
        layers: list[nn.Module] = []
        side = min(input_shape[1:])
        for i in range(8):
            layers += _conv_bn_relu(widths[i], widths[i + 1])
            if i in (5, 7):  # the paper's 3x3 pools (32 -> 10 -> 3); a map under 3 pixels (8x8 digits: 2) is
                # kept as it is (an identity in the pool's place keeps the layers' names)
                layers.append(nn.MaxPool2d(3) if side >= 3 else nn.Identity())
                side = side // 3 if side >= 3 else side
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(_flat_size(self.body, input_shape), num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR form: 3x3 stem with stride 1, no max-pool, stages of 2 blocks at w, 2w, 4w, 8w."""

    def __init__(self, input_shape, num_classes, width=64):
        super().__init__()
        w = width
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, width: int = 64,
                hidden=(200, 200), activation: str = "relu") -> nn.Module:
    """Build a model for inputs of ``input_shape`` (C, H, W) and ``num_classes`` classes."""
    try:
        if name == "mlp":
            return MLP(input_shape, num_classes, tuple(hidden), activation)
        if name == "cnn":
            return CNN(input_shape, num_classes, hidden[0] if hidden else 512)
        if name == "lenet":
            return LeNet(input_shape, num_classes)
        if name == "convnet":
            return ConvNet(input_shape, num_classes, width)
        if name == "resnet18":
            return ResNet18(input_shape, num_classes, width)
    except RuntimeError as e:
        c, h, w = input_shape
        raise ValueError(f"model={name} does not fit inputs of shape {c}x{h}x{w} ({str(e).splitlines()[0]}); "
                         "choose a model for this image size (e.g. model=mlp or model=resnet18)") from e
    raise ValueError(f"model={name} is not known; choose mlp, cnn, lenet, convnet or resnet18")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- split learning

_PARTS = ("net", "body", "head", "fc")  # every model above is these parts composed in this order


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of (name, layer) whose composition is its forward pass.

    Names are the layers' own module names ("body.3", "fc"): ``scenario.cut_layer`` names the last
    layer that stays with the client."""
    out: list[tuple[str, nn.Module]] = []
    for part in _PARTS:
        m = getattr(model, part, None)
        if isinstance(m, nn.Sequential):
            out += [(f"{part}.{i}", layer) for i, layer in enumerate(m)]
        elif isinstance(m, nn.Module):
            out.append((part, m))
    if not out:
        raise ValueError(f"{type(model).__name__} has no layers fl-sim can cut")
    return out


def cut_points(model: nn.Module) -> list[str]:
    """Valid values of ``scenario.cut_layer``: every layer but the last (the server needs one)."""
    return [name for name, _ in layers(model)[:-1]]


def split_model(model: nn.Module, cut_layer: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(client bottom, server top) sharing ``model``'s layers: bottom ends with ``cut_layer``."""
    seq = layers(model)
    names = [n for n, _ in seq]
    if cut_layer not in names[:-1]:
        raise ValueError(f"scenario.cut_layer={cut_layer!r} is not a layer this model can be cut after; "
                         f"choose one of {', '.join(names[:-1])}")
    k = names.index(cut_layer) + 1
    return nn.Sequential(*[m for _, m in seq[:k]]), nn.Sequential(*[m for _, m in seq[k:]])
