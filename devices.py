"""Where a run computes: the device, its precision, torchrun's processes, memory, random streams."""

import ctypes
import gc
import os
import platform
import signal
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from errors import UserError
from net import build_model

def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto: CUDA, then Ascend NPU (when torch_npu is installed), then Apple MPS, then CPU.
    A device asked for by name that is not there is a UserError."""
    kind = name.split(":")[0]
    if kind not in ("auto", "cuda", "npu", "mps", "cpu"):
        raise UserError(f"unknown device {name!r}; choose auto, cuda, npu, mps or cpu")
    has_npu = False
    if kind in ("auto", "npu"):
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)
            has_npu = torch.npu.is_available()
        except ImportError:
            pass
    available = {"cuda": torch.cuda.is_available(), "npu": has_npu,
                 "mps": torch.backends.mps.is_available(), "cpu": True}
    if kind == "auto":
        kind = next(k for k in ("cuda", "npu", "mps", "cpu") if available[k])
    elif not available[kind]:
        raise UserError(f"--device {name}: no {kind.upper()} device is available on this machine")
    if ":" in name:
        index = name.split(":", 1)[1]
        count = {"cuda": torch.cuda.device_count,
                 "npu": lambda: torch.npu.device_count()}.get(kind, lambda: 1)()
        if not index.isdigit() or int(index) >= count:
            raise UserError(f"--device {name}: this machine has {count} {kind.upper()} device(s), "
                            f"numbered {kind}:0 to {kind}:{count - 1}")
        return torch.device(kind, int(index))
    if kind in ("cuda", "npu") and local_rank is not None:
        return torch.device(kind, local_rank)
    return torch.device(kind)


def use_device(device: torch.device) -> None:
    """Make a numbered GPU/NPU the current one: synchronize(), capability checks and pinned memory
    otherwise act on device 0, whatever --device says."""
    if device.type in ("cuda", "npu") and device.index is not None:
        getattr(torch, device.type).set_device(device)


def prepare(device: torch.device) -> None:
    """Make `device` the current one, and let cuDNN pick its fastest kernels for training (on a
    CPU: keep_freed_memory)."""
    use_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        # fixed input shapes: let cuDNN pick its fastest convolutions
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let the C library keep the memory PyTorch frees for the next allocation (Linux with glibc;
    elsewhere nothing happens and this returns False). A training step on a CPU frees and allocates
    the same buffers every step, and by default glibc gives the large ones back to the kernel and
    asks for them again: every page of them is then a page fault, a fifth of the full-width step at
    32 px. With this the step took 0.41 s instead of 0.51 s (1/4 width: 63 ms instead of 75-82)
    on a 2-core Xeon with AMX, for 13% more peak memory at full width (docs/bench.md)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # every block from the heap (none mapped on its own), and the heap never handed back
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32 (see amp_choice for the reason)."""
    return amp_choice(device, mode)[0]


def amp_choice(device: torch.device, mode: str) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why), for the header line of a run.

    auto: bf16 on NVIDIA GPUs of compute capability 8.0 and newer (Ampere) and on NPUs with bf16
    (Ascend 910B); fp16 with loss scaling on older ones (T4, V100, RTX 20xx answer
    is_bf16_supported() with True, but emulate bf16 in slow kernels). On a CPU, bf16 where it trained
    VGG16 faster than fp32: with AMX (Xeon), and with AVX512-BF16 on an AMD CPU (1.4-2.2x on an EPYC
    of family 25, Zen 4); fp32 elsewhere, also on a Xeon with AVX512-BF16 but no AMX, where bf16
    trained at 0.66-0.83x of fp32's speed (docs/bench.md, "bf16 on the CPU").
    """
    if mode == "off":
        return None, "--amp off"
    if mode in ("bf16", "fp16"):
        return (torch.bfloat16 if mode == "bf16" else torch.float16), f"--amp {mode}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"auto: compute capability {major}.{minor}"
        return torch.float16, f"auto: compute capability {major}.{minor} has no fast bf16"
    if device.type == "npu":
        if torch.npu.is_bf16_supported():
            return torch.bfloat16, "auto: this NPU has bf16"
        return torch.float16, "auto: this NPU has no bf16"
    if device.type == "cpu":
        amx = cpu_has("amx_tile")
        if amx:
            return torch.bfloat16, "auto: this CPU has AMX"
        if cpu_has("avx512_bf16") and cpu_vendor() == "AuthenticAMD":
            return torch.bfloat16, "auto: this AMD CPU has AVX512-BF16"
        if amx is None:
            return None, "auto: neither this torch nor the OS says whether this CPU has AMX"
        return None, "auto: this CPU has no AMX"
    return None, f"auto: fp32 on {device.type.upper()}"


def cpu_has(feature: str) -> bool | None:
    """Whether the CPU has `feature` (amx_tile, avx512_bf16): as torch tells
    (torch.cpu._is_<feature>_supported), else by the flags Linux lists in /proc/cpuinfo (torch 2.3
    cannot ask for AMX), else None: unknown."""
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    if probe is not None:
        return bool(probe())
    flags = cpu_flags()
    return feature in flags if flags is not None else None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo), or None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD"), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:  # Linux
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()  # Windows: "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in processor), "")


def fused_step(device: torch.device) -> bool | None:
    """True where this torch has a fused SGD and AdamW step for the device (CUDA; the CPU from torch
    2.4 on): one pass over the weights instead of one per operation, 1.1x faster a step for the
    1/4-width net at 32 px on a CPU (docs/bench.md). None elsewhere (torch's default, one kernel
    per operation per list). Found out by trying one step on a one-element tensor, once per device
    type: torch checks the device only at the first step."""
    if device.type not in _FUSED:
        _FUSED[device.type] = _try_fused_step(device) if device.type in ("cpu", "cuda") else None
    return _FUSED[device.type]


_FUSED: dict[str, bool | None] = {}


def _try_fused_step(device: torch.device) -> bool | None:
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros(1, device=device)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
        return True
    except Exception:  # RuntimeError ("requires all the params to be ... of supported devices"), ...
        return None


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device`, as that device runs it fastest and at all: channels_last on CUDA and
    the CPU (faster convolutions on both, measured on the CPU), and on devices whose adaptive pool
    takes only divisible sizes (MPS) a pool that computes the same bins another way."""
    model = model.to(device)
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    if device.type in DIVISIBLE_POOL_ONLY and isinstance(getattr(model, "avgpool", None),
                                                         torch.nn.AdaptiveAvgPool2d):
        model.avgpool = DivisiblePool(model.avgpool.output_size)
    return model


# Devices whose adaptive average pool only takes sizes where one side divides the other (pytorch
# issue 143864): on MPS, 7x7 from a 2x2 .. 6x6 or 8x8 map (64-223 px and 256 px inputs) fails.
DIVISIBLE_POOL_ONLY = ("mps",)


class DivisiblePool(torch.nn.Module):
    """nn.AdaptiveAvgPool2d for those devices: a size their pool rejects is pooled by two matrix
    products with the same bins; the others go to the device's own pool. No parameters, so a
    model's state dict is the same with either."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size
        self.pool = torch.nn.AdaptiveAvgPool2d(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out_h, out_w = torch.nn.modules.utils._pair(self.output_size)
        if pool_supported(h, out_h) and pool_supported(w, out_w):
            return self.pool(x)
        return torch.einsum("ih,bchw,jw->bcij", pool_matrix(h, out_h, x), x,
                            pool_matrix(w, out_w, x))


def pool_supported(size: int, out: int = 7) -> bool:
    """Whether a divisible-only adaptive pool takes `size` -> `out`."""
    return out % size == 0 if size < out else size % out == 0


def pool_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size): row i averages the bin [floor(i * size / out), ceil((i + 1) * size / out)),
    the bins of nn.AdaptiveAvgPool2d."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m.to(device=like.device, dtype=like.dtype)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """One code path for mixed precision: a real autocast context, or a no-op one."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------- torchrun

# Signals that ask a run to save and stop: Ctrl-C, a scheduler's or torchrun's SIGTERM, a closed
# terminal or ssh session (SIGHUP), and the pre-emption warning some schedulers send (SIGUSR1).
# Windows has only the first two.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
                     if hasattr(signal, name))


def setup_distributed() -> tuple[int, int, int | None]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, None) for a plain run."""
    if "RANK" not in os.environ:
        return 0, 1, None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device, name: str, local_rank: int) -> None:
    """Join torchrun's process group on `device` (--device `name`), after checking that it can
    work."""
    if ":" in name:
        raise UserError(f"--device {name}: under torchrun each process takes the device of its "
                        "LOCAL_RANK; use --device cuda, npu or cpu (or auto)")
    if device.type == "mps":
        raise UserError("torchrun runs on CUDA, NPU or CPU devices (not Apple MPS): "
                        "use --device cpu")
    if device.type in ("cuda", "npu"):
        count = torch.cuda.device_count() if device.type == "cuda" else torch.npu.device_count()
        if local_rank >= count:
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes "
                            f"on this node but it has {count} {device.type.upper()} device(s): "
                            f"use --nproc_per_node={count}")
        getattr(torch, device.type).set_device(device)
    backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
    dist.init_process_group(backend)


def leave_process_group() -> None:
    """Leave torchrun's process group, however the run ends: a process that exits with the group
    still up (one line from rank 0, a quiet exit from the others) could abort in its destructor
    ("terminate called without an active exception", SIGABRT) instead of exiting with its code."""
    if dist.is_available() and dist.is_initialized():
        # a DDP wrapper sits in a reference cycle: collected now, while the group is up, it does not
        # take gloo's work objects into the interpreter's teardown, where they can abort it too
        gc.collect()
        try:
            dist.destroy_process_group()
        except Exception:  # the others may have gone already; this process ends anyway
            pass


def check_same_settings(settings: dict, ignore: tuple[str, ...] = ()) -> None:
    """Every process of a torchrun run must train with rank 0's settings (one started with another
    --lr would train apart without a word, one with another --width-div fail deep inside DDP).
    Rank 0 names the first difference in one line; the others exit quietly."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, settings)
    first = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        keys = [k for k in {**first, **other} if k not in ignore and other.get(k) != first.get(k)]
        if keys:
            if dist.get_rank() != 0:
                raise SystemExit(2)
            key = keys[0]
            raise UserError(f"process {rank} of this torchrun run was started with "
                            f"--{key.replace('_', '-')} {other.get(key)!r}, process 0 with "
                            f"{first.get(key)!r}: start every process with the same settings")


def sum_across(values: list[float], device, distributed: bool) -> list[float]:
    """Sum per-process totals over all processes (identity for a plain run). float32, since neither
    MPS nor HCCL (Ascend) has float64; counts stay exact up to 2**24 images."""
    if not distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------- random streams

def random_state(device: torch.device, aug_gen: torch.Generator) -> dict:
    """This process's random streams, each with the device type it belongs to: the CPU's, the
    augmentation generator's, and the device's own, which dropout on CUDA/NPU/MPS draws from."""
    state = {"torch": torch.get_rng_state(), "aug": aug_gen.get_state(),
             "aug_device": aug_gen.device.type, "device": device.type}
    if device.type != "cpu":
        state["device_rng"] = getattr(torch, device.type).get_rng_state(device)
    return state


def restore_random_state(state: dict, device: torch.device,
                         aug_gen: torch.Generator) -> str | None:
    """Put the streams of random_state back. Streams of another device type cannot be (a CUDA
    generator state is 16 bytes, a CPU one 5,056): those start afresh, and the returned line says
    so. Checkpoints that stored no device types hold CPU and augmentation states only."""
    try:
        return _restore_random_state(state, device, aug_gen)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"the checkpoint's random-generator state does not fit its device type "
                        f"({str(e).splitlines()[0][:100]}): it is damaged or was edited") from None


def _restore_random_state(state: dict, device: torch.device,
                          aug_gen: torch.Generator) -> str | None:
    torch.set_rng_state(state["torch"])
    aug_device = state.get("aug_device")
    if aug_device is None:  # no device type stored: tell a CPU generator's state by its size
        cpu_size = torch.Generator().get_state().numel()
        aug_device = "cpu" if state["aug"].numel() == cpu_size else "an accelerator"
    fresh = []
    if aug_device == aug_gen.device.type:
        aug_gen.set_state(state["aug"])
    else:
        fresh.append(f"augmentation (saved on {aug_device})")
    if device.type != "cpu":
        if state.get("device") == device.type:
            getattr(torch, device.type).set_rng_state(state["device_rng"], device)
        else:
            fresh.append(f"dropout (saved on {state.get('device', 'an unrecorded device')})")
    if fresh:
        return (f"resume: the run continues on {device.type}: "
                f"the {' and '.join(fresh)} random streams start afresh")
    return None


# -------------------------------------------------------------------------------- memory and speed

def memory_estimate(c: dict, num_classes: int, amp: torch.dtype | None) -> tuple[int, int]:
    """(bytes that do not depend on the batch, bytes per image) of a training step, estimated on the
    meta device (shapes only, nothing computed): weights, gradients, optimizer state and the weights'
    moving average (EMA_DECAY) in fp32 plus the autocast copies of the weights; per image, every
    tensor the forward pass creates (autograd keeps nearly all of them for the backward pass in a
    VGG), in the autocast dtype, and the input."""
    from torch.utils._python_dispatch import TorchDispatchMode
    # BatchNorm needs more than one image; 3 tells activations from weights by their first dimension
    n = 3
    with torch.device("meta"):
        model = build_model(c, num_classes).to(amp or torch.float32)
        x = torch.empty(n, 3, c["image_size"], c["image_size"], dtype=amp or torch.float32)
    params = sum(p.numel() for p in model.parameters())
    optimizer_copies = 2 if c.get("optimizer") == "adamw" else 1
    fixed = params * 4 * (2 + optimizer_copies) + (params * 2 if amp is not None else 0)
    if c.get("ema_decay"):  # the moving average of the weights (EMA_DECAY), in fp32
        fixed += params * 4

    class CountActivations(TorchDispatchMode):
        created = x.numel() * x.element_size()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.overloadpacket.__name__.endswith("_"):  # in-place ops (ReLU) create nothing
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n:
                        CountActivations.created += t.numel() * t.element_size()
            return out
    with CountActivations():
        model(x)
    return fixed, CountActivations.created // n


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has (its total, not what is free now); None where unknown."""
    try:
        if device.type in ("cuda", "npu"):
            return getattr(torch, device.type).mem_get_info(device)[1]
        if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return torch.mps.recommended_max_memory()
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS and Ascend NPUs a RuntimeError saying 'out of
    memory'."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or (isinstance(e, RuntimeError)
                                        and "out of memory" in str(e).lower())


def batch_that_fits(batch_size: int, total: int | None, fixed: int, per_image: int) -> int:
    """A batch size below the one that ran out of memory: the estimate for 90% of the device's
    memory when it is smaller, else half (the estimate leaves out the allocator's fragmentation and
    workspaces)."""
    estimate = (int(0.9 * total) - fixed) // per_image if total else batch_size
    return max(0, estimate) if estimate < batch_size else batch_size // 2


@contextmanager
def out_of_memory_explained(config: dict, device: torch.device, amp, classes: int):
    """Out of memory inside the block becomes a UserError: one line saying where, at which batch
    size, and a batch size estimated to fit."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(out_of_memory_message(config, device, amp, classes)) from None


def out_of_memory_message(c: dict, device: torch.device, amp, classes: int) -> str:
    """One line for an out-of-memory error: where, at which batch size, and one estimated to fit."""
    fixed, per_image = memory_estimate(c, classes, amp)
    total = device_memory(device)
    fits = batch_that_fits(c["batch_size"], total, fixed, per_image)
    has = f" ({total / 2**30:.1f} GiB)" if total else ""
    advice = (f"try --batch-size {fits} (estimated to fit)" if fits else
              "not even one image fits: try a smaller --image-size or a larger --width-div")
    precision = ("" if amp is not None else
                 ", or --amp bf16/fp16 (about half the activations)")
    return f"out of memory on {device}{has} at batch size {c['batch_size']}: {advice}{precision}"


def slow_epoch_warning(device: torch.device, step_seconds: float, steps: int,
                       limit_seconds: float = 3600.0) -> str | None:
    """On a CPU, one line when an epoch would take longer than limit_seconds at this step time."""
    if device.type != "cpu" or step_seconds * steps <= limit_seconds:
        return None
    return (f"warning: at {step_seconds:.1f} s a step, an epoch of {steps} steps takes about "
            f"{step_seconds * steps / 3600:.1f} hours on this CPU; a run of minutes: "
            "python train.py --image-size 32 --width-div 4 --epochs 1")
