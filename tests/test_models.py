"""Models: shapes for every dataset shape, parameter counts of the published forms, clear mismatch errors."""

import pytest
import torch

from fl_sim.models import build_model, num_parameters


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "convnet", "resnet18"])
@pytest.mark.parametrize("shape,classes", [((1, 28, 28), 10), ((3, 32, 32), 100)])
def test_every_model_maps_a_batch_to_class_logits(name, shape, classes):
    m = build_model(name, shape, classes, width=8, hidden=(16,))
    assert m(torch.zeros(2, *shape)).shape == (2, classes)


def test_convnet_width_64_is_geiping_et_al_2_9m_parameter_model():
    m = build_model("convnet", (3, 32, 32), 10, width=64)
    assert num_parameters(m) == 2_904_970
    assert m.fc.in_features == 36 * 64


def test_cnn_is_fedavg_cnn_with_1_66m_parameters_on_mnist():
    assert num_parameters(build_model("cnn", (1, 28, 28), 10, hidden=(512,))) == 1_663_370


def test_lenet_has_sigmoid_activations_as_in_dlg():
    m = build_model("lenet", (3, 32, 32), 10)
    assert sum(isinstance(a, torch.nn.Sigmoid) for a in m.modules()) == 3
    assert m.fc.in_features == 768  # 12 x 8 x 8 on 32x32 inputs, as in DLG


def test_resnet18_cifar_form_has_11m_parameters():
    assert 11.1e6 < num_parameters(build_model("resnet18", (3, 32, 32), 10)) < 11.2e6


def test_model_that_cannot_take_the_input_size_says_so():
    with pytest.raises(ValueError, match="model=cnn does not fit inputs of shape 1x2x2"):
        build_model("cnn", (1, 2, 2), 10, hidden=(8,))


def test_convnet_keeps_its_pools_where_they_fit_and_takes_8x8_digits():
    """The paper's two 3x3 pools on CIFAR (32 -> 10 -> 3, a 2,304-wide head at width 64); on 8x8 digits the
    second pool would leave nothing (2 -> 0) and is an identity: the layers keep their names."""
    cifar = build_model("convnet", (3, 32, 32), 10, width=64)
    digits = build_model("convnet", (1, 8, 8), 10, width=4)
    assert cifar.fc.in_features == 2304 and digits.fc.in_features == 16 * 2 * 2
    assert isinstance(cifar.body[25], torch.nn.MaxPool2d) and isinstance(digits.body[25], torch.nn.Identity)
    assert digits(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_same_seed_same_initial_weights():
    torch.manual_seed(1)
    a = build_model("cnn", (1, 28, 28), 10)
    torch.manual_seed(1)
    b = build_model("cnn", (1, 28, 28), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
