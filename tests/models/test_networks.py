"""The plain networks: shapes, layer names, dropout only in training."""

import torch

from lora_lab.models import MLP, ConvNet, LinearMap


def test_mlp_default_is_784_64_64_10():
    net = MLP()
    shapes = [tuple(m.weight.shape) for m in [*net.hidden, net.head]]
    assert shapes == [(64, 784), (64, 64), (10, 64)]
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_mlp_hidden_sizes_configurable():
    net = MLP(input_shape=[3, 8, 8], num_classes=4, hidden_sizes=[32, 16, 8])
    assert [m.out_features for m in net.hidden] == [32, 16, 8]
    assert net.hidden[0].in_features == 192
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_mlp_dropout_active_in_training_only():
    torch.manual_seed(0)
    net = MLP(dropout=0.5)
    x = torch.randn(4, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), net(x)), "eval mode must be deterministic (no dropout)"
    net.train()
    assert not torch.equal(net(x), net(x)), "train mode must apply dropout"


def test_convnet_cifar_shapes():
    net = ConvNet()
    assert net.fc1.in_features == 400
    assert (net.fc1.out_features, net.fc2.out_features, net.head.out_features) == (120, 84, 10)
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv2.out_channels) == (3, 6, 16)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_runs_on_28x28_grayscale():
    net = ConvNet(input_shape=[1, 28, 28])
    assert net.fc1.in_features == 256
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_linear_map_is_bias_free():
    net = LinearMap(d_in=7, d_out=5)
    assert net.linear.bias is None
    x = torch.randn(3, 7)
    assert torch.allclose(net(x), x @ net.linear.weight.T)
