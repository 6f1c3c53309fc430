"""cpuconv: a 3x3 convolution and its two gradients as matrix products, used for bf16 training on
CPUs with AMX. Each must be the convolution's own; only where they are used may differ."""

import copy

import pytest
import torch
import torch.nn.functional as F

import cpuconv
import devices
import net
from conftest import TINY, run_train_in_process

CPU = torch.device("cpu")


SHAPES = [(3, 5, 7, 2, 2), (2, 4, 6, 4, 4), (2, 3, 2, 3, 5), (1, 2, 3, 1, 1), (2, 3, 4, 8, 8)]


@pytest.mark.quick
@pytest.mark.parametrize("n, c_in, c_out, h, w", SHAPES)
def test_the_products_are_the_convolution_and_its_gradients(n, c_in, c_out, h, w):
    """In float64 the three matrix products give PyTorch's own output, input gradient and weight
    gradient, for square and oblong maps, in either memory format, with and without a bias."""
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    grad = torch.randn(n, c_out, h, w, dtype=torch.float64)
    expected_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=1)
    expected_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, gf = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
        for b in (None, bias):
            torch.testing.assert_close(cpuconv.conv2d(xf, weight, b),
                                       F.conv2d(x, weight, b, padding=1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cpuconv.input_grad(gf, weight), expected_x,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cpuconv.weight_grad(cpuconv.neighbourhoods(xf), gf),
                                   expected_w, rtol=1e-12, atol=1e-12)


@pytest.mark.quick
@pytest.mark.parametrize("bias", [True, False])
def test_the_autograd_function_passes_gradcheck(bias):
    """SmallMapConv's backward is the Jacobian of its forward (finite differences in float64),
    asked for every input together and for each alone (a frozen weight, a first layer)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(cpuconv.SmallMapConv.apply, (x, weight, b))
    for frozen in (x, weight):
        frozen.requires_grad_(False)
        assert torch.autograd.gradcheck(cpuconv.SmallMapConv.apply, (x, weight, b))
        frozen.requires_grad_(True)


def small_net():
    """VGG16_bn at 1/16 width: at 32 px its last six convolutions see 4x4 and 2x2 maps."""
    torch.manual_seed(0)
    return net.vgg(16, 10, True, dropout=0.0, width_div=16).to(memory_format=torch.channels_last)


def bf16_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits.float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.quick
def test_switched_network_computes_the_same_step_in_bf16(monkeypatch):
    """The switched VGG16 gives, up to bf16 rounding, the same logits and gradients as PyTorch's
    own convolutions; the matrix products serve exactly the convolutions on maps of at most
    SMALL_MAP pixels, and the state_dict keeps its keys."""
    plain = small_net()
    fast = copy.deepcopy(plain)
    assert cpuconv.use_for(fast) == 13
    assert fast.state_dict().keys() == plain.state_dict().keys()
    maps = []
    real = cpuconv.product

    def counting(rows, weight, bias, shape):
        maps.append(tuple(shape[-2:]))
        return real(rows, weight, bias, shape)

    monkeypatch.setattr(cpuconv, "product", counting)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    logits_plain, grads_plain = bf16_grads(plain, x, y)
    logits_fast, grads_fast = bf16_grads(fast, x, y)
    # the forward pass of the six convolutions, then their six input gradients
    assert sorted(maps) == [(2, 2)] * 6 + [(4, 4)] * 6
    rel = ((logits_fast - logits_plain).norm() / logits_plain.norm()).item()
    assert rel < 2e-2, f"logits: relative difference {rel:.1e}"
    for name, g in grads_plain.items():
        assert grads_fast[name].dtype == g.dtype == torch.float32
        rel = ((grads_fast[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 2e-2, f"{name}: relative difference {rel:.1e}"


@pytest.mark.quick
def test_fp32_takes_the_plain_path_and_bf16_evaluation_the_products(monkeypatch):
    """fp32 steps take PyTorch's convolution unchanged; bf16 evaluation (no gradients) takes the
    forward product, with the plain network's logits up to bf16 rounding."""
    plain = small_net().eval()
    fast = copy.deepcopy(plain)
    cpuconv.use_for(fast)
    used = []
    real = cpuconv.product
    monkeypatch.setattr(cpuconv, "product", lambda *a: used.append(1) or real(*a))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(fast(x), torch.zeros(4, dtype=torch.long)).backward()
    assert not used
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, expected = fast(x).float(), plain(x).float()
    assert len(used) == 6
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.quick
@pytest.mark.parametrize("device, amp, amx, switched", [
    ("cpu", torch.bfloat16, True, 13), ("cpu", torch.bfloat16, False, 0), ("cpu", None, True, 0),
    ("cpu", torch.float16, True, 0), ("cuda", torch.bfloat16, True, 0)])
def test_used_only_where_measured_faster(device, amp, amx, switched, monkeypatch):
    """bf16 on a CPU with AMX only: elsewhere (fp32, a CPU without AMX, a GPU) it was not measured."""
    monkeypatch.setattr(devices, "cpu_has", lambda feature: amx if feature == "amx_tile" else False)
    model = small_net()
    assert cpuconv.use_where_faster(model, torch.device(device), amp) == switched
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert kinds == ({cpuconv.SmallMapConv2d} if switched else {torch.nn.Conv2d})


def test_train_switches_on_a_cpu_with_amx(small, monkeypatch, tmp_path):
    """train.py's network on a CPU said to have AMX, with AMP = "auto" (so bf16): its convolutions
    are switched, and its steps go through the matrix products to a checkpoint."""
    monkeypatch.setattr(devices, "cpu_has", lambda feature: feature == "amx_tile")
    used = []
    real = cpuconv.weight_grad
    monkeypatch.setattr(cpuconv, "weight_grad", lambda rows, g: used.append(1) or real(rows, g))
    state, _ = run_train_in_process(monkeypatch, *TINY, "--data-dir", small,
                                    "--save-dir", tmp_path / "run")
    assert used
    assert {type(m) for m in state.model.modules() if isinstance(m, torch.nn.Conv2d)} == {
        cpuconv.SmallMapConv2d}
    assert (tmp_path / "run" / "best.pth").is_file()
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
