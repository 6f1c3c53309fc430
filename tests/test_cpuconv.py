"""cpuconv: the weight gradient of a 3x3 convolution as one matrix product, used for bf16 training
on CPUs with AMX. The gradient must be the convolution's own; only where it is used may differ."""

import copy

import pytest
import torch
import torch.nn.functional as F

import cpuconv
import devices
import net
from conftest import TINY, run_train_in_process

CPU = torch.device("cpu")


@pytest.mark.quick
@pytest.mark.parametrize("n, c_in, c_out, h, w", [(3, 5, 7, 2, 2), (2, 4, 6, 4, 4), (2, 3, 2, 3, 5),
                                                  (1, 2, 3, 1, 1), (2, 3, 4, 8, 8)])
def test_weight_grad_is_the_convolutions_weight_gradient(n, c_in, c_out, h, w):
    """In float64 the matrix product gives PyTorch's own weight gradient, for square and oblong
    maps, in either memory format."""
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64)
    grad = torch.randn(n, c_out, h, w, dtype=torch.float64)
    expected = torch.nn.grad.conv2d_weight(x, (c_out, c_in, 3, 3), grad, padding=1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = cpuconv.weight_grad(x.contiguous(memory_format=fmt),
                                  grad.contiguous(memory_format=fmt))
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


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
    """The switched VGG16 gives the same logits and, up to bf16 rounding, the same gradients as
    PyTorch's own convolutions; the matrix product serves exactly the convolutions on maps of at
    most SMALL_MAP pixels, and the state_dict keeps its keys."""
    plain = small_net()
    fast = copy.deepcopy(plain)
    assert cpuconv.use_for(fast) == 13
    assert fast.state_dict().keys() == plain.state_dict().keys()
    maps = []
    real = cpuconv.weight_grad

    def counting(x, grad):
        maps.append(tuple(x.shape[-2:]))
        return real(x, grad)

    monkeypatch.setattr(cpuconv, "weight_grad", counting)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    logits_plain, grads_plain = bf16_grads(plain, x, y)
    logits_fast, grads_fast = bf16_grads(fast, x, y)
    assert sorted(maps) == [(2, 2)] * 3 + [(4, 4)] * 3
    torch.testing.assert_close(logits_fast, logits_plain, rtol=0, atol=0)
    for name, g in grads_plain.items():
        assert grads_fast[name].dtype == g.dtype == torch.float32
        rel = ((grads_fast[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 2e-2, f"{name}: relative difference {rel:.1e}"


@pytest.mark.quick
def test_plain_path_in_fp32_and_without_gradients(monkeypatch):
    """fp32 steps and evaluation (no gradients) take PyTorch's convolution unchanged."""
    fast = small_net()
    cpuconv.use_for(fast)
    monkeypatch.setattr(cpuconv, "weight_grad", lambda *a: pytest.fail("matrix product used"))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(fast(x), torch.zeros(4, dtype=torch.long)).backward()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        fast(x)


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
    are switched, and its steps go through the matrix product to a checkpoint."""
    monkeypatch.setattr(devices, "cpu_has", lambda feature: feature == "amx_tile")
    used = []
    real = cpuconv.weight_grad
    monkeypatch.setattr(cpuconv, "weight_grad", lambda x, g: used.append(1) or real(x, g))
    state, _ = run_train_in_process(monkeypatch, *TINY, "--data-dir", small,
                                    "--save-dir", tmp_path / "run")
    assert used
    assert {type(m) for m in state.model.modules() if isinstance(m, torch.nn.Conv2d)} == {
        cpuconv.SmallMapConv2d}
    assert (tmp_path / "run" / "best.pth").is_file()
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
