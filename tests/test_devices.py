"""Accelerator paths proven on the CPU: each test reproduces one constraint of a device this project
has no access to (Apple MPS, older NVIDIA GPUs, Ascend NPUs) and checks the code respects it."""

import signal
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import common
import net
import train
from conftest import ROOT, TINY

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ auto precision

@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_follows_the_compute_capability(capability, expected, monkeypatch):
    """A T4 (7.5) or V100 (7.0) answers is_bf16_supported() with True (emulated), yet bf16 is slow there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, reason = common.amp_choice(torch.device("cuda", 0), "auto")
    assert dtype == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in reason


@pytest.mark.parametrize("amx, expected", [(False, None), (True, torch.bfloat16)])
def test_auto_precision_on_a_cpu_needs_amx(amx, expected, monkeypatch):
    """AVX512-BF16 without AMX trains slower in bf16 than in fp32 (measured on this project's Xeon VM)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    dtype, reason = common.amp_choice(CPU, "auto")
    assert dtype == expected
    assert reason == ("auto: this CPU has AMX" if amx else "auto: this CPU has no AMX")
    assert common.amp_choice(CPU, "bf16") == (torch.bfloat16, "--amp bf16")
    assert common.amp_choice(CPU, "off") == (None, "--amp off")


# ------------------------------------------------------------------------- what a training run dispatches

class OpAudit(TorchDispatchMode):
    """Records every aten op a run dispatches with the dtypes of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        dtypes = {t.dtype for t in flat if isinstance(t, torch.Tensor)}
        self.ops.setdefault(func.overloadpacket.__name__, set()).update(dtypes)
        return out


def run_train_in_process(monkeypatch, *args) -> None:
    """train.run() as `python train.py ARGS` runs it, in this process; its signal handlers are undone after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    try:
        train.run()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    """One epoch (2 steps, then evaluation and the checkpoints) under the op audit, 28 px MNIST at 32 px."""
    from conftest import make_mnist
    tmp = tmp_path_factory.mktemp("audit")
    data = make_mnist(tmp / "data", n_train=64, n_test=32)
    with pytest.MonkeyPatch.context() as mp, OpAudit() as audit:
        run_train_in_process(mp, *TINY, "--data-dir", data, "--save-dir", tmp / "save")
    return audit.ops


def test_a_training_run_creates_no_float64_tensor(audited_run):
    """Apple MPS has no float64: a single float64 tensor on the device stops a run before its first step."""
    assert "convolution_backward" in audited_run  # it trained
    assert [op for op, dtypes in audited_run.items() if torch.float64 in dtypes] == []


def test_a_training_run_resizes_without_antialias(audited_run):
    """Antialiased resize has no MPS kernel before torch 2.7 and falls back to the CPU on Ascend 910A;
    upsampling (28 -> 32 px here) gives the same result without it."""
    assert "upsample_bilinear2d" in audited_run
    assert not [op for op in audited_run if "_aa" in op]


def test_the_resize_without_antialias_is_the_same_when_upsampling():
    x = torch.rand(4, 3, 28, 28)
    for size in (32, 64, 224):
        plain = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        aa = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(plain, aa, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- MPS adaptive average pool

class DivisiblePoolOnly(TorchDispatchMode):
    """The CPU made to reject what MPS rejects: an adaptive average pool whose input and output sizes do
    not divide one another (pytorch issue 143864), forward or backward."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.startswith(("_adaptive_avg_pool2d", "adaptive_avg_pool2d")):
            x = args[0] if "backward" not in func.overloadpacket.__name__ else args[1]
            out = (7, 7) if "backward" in func.overloadpacket.__name__ else tuple(args[1])
            for i, o in zip(x.shape[-2:], out):
                if (i >= o and i % o) or (i < o and o % i):
                    raise RuntimeError("Adaptive pool MPS: input sizes must be divisible by output sizes.")
        return func(*args, **(kwargs or {}))


def test_mps_pool_rule_is_pytorchs():
    assert [s for s in range(1, 15) if net.pool_supported(s)] == [1, 7, 14]


@pytest.mark.parametrize("image_size", [32, 64, 96, 128, 160, 192, 224, 256])
def test_every_image_size_trains_where_the_pool_must_divide(image_size, monkeypatch):
    """With the CPU standing in for MPS, a forward and backward at each size runs, and its output equals
    that of the plain adaptive pool; on the CPU itself the output is bitwise what it was."""
    torch.manual_seed(0)
    model = net.vgg(11, 10, width_div=64).eval()
    x = torch.randn(2, 3, image_size, image_size)
    features = model.features(x)
    reference = model.avgpool(features)
    assert torch.equal(model(x), model.classifier(torch.flatten(reference, 1)))  # the CPU is unchanged
    monkeypatch.setattr(net, "DIVISIBLE_POOL_ONLY", ("cpu",))
    with DivisiblePoolOnly():
        xg = x.clone().requires_grad_()
        out = model(xg)
        out.sum().backward()
        pooled = net.pool_to_7x7(features, model.avgpool)
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-6)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_the_stand_in_rejects_what_mps_rejects():
    with DivisiblePoolOnly(), pytest.raises(RuntimeError, match="divisible"):
        F.adaptive_avg_pool2d(torch.randn(1, 2, 4, 4), 7)


# ------------------------------------------------------------------------------ a numbered GPU, versions

@pytest.fixture
def two_fake_gpus(monkeypatch):
    """CUDA with two devices, as far as the code before the first real CUDA call can tell."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    return calls


class Reached(common.UserError):
    pass


def test_train_makes_the_chosen_gpu_current(two_fake_gpus, monkeypatch, tmp_path, capsys):
    def stop(*args, **kwargs):
        raise Reached("the data is loaded after the device is set up")
    monkeypatch.setattr(common, "load_split", stop)
    with pytest.raises(SystemExit):
        run_train_in_process(monkeypatch, *TINY, "--device", "cuda:1", "--save-dir", tmp_path)
    assert "the data is loaded after the device is set up" in capsys.readouterr().err
    assert two_fake_gpus == [torch.device("cuda", 1)]


def test_bench_makes_the_chosen_gpu_current(two_fake_gpus, monkeypatch, capsys):
    import bench

    def stop(args):
        raise Reached("the data is read after the device is set up")
    monkeypatch.setattr(bench, "resolve_dataset", stop)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda:1"])
    with pytest.raises(SystemExit):
        common.run_main(bench.main)
    assert "the data is read after the device is set up" in capsys.readouterr().err
    assert two_fake_gpus == [torch.device("cuda", 1)]


def test_requirements_ask_for_the_torch_whose_apis_are_used():
    """torch.amp.GradScaler(device) and torch.get_default_device appeared in torch 2.3 (torchvision 0.18)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    floor = {line.split(">=")[0]: tuple(int(v) for v in line.split(">=")[1].split(",")[0].split()[0].split("."))
             for line in lines if line.startswith(("torch>=", "torchvision>="))}
    assert floor == {"torch": (2, 3), "torchvision": (0, 18)}
