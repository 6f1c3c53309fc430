"""The hand-written VGGs against torchvision's own: same parameters, same names, same outputs."""

import configparser
from pathlib import Path

import pytest
import torch
from torchvision import models

import net

pytestmark = pytest.mark.quick


def test_vgg16_param_count_matches_torchvision():
    # 138,357,544 is the figure torchvision publishes for vgg16 with 1000 classes.
    mine = sum(p.numel() for p in net.MyVgg16Net(num_classes=1000).parameters())
    assert mine == 138_357_544
    assert mine == sum(p.numel() for p in models.vgg16(num_classes=1000).parameters())
    assert (sum(p.numel() for p in net.MyVgg16Net(num_classes=10).parameters())
            == sum(p.numel() for p in models.vgg16(num_classes=10).parameters()))


@pytest.mark.parametrize("size", [224, 32])
def test_output_shape(size):
    model = net.MyVgg16Net(num_classes=10, width_div=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)


def test_full_width_output_shape_224():
    with torch.no_grad():
        assert net.MyVgg16Net(num_classes=7).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 7)


@pytest.mark.parametrize("depth, batch_norm", [(11, False), (13, True), (16, False), (16, True), (19, False)])
def test_torchvision_state_dict_loads_strict_and_gives_same_outputs(depth, batch_norm):
    name = f"vgg{depth}{'_bn' if batch_norm else ''}"
    torch.manual_seed(depth)
    reference = getattr(models, name)(num_classes=10).eval()
    if batch_norm:  # non-trivial running statistics, so eval-mode BatchNorm is really exercised
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)
    mine = net.vgg(depth, num_classes=10, batch_norm=batch_norm).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)
    assert [(k, v.shape) for k, v in mine.state_dict().items()] == \
           [(k, v.shape) for k, v in reference.state_dict().items()]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), reference(x), rtol=1e-4, atol=1e-5)


def test_no_softmax_in_forward():
    # Logits: rows do not sum to 1 and can be negative.
    model = net.MyVgg16Net(num_classes=10, width_div=16).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32) * 10)
    assert not torch.allclose(out.sum(1), torch.ones(4))


def test_relu_after_every_conv_and_init():
    model = net.MyVgg16Net(batch_norm=True, width_div=4)
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    for i in convs:
        assert isinstance(layers[i + 1], torch.nn.BatchNorm2d) and isinstance(layers[i + 2], torch.nn.ReLU)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in layers) == 5
    bn = layers[convs[0] + 1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    torch.manual_seed(0)
    big = net.MyVgg16Net()
    # kaiming normal with fan_out: std = sqrt(2 / (out_channels * 3 * 3)). Every conv but 64 -> 64 has
    # fan_in != fan_out (3 -> 64: a std 4.6x smaller than fan_in's; 64 -> 128: 1.4x), so fan_in fails here.
    for conv in (m for m in big.features if isinstance(m, torch.nn.Conv2d)):
        fan_out = (2 / (conv.out_channels * 9)) ** 0.5
        assert abs(conv.weight.std().item() - fan_out) < 0.05 * fan_out, conv
        assert torch.all(conv.bias == 0)
    fc = big.classifier[0].weight
    assert abs(fc.std().item() - 0.01) < 0.0005 and torch.all(big.classifier[0].bias == 0)


def test_width_div_divides_every_channel_count():
    model = net.vgg(16, num_classes=10, width_div=4)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert model.classifier[0].in_features == 128 * 7 * 7 and model.classifier[0].out_features == 1024


@pytest.mark.parametrize("bad", [dict(depth=12), dict(width_div=3)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        net.vgg(**bad)


@pytest.mark.parametrize("size", [32, 48])
def test_a_1x1_map_skips_the_49_copies_and_trains_exactly_as_torchvision(size):
    """Below 64 px the first Linear runs on the 1x1 map with its weights summed over the 49
    positions: the adaptive pool is not called, and outputs and every gradient equal those of
    torchvision's vgg16_bn with the same weights."""
    torch.manual_seed(0)
    mine = net.vgg(16, 10, batch_norm=True, dropout=0.0, width_div=8)
    reference = models.vgg16_bn(num_classes=10, dropout=0.0)
    reference.features, reference.classifier = [__import__("copy").deepcopy(m) for m in
                                                (mine.features, mine.classifier)]
    pooled = []
    mine.avgpool.register_forward_hook(lambda *a: pooled.append(1))
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 3, 9, 3])
    for model in (mine, reference):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert pooled == []
    torch.testing.assert_close(mine(x), reference(x), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(mine.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert mine.classifier[0].weight.grad.shape == (512, 64 * 49)


@pytest.mark.quick
def test_the_suite_keeps_temporary_files_of_failed_tests_only(pytestconfig):
    """tests/pytest.ini: pytest would keep every test's files of the last three runs (about 6 GB each).
    README's `python -m pytest tests` reads it; a bare `pytest` in the repo's folder does not look
    in tests/ for it, so there the file itself is checked."""
    ini = Path(__file__).with_name("pytest.ini")
    settings = configparser.ConfigParser()
    settings.read(ini)
    assert settings["pytest"]["tmp_path_retention_policy"] == "failed"
    assert settings["pytest"]["tmp_path_retention_count"] == "1"
    if pytestconfig.inipath == ini:
        assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
        assert int(pytestconfig.getini("tmp_path_retention_count")) == 1
