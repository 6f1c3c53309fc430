"""Training throughput of three input pipelines for the same VGG16, measured in one run.

    python bench.py           # full-width VGG16, 32 px, batch 64, MNIST under DATA_DIR
    python bench.py --quick   # a small run (under 3 minutes on a 2-core CPU); CI runs this
    DATA_DIR=../shared/data python bench.py --device cpu --json bench.json
    python bench.py --device cuda --image-size 224 --batch-size 128 --compile
    python bench.py --help    # every option with its default

The pipelines, each training the same architecture at the same batch size with SGD + momentum:
  (a) this repo's: the split kept on the device as uint8 (imagedata.DeviceImages), batches cut from
      a seeded shuffle and normalized/resized there, channels_last, bf16/fp16 autocast where
      supported, SGD's fused step on CPU and CUDA, below 64 px the first Linear on the 1x1 map
      (net.VGG.first_linear_on_1x1), and with bf16 on a CPU with AMX the convolutions on small
      maps and their gradients as matrix products (cpuconv): the training step of train.py.
  (b) the original tutorial's: torchvision MNIST with Resize + ToTensor per sample in PIL, a
      DataLoader, then per batch a numpy round trip that copies the 1 channel into 3, fp32. The
      model is this repo's net.vgg with its layers run as written (the tutorial's own had a softmax
      in forward and ReLUs only after pooling).
  (c) torchvision's: models.vgg16 (vgg16_bn with --batch-norm) with the standard transforms
      (Resize, Grayscale(3), ToTensor, Normalize) through a DataLoader, fp32.

For each: images/s (batch size / median step time after the warm-up steps; a step includes fetching
its batch), peak memory, and the model's achieved FLOP/s, set against the fp32 matmul FLOP/s
measured in the same run. FLOPs per image are counted by torch.utils.flop_counter on one
forward + backward of the network as written (convolutions and matmuls; BatchNorm, ReLU and pooling
count as 0), the same for all three, so work that (a) skips shows as speed, not as fewer FLOPs.

Each pipeline runs in a fresh process of its own, as each would run as a script: its memory,
peak and allocator settings are its own. So (a) keeps the memory each step frees for the next
one, as train.py does on a CPU (devices.keep_freed_memory, glibc), while (b) and (c) run with the
C library's defaults, as the tutorial and torchvision's examples do: there every step takes its
fresh gradients (VGG16's first Linear alone is 102M parameters) from the kernel again, page
fault by page fault.

Measured results, with their commands and machines: docs/bench.md.
"""

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cli
import cpuconv
import devices
import imagedata
import net
from errors import UserError
from imagedata import DATASETS
from net import vgg

# ----------------------------------------------------------------------------------------- settings
# Edit these, or override any of them on the command line: python bench.py --batch-size 128
DATASET: Literal["mnist", "fashion-mnist", "synthetic"] = "mnist"  # synthetic: random uint8 images
                                                                   # of MNIST shape; with --quick a
                                                                   # missing dataset falls back to
                                                                   # it
DATA_DIR = os.environ.get("DATA_DIR", "data")  # dataset root (environment variable DATA_DIR, else
                                               # ./data)
IMAGE_SIZE = 32          # input side in pixels (>= 32); --quick: 32
BATCH_SIZE = 64          # images per step, the same for all pipelines; --quick: 64
WIDTH_DIV = 1            # divide every channel count by this, 1 = VGG16; --quick: 4
BATCH_NORM = True        # BatchNorm after each convolution (train.py's default); (c) is then
                         # vgg16_bn
STEPS = 10               # timed steps per pipeline, the median step time is reported; --quick: 3
WARMUP = 2               # untimed steps before them (allocator, oneDNN/cuDNN kernel choice);
                         # --quick: 1
WORKERS: int | None = None  # DataLoader workers for (b) and (c); None: 0 on a CPU (workers would
                            # take its cores), 4 on an accelerator (the CPU only feeds it)
DEVICE = "auto"          # auto (cuda > npu > mps > cpu) | cuda | cuda:1 | npu | mps | cpu
AMP: Literal["auto", "bf16", "fp16", "off"] = "auto"  # autocast dtype of (a); auto: bf16 where it
                                                      # is faster
COMPILE = False          # torch.compile the model of (a)
QUICK = False            # small settings for CI (the --quick values above; 5 matmuls), synthetic
                         # data if the dataset is absent; a value typed on the command line wins
JSON: str | None = None  # also write the results to this JSON file
# --------------------------------------------------------------------------------------------------
DEFAULTS = cli.settings(globals())  # the block above ends here: a constant below is no setting

# What each value must be (a failure is one line, exit code 2).
RULES = [
    ("image_size", f"from {net.MIN_IMAGE_SIZE} to {net.MAX_IMAGE_SIZE} pixels",
     lambda v: net.MIN_IMAGE_SIZE <= v <= net.MAX_IMAGE_SIZE),
    ("batch_size", f"from 1 to {2**31 - 1}", lambda v: 1 <= v <= 2**31 - 1),
    ("width_div", f"one of {', '.join(map(str, net.WIDTH_DIVS))} (it divides 64)",
     lambda v: v in net.WIDTH_DIVS),
    ("steps", "at least 1", lambda v: v >= 1), ("warmup", ">= 0", lambda v: v >= 0),
    ("workers", "from 0 to 256", lambda v: 0 <= v <= 256),
]

# Fixed for every measurement.
QUICK_SETTINGS = {"image_size": 32, "batch_size": 64, "width_div": 4, "warmup": 1, "steps": 3}
DEPTH = 16                # VGG16 (configuration D) in all three pipelines
NUM_CLASSES = 10          # MNIST and Fashion-MNIST have 10
LR = 0.01                 # SGD learning rate (the speed does not depend on it)
MOMENTUM = 0.9            # SGD momentum
SEED = 0                  # weights, shuffles and synthetic data
WORKERS_CPU = 0           # DataLoader workers for (b) and (c) on a CPU, where they would take its
                          # cores
WORKERS_ACCEL = 4         # ... and on a GPU/NPU/MPS, where the CPU only feeds the device
MATMUL_N = {"cpu": 2048, "other": 4096}  # side of the square fp32 matmul that measures the peak
MATMUL_REPS = {False: 10, True: 5}       # timed matmuls (without, with --quick); the median counts
DISTURBED_CORES = 0.2     # other processes busier than this (in cores) during a pipeline: warn
UNSTEADY = 1.25           # matmul speed varying more than this within the run: warn


def parse_args(argv=None):
    """The settings above as the command line gives them; --quick's values for those not typed."""
    _, args = cli.parse(DEFAULTS, __doc__.splitlines()[0], argv=argv, rules=RULES)
    if args.quick:
        for name, value in QUICK_SETTINGS.items():
            if name not in args.given:
                setattr(args, name, value)
    args.matmul_reps = MATMUL_REPS[args.quick]
    return args


# ---------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    """Wait for the device, so a step's time is its real time and not the time to queue it."""
    if device.type in ("cuda", "npu", "mps"):
        getattr(torch, device.type).synchronize()


def peak_memory(device: torch.device) -> int:
    """Bytes: the most device memory torch allocated on a GPU/NPU; the process's peak RSS otherwise
    (interpreter, libraries, dataset and model together, so not comparable with the GPU number).
    Each pipeline runs in a process of its own, so either is that pipeline's alone."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def machine_cpu_seconds() -> float | None:
    """CPU seconds used by every process since boot (Linux /proc/stat, steal included), else
    None."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), median of `reps` after 3 untimed ones."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(3 + reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[3:])


def flops_per_image(build, image_size: int, batch_size: int) -> float:
    """Forward + backward FLOPs of one training image, counted on the meta device (shapes only, no
    compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = AsWritten(build())  # the FLOPs of the network as written, whatever (a) skips
        x = torch.empty(batch_size, 3, image_size, image_size)
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch_size


class AsWritten(nn.Module):
    """A network run as its layers are written: on a 1x1 map too, the adaptive pool's 49 copies of
    each value and the whole first Linear (net.VGG.forward takes a shortcut there)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.classifier(torch.flatten(m.avgpool(m.features(x)), 1))


def time_steps(batches, train_step, batch_size: int, warmup: int, steps: int,
               device: torch.device) -> tuple[list[float], float | None]:
    """Seconds per step, fetching the batch included, for the `steps` steps after `warmup` untimed
    ones; and how many cores other processes kept busy meanwhile (None where unknown). On a shared
    machine that number tells a disturbed measurement: two threads that wait for each other at every
    operation slow down far more than the share of the CPU they lose."""
    times = []
    batches = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            machine0, own0, wall0 = machine_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        t0 = time.perf_counter()
        x, y = next(batches, (None, []))
        if len(y) != batch_size:
            raise UserError(f"the training split holds only {i} full batches of {batch_size}; "
                            "lower --steps, --warmup or --batch-size")
        train_step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    machine1 = machine_cpu_seconds()
    others = None if machine1 is None else \
        max(0.0, (machine1 - machine0) - (own_cpu_seconds() - own0)) / (time.perf_counter() - wall0)
    return times[warmup:], others


# --------------------------------------------------------------------------------------------- data

class SyntheticMNIST(torch.utils.data.Dataset):
    """Random 28x28 uint8 images and labels, handed out exactly as torchvision.datasets.MNIST does
    (a PIL image in mode L through the transform), for machines without the dataset."""

    def __init__(self, n: int, seed: int, transform=None):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        self.targets = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.classes = [str(k) for k in range(NUM_CLASSES)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.data[i].numpy())), int(self.targets[i])


def torchvision_dataset(args, transform, synthetic_size: int):
    """The training split as torchvision reads it (real, or synthetic when args.dataset says so)."""
    if args.dataset == "synthetic":
        return SyntheticMNIST(synthetic_size, SEED, transform)
    from torchvision import datasets
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[args.dataset]
    return cls(args.data_dir, train=True, transform=transform, download=False)


def resolve_dataset(args) -> str:
    """'' when the dataset is on disk (or synthetic was asked for); else fall back (--quick) or
    stop."""
    if args.dataset == "synthetic":
        return "synthetic uint8 images of MNIST shape (asked for)"
    try:
        torchvision_dataset(args, None, 0)
        return ""
    except RuntimeError:  # torchvision: "Dataset not found"; this script never downloads
        where = f"{args.dataset} not found under {Path(args.data_dir).resolve()} (expected " \
                f"{DATASETS[args.dataset].files})"
        if not args.quick:
            raise UserError(f"{where}; set DATA_DIR or --data-dir, "
                            "or run with --dataset synthetic") from None
        args.dataset = "synthetic"
        return f"synthetic uint8 images of MNIST shape, because {where}"


def loader(dataset, args, device: torch.device):
    """A shuffling DataLoader as the tutorial and torchvision's examples build it."""
    workers = (args.workers if args.workers is not None
               else (WORKERS_CPU if device.type == "cpu" else WORKERS_ACCEL))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                       num_workers=workers,
                                       generator=torch.Generator().manual_seed(SEED),
                                       drop_last=True)


# ------------------------------------------------------------------------------ the three pipelines

def sgd(model, fused: bool | None = None):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, fused=fused)


def pipeline_repo(args, device, amp, synthetic_size):
    """(a) imagedata.DeviceImages: uint8 on the device, preprocessed there; channels_last;
    autocast."""
    mean, std = DATASETS.get(args.dataset, DATASETS["mnist"]).stats
    if args.dataset == "synthetic":
        raw = SyntheticMNIST(synthetic_size, SEED)
        data = imagedata.DeviceImages(raw.data.unsqueeze(1), raw.targets, raw.classes, mean, std,
                                      args.image_size, device)
    else:
        config = {"dataset": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size,
                  "workers": 0}
        data = imagedata.load_split(config, True, device)
    indices = imagedata.shard_indices(len(data), SEED, epoch=0)
    # augmentation off, as train.py has it for MNIST
    batches = data.batches(indices, args.batch_size)

    def build():
        return vgg(DEPTH, NUM_CLASSES, args.batch_norm, width_div=args.width_div)

    torch.manual_seed(SEED)
    model = build().to(device)
    if device.type in ("cuda", "cpu"):  # as train.py: faster convolutions on both
        model = model.to(memory_format=torch.channels_last)
    if not args.compile:  # as train.py
        cpuconv.use_where_faster(model, device, amp)
    optimizer = sgd(model, devices.fused_step(device))  # as train.py
    # fp16 needs loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    train_model = torch.compile(model) if args.compile else model

    def step(x, y):
        with devices.autocast(device, amp):
            loss = F.cross_entropy(train_model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return batches, step, build


def pipeline_tutorial(args, device, amp, synthetic_size):
    """(b) The original tutorial: PIL resize per sample, DataLoader, numpy 1 -> 3 channels per
    batch, fp32."""
    from torchvision import transforms
    transform = transforms.Compose([transforms.Resize(args.image_size), transforms.ToTensor()])
    train_loader = loader(torchvision_dataset(args, transform, synthetic_size), args, device)

    def batches():
        for x, y in train_loader:
            # (B, 1, S, S) -> (B, 3, S, S), as the tutorial did
            x = np.concatenate([x.numpy()] * 3, axis=1)
            yield torch.from_numpy(x).to(device), y.to(device)

    def build():
        return vgg(DEPTH, NUM_CLASSES, args.batch_norm, width_div=args.width_div)

    torch.manual_seed(SEED)  # the layers as written, as the tutorial's model had them
    return batches(), fp32_step(AsWritten(build()).to(device)), build


def fp32_step(model: nn.Module):
    """The plain training step of (b) and (c): fp32, zero_grad() before backward (which frees the
    gradients: torch's default since 2.0)."""
    optimizer = sgd(model)
    criterion = nn.CrossEntropyLoss()

    def step(x, y):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def torchvision_vgg16(batch_norm: bool, width_div: int) -> nn.Module:
    """torchvision's VGG16. It has no width option, so for width_div > 1 the features come from its
    own make_layers on the thinner table and the classifier (hard-coded for 512 channels) is
    replaced to match."""
    from torchvision import models
    if width_div == 1:
        return (models.vgg16_bn if batch_norm else models.vgg16)(num_classes=NUM_CLASSES)
    cfg = [v if v == "M" else v // width_div for v in models.vgg.cfgs["D"]]
    channels, hidden = 512 // width_div, 4096 // width_div
    with torch.device("meta"):
        # built without memory: the full-width classifier would count in the peak RSS
        model = models.vgg.VGG(models.vgg.make_layers(cfg, batch_norm), num_classes=NUM_CLASSES)
        model.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, NUM_CLASSES))
    # meta again when flops_per_image builds it
    # where new tensors go now (torch.get_default_device ignores a device context before torch 2.4)
    model = model.to_empty(device=torch.empty(0).device)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            m.reset_parameters()  # PyTorch's default init; the speed does not depend on it
    return model


def pipeline_torchvision(args, device, amp, synthetic_size):
    """(c) torchvision's model and standard transforms, DataLoader, fp32."""
    from torchvision import transforms
    mean, std = DATASETS.get(args.dataset, DATASETS["mnist"]).stats
    transform = transforms.Compose([
        transforms.Resize(args.image_size), transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(), transforms.Normalize(mean * 3, std * 3)])
    train_loader = loader(torchvision_dataset(args, transform, synthetic_size), args, device)
    batches = ((x.to(device), y.to(device)) for x, y in train_loader)

    def build():
        return torchvision_vgg16(args.batch_norm, args.width_div)

    torch.manual_seed(SEED)
    return batches, fp32_step(build().to(device)), build


PIPELINES = [
    ("a", "this repo: uint8 on device", pipeline_repo),
    ("b", "original tutorial", pipeline_tutorial),
    ("c", "torchvision vgg16 + DataLoader", pipeline_torchvision),
]


def measure(args, key: str, device_name: str, amp, synthetic_size: int) -> dict:
    """Pipeline `key`, set up and timed in this process (a fresh one: in_fresh_process)."""
    device = devices.pick_device(device_name)  # on an NPU, imports torch_npu in this process too
    devices.use_device(device)
    # as train.py (devices.prepare); the tutorial and torchvision's examples leave glibc as it is
    kept = key == "a" and device.type == "cpu" and devices.keep_freed_memory()
    torch.backends.cudnn.benchmark = key == "a"  # the tutorial and plain torchvision leave it off
    make = next(make for k, _, make in PIPELINES if k == key)
    batches, step, build = make(args, device, amp, synthetic_size)
    times, others = time_steps(batches, step, args.batch_size, args.warmup, args.steps, device)
    memory = peak_memory(device)
    del batches, step
    return {"step_seconds": times, "other_processes_cores": others, "peak_memory_bytes": memory,
            "flops_per_image": flops_per_image(build, args.image_size, args.batch_size),
            "freed_memory_kept": kept, "process_id": os.getpid()}


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned: nothing inherited but the arguments); its
    exceptions, a UserError among them, are raised here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------------------------- main

def human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    args = parse_args()
    device = devices.pick_device(args.device)
    # else a sync on cuda:1 waits for GPU 0 and the timings measure launches only
    devices.use_device(device)
    amp = devices.amp_dtype(device, args.amp)
    data_note = resolve_dataset(args)
    synthetic_size = args.batch_size * (args.warmup + args.steps)  # only what the steps consume
    precision = str(amp).replace("torch.", "") if amp else "fp32"
    width = "full width" if args.width_div == 1 else f"width/{args.width_div}"
    print(f"bench: VGG{DEPTH}{'_bn' if args.batch_norm else ''} ({width}), {args.image_size} px, "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per pipeline"
          f"{' (--quick)' if args.quick else ''}")
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"(a) in {precision}{' + torch.compile' if args.compile else ''}"
          f", (b) and (c) in fp32; each pipeline in a fresh process")
    print(f"data: {data_note or f'{args.dataset} under {Path(args.data_dir).resolve()}'}",
          flush=True)

    # ---- the machine's fp32 matmul rate, the yardstick for the model FLOP/s, measured before each
    # pipeline and after the last: a shared or throttled machine changes speed, and shows it here.
    torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 on GPUs too (the default)
    n = MATMUL_N["cpu" if device.type == "cpu" else "other"]
    peak_amp = matmul_flops(device, amp, n, args.matmul_reps) if amp else None
    peaks = [matmul_flops(device, torch.float32, n, args.matmul_reps)]

    # ---- each pipeline in a fresh process of its own, one after the other
    results = []
    for key, name, _ in PIPELINES:
        t0 = time.perf_counter()
        r = in_fresh_process(measure, args, key, str(device), amp, synthetic_size)
        times, others = r["step_seconds"], r["other_processes_cores"]
        img_s = args.batch_size / statistics.median(times)
        peaks.append(matmul_flops(device, torch.float32, n, args.matmul_reps))
        fp32_peak = (peaks[-2] + peaks[-1]) / 2  # the machine's speed just before and just after
        results.append({
            "pipeline": key, "name": name, "images_per_s": img_s, **r,
            "model_flops_per_s": r["flops_per_image"] * img_s, "matmul_fp32_flops_per_s": fp32_peak,
            "fraction_of_fp32_matmul": r["flops_per_image"] * img_s / fp32_peak,
        })
        busy = "" if others is None else f"; other processes kept {others:.2f} cores busy meanwhile"
        print(f"({key}) {name}: median step {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}), "
              f"{time.perf_counter() - t0:.1f} s in all"
              f"{', freed memory kept for reuse' if r['freed_memory_kept'] else ''}{busy}",
              flush=True)
    original = next(r for r in results if r["pipeline"] == "b")["images_per_s"]
    for r in results:
        r["ratio_to_original"] = r["images_per_s"] / original

    # ---- the table
    mem_kind = ("max_memory_allocated" if device.type in ("cuda", "npu") else
                "peak RSS of the pipeline's process")
    print()
    print(f"{'pipeline':<38} {'img/s':>9} {'x orig':>7} {'peak mem':>10} {'TFLOP/s':>9} "
          f"{'of fp32 mm':>10}")
    for r in results:
        print(f"{'(' + r['pipeline'] + ') ' + r['name']:<38} {r['images_per_s']:>9.1f} "
              f"{r['ratio_to_original']:>6.2f}x "
              f"{human_bytes(r['peak_memory_bytes']):>10} {r['model_flops_per_s'] / 1e12:>9.4f} "
              f"{r['fraction_of_fp32_matmul']:>10.2f}")
    print(f"fp32 matmul {n}x{n}: {' '.join(f'{p / 1e12:.4f}' for p in peaks)} TFLOP/s before "
          f"(a), (b), (c) and after (median of {args.matmul_reps} each)"
          + (f"; {precision} matmul: {peak_amp / 1e12:.4f} TFLOP/s" if peak_amp else ""))
    print(f"model: {results[0]['flops_per_image'] / 1e9:.3f} GFLOP per training image "
          f"(forward + backward, FlopCounterMode); peak mem = {mem_kind}")
    disturbed = [r["pipeline"] for r in results
                 if (r["other_processes_cores"] or 0) > DISTURBED_CORES]
    if disturbed:
        print(f"warning: other processes used the CPU while ({', '.join(disturbed)}) ran; "
              "those numbers are low: run again on a quiet machine")
    if max(peaks) > UNSTEADY * min(peaks):
        print(f"warning: the machine's matmul speed changed by {max(peaks) / min(peaks):.1f}x "
              "during the run (a shared or throttled CPU); the pipelines were not measured under "
              "the same conditions")

    if args.json:
        out = {"config": {k: v for k, v in vars(args).items() if k != "given"},
               "device": str(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "precision_a": precision,
               "data": data_note or args.dataset, "memory": mem_kind,
               "matmul_fp32_flops_per_s": peaks, "matmul_n": n,
               "matmul_amp_flops_per_s": peak_amp, "pipelines": results}
        try:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {args.json}: {e.strerror or e}") from None
        print(f"wrote {args.json}")


if __name__ == "__main__":
    cli.run_main(main)
