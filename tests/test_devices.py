"""Accelerator paths proven on the CPU: each test reproduces one constraint of a device this project
has no access to (Apple MPS, older NVIDIA GPUs, Ascend NPUs) and checks the code respects it."""

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import devices
import imagedata
import net
import runstate
import train
from conftest import ROOT, TINY, run_train_in_process

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ auto precision

@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
@pytest.mark.quick
def test_auto_precision_follows_the_compute_capability(capability, expected, monkeypatch):
    """A T4 (7.5) or V100 (7.0) answers is_bf16_supported() with True (emulated), yet bf16 is slow there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, reason = devices.amp_choice(torch.device("cuda", 0), "auto")
    assert dtype == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in reason


@pytest.mark.parametrize("vendor, amx, avx512_bf16, expected, reason", [
    # Xeon without AMX: bf16 trained at 0.66-0.83x of fp32's speed
    ("GenuineIntel", False, True, None, "auto: this CPU has no AMX"),
    ("GenuineIntel", True, True, torch.bfloat16, "auto: this CPU has AMX"),
    # EPYC Zen 4: bf16 1.4x fp32
    ("AuthenticAMD", False, True, torch.bfloat16, "auto: this AMD CPU has AVX512-BF16"),
    ("AuthenticAMD", False, False, None, "auto: this CPU has no AMX"),  # before Zen 4
    ("", False, True, None, "auto: this CPU has no AMX"),  # vendor unknown
])
@pytest.mark.quick
def test_auto_precision_on_a_cpu_follows_what_was_measured(vendor, amx, avx512_bf16, expected,
                                                           reason, monkeypatch):
    """bf16 where it trained faster than fp32: AMX, or AVX512-BF16 on an AMD CPU; an Intel CPU with
    AVX512-BF16 but no AMX trained slower in bf16 (docs/bench.md, "bf16 on the CPU")."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(devices, "cpu_vendor", lambda: vendor)
    assert devices.amp_choice(CPU, "auto") == (expected, reason)
    assert devices.amp_choice(CPU, "bf16") == (torch.bfloat16, "--amp bf16")
    assert devices.amp_choice(CPU, "off") == (None, "--amp off")


@pytest.mark.quick
def test_a_torch_that_cannot_ask_for_amx_reads_the_flags_of_the_os(monkeypatch):
    """torch 2.3 has no torch.cpu._is_amx_tile_supported: the flags Linux lists decide, and where
    none can be read the first line says that it is unknown, not that the CPU lacks AMX."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    flags = devices.cpu_flags()
    if flags is not None:
        assert devices.cpu_has("amx_tile") == ("amx_tile" in flags)
        with open("/proc/cpuinfo") as f:
            assert ("amx_tile" in f.read().split()) == devices.cpu_has("amx_tile")
    monkeypatch.setattr(devices, "cpu_flags", lambda: None)
    monkeypatch.setattr(devices, "cpu_vendor", lambda: "GenuineIntel")
    assert devices.cpu_has("amx_tile") is None
    dtype, reason = devices.amp_choice(CPU, "auto")
    assert dtype is None and "no AMX" not in reason and "whether" in reason
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"amx_tile", "avx512_bf16"})
    assert devices.amp_choice(CPU, "auto") == (torch.bfloat16, "auto: this CPU has AMX")


@pytest.mark.quick
def test_the_cpu_vendor_is_read_from_the_machine():
    """The name the CPU itself reports (cpuid's vendor string), on the OS this runs on."""
    vendor = devices.cpu_vendor()
    assert isinstance(vendor, str)
    if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
        with open("/proc/cpuinfo") as f:
            expected = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("vendor_id"))
        assert vendor == expected
        assert vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


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


@pytest.mark.quick
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


@pytest.mark.quick
def test_mps_pool_rule_is_pytorchs():
    assert [s for s in range(1, 15) if devices.pool_supported(s)] == [1, 7, 14]


@pytest.mark.parametrize("image_size", [32, 64, 96, 128, 160, 192, 224, 256])
def test_every_image_size_trains_where_the_pool_must_divide(image_size, monkeypatch):
    """With the CPU standing in for MPS (devices.place gives the model the pool that computes the
    same bins another way), a forward and backward at each size runs, and its output equals that of
    the plain network on the CPU; on the CPU itself the model keeps its own pool."""
    torch.manual_seed(0)
    model = net.vgg(11, 10, width_div=64).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        plain = model(x)
    assert type(devices.place(model, CPU).avgpool) is torch.nn.AdaptiveAvgPool2d
    monkeypatch.setattr(devices, "DIVISIBLE_POOL_ONLY", ("cpu",))
    stand_in = devices.place(model, CPU)
    assert isinstance(stand_in.avgpool, devices.DivisiblePool)
    assert stand_in.state_dict().keys() == net.vgg(11, 10, width_div=64).state_dict().keys()
    with DivisiblePoolOnly():
        xg = x.clone().requires_grad_()
        out = stand_in(xg)
        out.sum().backward()
        pooled = stand_in.avgpool(model.features(x))
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(model.features(x), 7), rtol=1e-5,
                               atol=1e-6)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.quick
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


class Reached(cli.UserError):
    pass


def test_train_makes_the_chosen_gpu_current(two_fake_gpus, monkeypatch, tmp_path, capsys):
    def stop(*args, **kwargs):
        raise Reached("the data is loaded after the device is set up")
    monkeypatch.setattr(imagedata, "load_split", stop)
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
        cli.run_main(bench.main)
    assert "the data is read after the device is set up" in capsys.readouterr().err
    assert two_fake_gpus == [torch.device("cuda", 1)]


def test_each_bench_pipeline_makes_the_chosen_gpu_current_in_its_own_process(two_fake_gpus, monkeypatch):
    """bench.py times each pipeline in a fresh process (bench.measure): there too cuda:1 must be made current
    before anything runs, else the timings wait for GPU 0."""
    import bench

    def stop(*args):
        raise Reached("the pipeline is built after the device is set up")
    monkeypatch.setattr(bench, "PIPELINES", [("a", "this repo", stop)])
    with pytest.raises(Reached):
        bench.measure(bench.parse_args(["--device", "cuda:1"]), "a", "cuda:1", None, 0)
    assert two_fake_gpus == [torch.device("cuda", 1)]


@pytest.mark.quick
def test_requirements_ask_for_the_torch_whose_apis_are_used():
    """torch.amp.GradScaler(device) appeared in torch 2.3 (torchvision 0.18); the suite passes with 2.3.1."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    floor = {line.split(">=")[0]: tuple(int(v) for v in line.split(">=")[1].split(",")[0].split()[0].split("."))
             for line in lines if line.startswith(("torch>=", "torchvision>="))}
    assert floor == {"torch": (2, 3), "torchvision": (0, 18)}


# ------------------------------------------------------------------ resume on another device or precision

RESUME_RUN = [*TINY, "--epochs", "2", "--schedule", "constant", "--amp", "off"]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    """(data, a straight 2-epoch fp32 run's last.pth, a 1-epoch run's save folder)."""
    from conftest import load, make_mnist, run_script
    tmp = tmp_path_factory.mktemp("moved")
    data = make_mnist(tmp / "data", n_train=256, n_test=32)
    run_script("train.py", *RESUME_RUN, "--data-dir", data, "--save-dir", tmp / "straight", check=True)
    run_script("train.py", *RESUME_RUN, "--epochs", "1", "--data-dir", data, "--save-dir", tmp / "one", check=True)
    return data, load(tmp / "straight" / "last.pth"), tmp / "one"


def copy_run(folder, to, edit=lambda ckpt: None):
    """The run in `folder` copied to `to`, its last.pth changed by edit(ckpt)."""
    from conftest import load
    to.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    ckpt = load(to / "last.pth")
    edit(ckpt)
    torch.save(ckpt, to / "last.pth")
    return to


def no_fused_kernels(monkeypatch):
    """The CPU made to lack fused optimizer kernels, as torch before 2.4 (and devices without them)
    does: the kernels raise what torch raises there."""
    def missing(*args, **kwargs):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                           "supported devices: ['cuda']")
    monkeypatch.setattr(torch, "_fused_sgd_", missing)
    monkeypatch.setattr(torch, "_fused_adamw_", missing)
    monkeypatch.setattr(devices, "_FUSED", {})


@pytest.mark.quick
def test_the_fused_step_is_used_only_where_torch_has_it(monkeypatch):
    monkeypatch.setattr(devices, "_FUSED", {})
    # fused SGD and AdamW on the CPU came with torch 2.4
    assert devices.fused_step(torch.device("cpu")) is (True if torch.__version__ >= "2.4" else None)
    assert devices.fused_step(torch.device("meta")) is None
    no_fused_kernels(monkeypatch)
    assert devices.fused_step(torch.device("cpu")) is None
    model = net.vgg(11, 10, width_div=64)
    config = {k.lower(): v for k, v in train.DEFAULTS.items()}
    for optimizer in ("sgd", "adamw"):
        opt = train.make_optimizer(model, config | {"optimizer": optimizer})
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
        opt.step()  # the foreach step: no fused kernel is called
        assert not any(g["fused"] for g in opt.param_groups)


def test_a_run_saved_with_fused_steps_resumes_where_there_are_none(fp32_runs, tmp_path, monkeypatch):
    """last.pth's optimizer groups say fused=True (written on a CPU that has the kernels); resumed
    where there are none, the groups follow the machine, not the file."""
    from conftest import load
    data, straight, one = fp32_runs
    save = copy_run(one, tmp_path / "save")
    if devices.fused_step(torch.device("cpu")) is None:
        pytest.skip(f"torch {torch.__version__} has no fused step on the CPU (torch 2.4 has)")
    assert all(g["fused"] for g in load(save / "last.pth")["optimizer"]["param_groups"])
    no_fused_kernels(monkeypatch)
    run_train_in_process(monkeypatch, *RESUME_RUN, "--resume", "--data-dir", data,
                         "--save-dir", save)
    last = load(save / "last.pth")
    assert last["epoch"] == 2 and not any(g["fused"] for g in last["optimizer"]["param_groups"])
    for k, v in straight["model"].items():  # the foreach step rounds otherwise, nothing more
        torch.testing.assert_close(last["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_a_checkpoint_without_device_types_resumes_exactly(fp32_runs, tmp_path):
    """last.pth as earlier versions wrote it (random states without device types) still resumes bitwise."""
    from conftest import load, run_script, weight_differences
    data, straight, one = fp32_runs

    def older(ckpt):
        ckpt["rng"] = [{"torch": r["torch"], "aug": r["aug"]} for r in ckpt["rng"]]
    save = copy_run(one, tmp_path / "save", older)
    # --amp is a run-time setting (it follows the command line on --resume): fp32 again, as the run
    # began, also on a CPU with AMX, where auto would take bf16
    proc = run_script("train.py", "--resume", "--epochs", "2", "--amp", "off", "--data-dir", data, "--save-dir", save,
                      check=True)
    assert "afresh" not in proc.stdout
    assert not weight_differences(load(save / "last.pth")["model"], straight["model"])


@pytest.mark.parametrize("stored", ["device types", "none"])
def test_a_gpu_run_resumes_on_the_cpu_in_fp16(stored, fp32_runs, tmp_path):
    """A run begun on a GPU in fp32 (its augmentation generator's state is 16 bytes, it has no loss scaler
    state) continues on the CPU with --amp fp16: fresh streams, said in one line, and no traceback."""
    from conftest import load, run_script
    data, _, one = fp32_runs

    def from_gpu(ckpt):
        for r in ckpt["rng"]:
            r["aug"] = torch.zeros(16, dtype=torch.uint8)  # what torch.Generator("cuda").get_state() holds
            if stored == "device types":
                r.update(aug_device="cuda", device="cuda", device_rng=torch.zeros(16, dtype=torch.uint8))
            else:
                r.pop("aug_device", None), r.pop("device", None)
    save = copy_run(one, tmp_path / "save", from_gpu)
    assert load(save / "last.pth")["scaler"] == {}
    proc = run_script("train.py", "--resume", "--epochs", "2", "--amp", "fp16", "--data-dir", data, "--save-dir", save)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision float16 (--amp fp16)" in proc.stdout
    saved_on = "cuda" if stored == "device types" else "an accelerator"
    assert f"resume: the run continues on cpu: the augmentation (saved on {saved_on}) random streams start afresh" \
        in proc.stdout
    resumed = load(save / "last.pth")
    assert resumed["epoch"] == 2 and resumed["scaler"]["scale"] > 0  # fp16 ran, with loss scaling
    assert resumed["rng"][0]["aug_device"] == "cpu" and resumed["rng"][0]["device"] == "cpu"


@pytest.mark.quick
def test_the_device_stream_that_dropout_uses_is_saved_and_restored(monkeypatch):
    """Dropout on CUDA draws from the GPU's generator: it is saved with the device type, and restored on
    the same kind of device only (CUDA's functions stand in for a GPU here)."""
    gpu_state = {"now": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": gpu_state.update(now=s.clone()))
    gpu, aug = torch.device("cuda", 0), torch.Generator()
    state = devices.random_state(gpu, aug)
    assert state["device"] == "cuda" and torch.equal(state["device_rng"], gpu_state["now"])
    gpu_state["now"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the run drew more numbers
    assert devices.restore_random_state(state, gpu, aug) is None
    assert gpu_state["now"].tolist() == [1, 2, 3]
    on_cpu = devices.random_state(CPU, aug)
    message = devices.restore_random_state(on_cpu, gpu, aug)
    assert message == "resume: the run continues on cuda: the dropout (saved on cpu) random streams start afresh"
    assert gpu_state["now"].tolist() == [1, 2, 3]  # left as seeded, not overwritten with a CPU state


# ------------------------------------------------------------------------ out of memory, slow CPUs, Ctrl-C

@pytest.mark.parametrize("error", [
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate 392.00 MiB. GPU 0 has a total capacity of 15.89 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.61 GB, other allocations: 1.22 GB, max allowed: "
                 "18.13 GB). Tried to allocate 392.00 MB on private pool."),
    RuntimeError("NPU out of memory. Tried to allocate 392.00 MiB (NPU 0; 32.00 GiB total capacity)"),
])
def test_out_of_memory_is_one_line_with_a_batch_size_that_fits(error, monkeypatch, tmp_path, capsys):
    from conftest import make_mnist
    data = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    real = F.cross_entropy

    def cross_entropy(logits, *args, **kwargs):
        if logits.requires_grad:
            raise error
        return real(logits, *args, **kwargs)
    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    with pytest.raises(SystemExit) as exit_info:
        run_train_in_process(monkeypatch, *TINY, "--data-dir", data, "--save-dir", tmp_path / "save")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line[line.index("train.py: error:"):] for line in err.splitlines() if "error:" in line]  # after the bar
    assert len(errors) == 1 and errors[0].startswith("train.py: error: out of memory on cpu (")
    assert "at batch size 32: try --batch-size 16 (estimated to fit)" in errors[0]
    assert "Traceback" not in err


@pytest.mark.quick
def test_the_batch_that_fits_comes_from_the_estimate():
    c = {"depth": 16, "batch_norm": True, "dropout": 0.5, "width_div": 1, "image_size": 224, "optimizer": "sgd"}
    fixed32, per_image32 = devices.memory_estimate(c, 10, None)
    fixed16, per_image16 = devices.memory_estimate(c, 10, torch.bfloat16)
    assert 1.4 * 2**30 < fixed32 < 1.6 * 2**30  # 138M fp32 weights, gradients and momentum
    assert 1.8 < per_image32 / per_image16 < 2.1  # bf16 activations are half the size
    gib16 = 16 * 2**30
    fits = devices.batch_that_fits(128, gib16, fixed32, per_image32)
    assert 0 < fits < 128 and fixed32 + fits * per_image32 <= 0.9 * gib16 < fixed32 + (fits + 1) * per_image32
    assert devices.batch_that_fits(128, 2**50, fixed32, per_image32) == 64  # the estimate is wrong: halve
    assert devices.batch_that_fits(128, 2**30, fixed32, per_image32) == 0
    # a moving average of the weights (EMA_DECAY) is one more fp32 copy of the network
    fixed_ema, per_image_ema = devices.memory_estimate(c | {"ema_decay": 0.999}, 10, None)
    params = sum(p.numel() for p in net.build_model(c, 10).parameters())
    assert (fixed_ema - fixed32, per_image_ema) == (4 * params, per_image32)
    assert devices.is_out_of_memory(RuntimeError("MPS backend out of memory")) and \
        not devices.is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_slow_cpu_epoch_is_announced_with_the_cpu_recipe(monkeypatch, tmp_path, capsys):
    assert devices.slow_epoch_warning(CPU, 110.0, 469) == (
        "warning: at 110.0 s a step, an epoch of 469 steps takes about 14.3 hours on this CPU; a run of minutes: "
        "python train.py --image-size 32 --width-div 4 --epochs 1")
    assert devices.slow_epoch_warning(CPU, 1.0, 469) is None
    assert devices.slow_epoch_warning(torch.device("cuda"), 110.0, 469) is None
    # In a run: every CPU epoch is "slow" when the limit is 0 s; the line comes after the second step.
    from conftest import make_mnist
    data = make_mnist(tmp_path / "data", n_train=96, n_test=8)
    real = devices.slow_epoch_warning
    monkeypatch.setattr(devices, "slow_epoch_warning", lambda *a: real(*a, limit_seconds=0))
    run_train_in_process(monkeypatch, *TINY, "--data-dir", data, "--save-dir", tmp_path / "save")
    err = capsys.readouterr().err
    assert err.count("an epoch of 3 steps takes about") == 1
    assert "a run of minutes: python train.py --image-size 32 --width-div 4 --epochs 1" in err


@pytest.mark.quick
def test_signals_are_kept_for_the_save_and_a_second_ctrl_c_stops_at_once(monkeypatch, capsys):
    handlers = {s: signal.getsignal(s) for s in devices.STOP_SIGNALS}
    try:
        stop = runstate.Preemption(distributed=False)
        stop.install()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # SLURM's and torchrun's: the second must not end the process
        assert stop.signal == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second signal that is Ctrl-C: stop now
        under_torchrun = runstate.Preemption(distributed=True)
        under_torchrun.install()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the terminal's and torchrun's copy of one Ctrl-C
        assert under_torchrun.signal == signal.SIGINT
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "main", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "train.py: stopped by a second Ctrl-C; last.pth holds the last save\n"


@pytest.mark.quick
@pytest.mark.parametrize("width_div,size,amp", [(1, 224, None), (4, 32, None), (16, 64, torch.bfloat16)])
def test_the_memory_estimate_per_image_against_the_layer_outputs(width_div, size, amp):
    """An independent count: the bytes of every layer's output (forward hooks on a real model, the
    in-place ReLUs left out) and the input, per image. The estimate also counts what autograd keeps
    besides them (max-pool indices in int64, dropout masks, views), so it lies 1.3-1.9x above;
    an estimate 3x too large or too small would not."""
    c = {"depth": 16, "batch_norm": True, "dropout": 0.5, "width_div": width_div,
         "image_size": size, "optimizer": "sgd"}
    _, per_image = devices.memory_estimate(c, 10, amp)
    model = net.build_model(c, 10).to(amp or torch.float32)
    total = []
    for m in model.modules():
        if not list(m.children()) and not (isinstance(m, torch.nn.ReLU) and m.inplace):
            m.register_forward_hook(lambda m, i, o: total.append(o.numel() * o.element_size()))
    x = torch.zeros(2, 3, size, size, dtype=amp or torch.float32)
    with torch.no_grad():
        model(x)
    layer_outputs = (sum(total) + x.numel() * x.element_size()) / 2
    assert 1.3 < per_image / layer_outputs < 1.9


STEP_FAULTS = """
import resource, sys, torch, torch.nn.functional as F
import devices, net
if sys.argv[1] == "prepared":
    devices.prepare(torch.device("cpu"))
model = net.vgg(16, 10, True, width_div=4).to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                            fused=devices.fused_step(torch.device("cpu")))  # as train.py
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
def step():
    with torch.autocast("cpu", torch.bfloat16):
        F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt: glibc's (Linux)")
def test_a_cpu_run_reuses_the_memory_its_steps_free():
    """devices.prepare on a CPU, as train.py calls it: after two steps of the recipes' net (1/4
    width, batch 128, 32 px) the next steps take their buffers from memory the process already
    has. Without it they take 8-22 thousand fresh pages from the kernel every step on most runs
    (each a page fault; 146 thousand at full width), with it 0-342 (a 2-core Xeon; docs/bench.md).
    Each in a fresh process, so that this one's allocator is left as it was."""
    def faults_per_step(mode, **env):
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=300, check=True).stdout
        return int(out.split()[-1])
    assert faults_per_step("prepared") < 2000
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):  # huge pages: 512x fewer faults
        # The control: every block of 128 kB or more mapped on its own and handed back when freed,
        # glibc's default threshold held fixed. Left to itself glibc raises that threshold as
        # blocks are freed, so on some runs its steps also took no fresh page (0 in 1 of 6 runs
        # with torch 2.3.1) and the control read as if prepare() had run.
        assert faults_per_step("unprepared", MALLOC_MMAP_THRESHOLD_="131072") > 4000
