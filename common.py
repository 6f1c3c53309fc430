"""What train.py, test.py and bench.py share: the command line, the device, the data, the checkpoints.

Nothing here runs on import. Errors a user can cause are raised as UserError, which `run_main`
turns into one line on stderr and exit code 2.
"""

import argparse
import errno
import math
import os
import pickle
import signal
import sys
import tokenize
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from net import CFGS, vgg


class UserError(Exception):
    """A mistake the user can fix (bad option, missing file, ...): reported in one line, exit code 2."""


def run_main(main) -> None:
    """Call main(); a UserError becomes `prog: error: message` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; one line is easier to read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --lr must not silently mean --lr-something

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _constant_comments(source_file: str) -> dict[str, str]:
    """Map NAME -> its trailing comment, for top-level lines of the form `NAME = value  # comment`."""
    comments, name, at_line_start = {}, None, True
    with open(source_file, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.NAME and at_line_start and tok.start[1] == 0:
                name = tok.string
            elif tok.type == tokenize.COMMENT and name and name.isupper():
                comments[name] = tok.string.lstrip("# ").strip()
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
            at_line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                                         tokenize.ENCODING)
    return comments


def parse_config(defaults: dict, source_file: str, description: str, argv=None,
                 extra=lambda parser: None) -> tuple[dict, argparse.Namespace]:
    """Build the command line from the UPPERCASE constants of a script.

    Each constant NAME becomes --name (underscores as dashes) with the constant's type and the
    comment on its line as help, so the block at the top of the script stays the single source.
    Returns (config with lowercase keys, namespace with any extra options).
    """
    comments = _constant_comments(source_file)
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, default=value, action=argparse.BooleanOptionalAction, help=comments.get(name, ""))
        else:
            kind = float if isinstance(value, float) else type(value)
            parser.add_argument(flag, default=value, type=kind, metavar=kind.__name__.upper(),
                                help=comments.get(name, ""))
    extra(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    config = {name.lower(): getattr(args, name.lower()) for name in defaults}
    # Which settings were typed on the command line (--resume reports only those when they differ).
    typed = {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_") for a in argv if a.startswith("--")}
    args.explicit = typed & config.keys()
    return config, args


DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")


# Seeds derived from the run's seed (seed * 1_000_003 + epoch, ...) must stay within the 64 bits
# torch's generators take; 2**32 - 1 leaves room, and is the range most tools use.
SEED_MAX = 2**32 - 1
# A VGG at 2048 px keeps about 13 GB of activations per training image (counted from its layer sizes):
# beyond that not even one image fits on a device.
MAX_IMAGE_SIZE = 2048
INT_SETTINGS = ("image_size", "workers", "depth", "width_div", "epochs", "batch_size", "step_epochs", "seed",
                "keep", "log_every")
FLOAT_SETTINGS = ("dropout", "lr", "momentum", "weight_decay", "warmup_epochs", "step_gamma",
                  "save_every_minutes")


def check_seed(name: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{name} must be an integer from 0 to {SEED_MAX}, got {seed!r}")


def check_path(name: str, value) -> None:
    """An empty string would silently mean the current folder."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} is empty: give a path (. for the current folder)")


def check_config(c: dict) -> None:
    """Reject values that cannot work, before any data is read or any file is written."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    # Types first: a checkpoint's stored config is checked too, and may have been edited.
    for key in INT_SETTINGS:
        need(isinstance(c[key], int) and not isinstance(c[key], bool),
             f"--{key.replace('_', '-')} must be an integer, got {c[key]!r}")
    for key in FLOAT_SETTINGS:
        flag = "--" + key.replace("_", "-")
        need(isinstance(c[key], (int, float)) and not isinstance(c[key], bool),
             f"{flag} must be a number, got {c[key]!r}")
        need(math.isfinite(c[key]), f"{flag} must be a finite number, got {c[key]}")
    for key in ("batch_norm", "compile"):
        need(isinstance(c[key], bool), f"--{key.replace('_', '-')} must be true or false, got {c[key]!r}")
    check_path("--data-dir (or DATA_DIR)", c["data_dir"])
    check_path("--save-dir", c["save_dir"])
    check_seed("--seed", c["seed"])
    need(c["image_size"] <= MAX_IMAGE_SIZE, f"--image-size must be at most {MAX_IMAGE_SIZE} (a VGG's "
         f"activations at {c['image_size']} px do not fit in any device's memory), got {c['image_size']}")
    need(c["log_every"] >= 1, f"--log-every must be at least 1, got {c['log_every']}")
    # Upper bounds: beyond them a value fails deep inside torch (64-bit overflows) or the OS.
    need(c["batch_size"] <= 2**31 - 1, f"--batch-size must be at most {2**31 - 1}, got {c['batch_size']}")
    need(c["epochs"] <= 1_000_000,  # epoch shuffles are seeded by seed * 1_000_003 + epoch
         f"--epochs must be at most 1000000, got {c['epochs']}")
    need(c["workers"] <= 256, f"--workers must be at most 256, got {c['workers']}")
    need(c["step_gamma"] > 0, f"--step-gamma must be positive, got {c['step_gamma']}")
    need(c["dataset"] in DATASETS, f"unknown dataset {c['dataset']!r}; choose one of {', '.join(DATASETS)}")
    need(c["depth"] in CFGS, f"unknown VGG depth {c['depth']}; choose one of {', '.join(map(str, CFGS))}")
    need(c["width_div"] >= 1 and 64 % c["width_div"] == 0,
         f"--width-div must divide 64 (1, 2, 4, 8, 16, 32, 64), got {c['width_div']}")
    need(c["image_size"] >= 32, f"--image-size must be at least 32 (five 2x2 pools), got {c['image_size']}")
    need(c["batch_size"] >= 1, f"--batch-size must be at least 1, got {c['batch_size']}")
    need(c["epochs"] >= 1, f"--epochs must be at least 1, got {c['epochs']}")
    need(c["lr"] > 0, f"--lr must be positive, got {c['lr']}")
    need(0 <= c["momentum"] < 1, f"--momentum must be in [0, 1), got {c['momentum']}")
    need(c["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {c['weight_decay']}")
    need(0 <= c["dropout"] < 1, f"--dropout must be in [0, 1), got {c['dropout']}")
    need(c["optimizer"] in OPTIMIZERS, f"unknown optimizer {c['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}")
    need(c["schedule"] in SCHEDULES, f"unknown schedule {c['schedule']!r}; choose one of {', '.join(SCHEDULES)}")
    need(c["amp"] in AMP_MODES, f"unknown amp mode {c['amp']!r}; choose one of {', '.join(AMP_MODES)}")
    need(c["augment"] in ("auto", "on", "off"), f"--augment must be auto, on or off, got {c['augment']!r}")
    need(c["workers"] >= 0, f"--workers must be >= 0, got {c['workers']}")
    need(c["keep"] >= 0, f"--keep must be >= 0 (0 keeps all), got {c['keep']}")
    if "val_fraction" in c:
        need(0 <= c["val_fraction"] < 1, f"--val-fraction must be in [0, 1), got {c['val_fraction']}")
    need(c["warmup_epochs"] >= 0 and c["step_epochs"] >= 1 and c["save_every_minutes"] >= 0,
         "--warmup-epochs and --save-every-minutes must be >= 0, --step-epochs >= 1")


# ---------------------------------------------------------------------------------------------- device

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
        count = {"cuda": torch.cuda.device_count, "npu": lambda: torch.npu.device_count()}.get(kind, lambda: 1)()
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


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32 (see amp_choice for the reason)."""
    return amp_choice(device, mode)[0]


def amp_choice(device: torch.device, mode: str) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why), for the header line of a run.

    auto: bf16 on NVIDIA GPUs of compute capability 8.0 and newer (Ampere) and on NPUs with bf16
    (Ascend 910B); fp16 with loss scaling on older ones (T4, V100, RTX 20xx answer is_bf16_supported()
    with True, but emulate bf16 in slow kernels); bf16 on CPUs with AMX; fp32 elsewhere. A CPU with
    AVX512-BF16 but no AMX trains VGG16 slower in bf16 than in fp32 (measured on a 2-core Xeon).
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
        has_amx = hasattr(torch.cpu, "_is_amx_tile_supported") and torch.cpu._is_amx_tile_supported()
        if has_amx:
            return torch.bfloat16, "auto: this CPU has AMX"
        return None, "auto: this CPU has no AMX"
    return None, f"auto: fp32 on {device.type.upper()}"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """One code path for mixed precision: a real autocast context, or a no-op one."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ------------------------------------------------------------------------------------------------ data

# Per-channel mean and std of each training split (pixels in [0, 1]). "folder" uses ImageNet's.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# What torchvision looks for under the data root, for the error message when it is not there.
EXPECTED_FILES = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashion-mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
}


def _torchvision_split(name: str, root: str, train: bool, download: bool = True):
    """The torchvision dataset object; downloads when absent (if `download`), one line when that fails."""
    from torchvision import datasets
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:
        pass  # not on disk: try to download it
    except OSError as e:  # e.g. a name too long for the file system
        raise UserError(f"cannot read {name} under {root}: {e.strerror or e}") from None
    if not download:
        raise UserError(f"{name} not found under {Path(root).resolve()}; expected {EXPECTED_FILES[name]} "
                        "there (set DATA_DIR or --data-dir to the dataset root)")
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        return cls(root, train=train, download=True)
    except Exception as e:  # offline, read-only folder, bad checksum: all end the same way
        raise UserError(f"{name} not found under {Path(root).resolve()} and could not be downloaded "
                        f"({type(e).__name__}); expected {EXPECTED_FILES[name]} there "
                        "(set DATA_DIR or --data-dir to the dataset root)") from None


class DeviceImages:
    """A whole split as a uint8 tensor on the training device, preprocessed a batch at a time there.

    Keeping 28x28 or 32x32 uint8 images on the device (MNIST is 47 MB, CIFAR-10 150 MB) avoids
    DataLoader workers, PIL and the copy of 224 px floats (600 KB an image) for every batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], mean, std,
                 image_size: int, device: torch.device, pad: int = 4, flip: bool = True):
        self.images = images.to(device)      # (N, C, h, w) uint8, C = 1 or 3
        self.labels = labels.to(device)      # (N,) int64
        self.classes = classes
        self.image_size = image_size
        self.device = device
        self.pad = pad                       # random-crop padding, in pixels of the stored image
        self.flip = flip                     # horizontal flips (not for digits: a mirrored 2 is no 2)
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, c, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def preprocess(self, x: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None):
        """uint8 (B, C, h, w) on the device -> normalized float (B, 3, S, S), channels_last."""
        x = x.float().div_(255)
        if augment:  # random crop with zero padding (and horizontal flip), at the stored resolution
            b, _, h, w = x.shape
            p = self.pad
            x = F.pad(x, (p, p, p, p))
            g = generator.device if generator is not None else x.device  # MPS draws on a CPU generator
            dy = torch.randint(0, 2 * p + 1, (b, 1, 1), device=g, generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b, 1, 1), device=g, generator=generator).to(x.device)
            cols = torch.arange(w, device=x.device).view(1, 1, w)
            if self.flip:
                flip = (torch.rand(b, 1, 1, device=g, generator=generator) < 0.5).to(x.device)
                cols = torch.where(flip, w - 1 - cols, cols)
            cols = cols + dx                                                        # (B, 1, w)
            rows = torch.arange(h, device=x.device).view(1, h, 1) + dy              # (B, h, 1)
            x = x[torch.arange(b, device=x.device).view(b, 1, 1), :, rows, cols]    # (B, h, w, C)
            x = x.permute(0, 3, 1, 2)
        # Normalizing before the resize is the same result (bilinear weights sum to 1) on 64x fewer pixels.
        # IMAGE_SIZE >= 32 only ever upsamples 28/32 px images, where antialias changes nothing: without it,
        # MPS (torch < 2.7) has a kernel and Ascend 910A does not fall back to the CPU.
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 channels: a view, copied once just below
        return x.contiguous(memory_format=torch.channels_last)

    def batches(self, indices: torch.Tensor, batch_size: int, augment: bool = False,
                generator: torch.Generator | None = None, steps: int | None = None):
        """Yield (images, labels) for `indices` in order, `batch_size` at a time (see split_batches)."""
        for idx in split_batches(indices.to(self.device), batch_size, steps):
            yield self.preprocess(self.images[idx], augment, generator), self.labels[idx]

    def raw(self, i: int):
        """Sample i as the dataset stores it, as a PIL image (28x28 grey or 32x32 colour)."""
        from PIL import Image
        img = self.images[i].cpu()
        return Image.fromarray(img[0].numpy()) if img.shape[0] == 1 else Image.fromarray(img.permute(1, 2, 0).numpy())


class FolderImages:
    """Your own images: ImageFolder train/ or test/ read through a DataLoader with workers."""

    def __init__(self, root: Path, classes_expected, mean, std, image_size: int, device: torch.device,
                 workers: int):
        from torchvision import datasets, transforms
        self.device = device
        self.workers = workers
        normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        resize = transforms.Resize((image_size, image_size), antialias=True)
        # loader=_open_rgb: ImageFolder's own loader converts to RGB first, clipping 16-bit grey to white.
        self.eval_set = datasets.ImageFolder(root, loader=_open_rgb, transform=transforms.Compose(
            [transforms.Lambda(_rgb), resize, *normalize]))
        self.train_set = datasets.ImageFolder(root, loader=_open_rgb, transform=transforms.Compose(
            [transforms.Lambda(_rgb), resize, transforms.RandomCrop(image_size, padding=image_size // 8),
             transforms.RandomHorizontalFlip(), *normalize]))
        self.classes = self.eval_set.classes
        if classes_expected is not None and self.classes != list(classes_expected):
            raise UserError(f"{root} has classes {self.classes}, but the training set had {list(classes_expected)}")
        self.labels = torch.tensor(self.eval_set.targets)
        self._loaders = {}

    def __len__(self) -> int:
        return len(self.eval_set)

    def batches(self, indices: torch.Tensor, batch_size: int, augment: bool = False,
                generator: torch.Generator | None = None, steps: int | None = None):
        """Yield (images, labels) for `indices` in order (see split_batches). The augmentation of image i
        is seeded by (generator's seed, i): it does not depend on which worker loads it or when, so
        a resumed run sees the same crops and flips as an uninterrupted one."""
        if augment not in self._loaders:  # built once, so persistent workers stay alive across epochs
            sampler = _BatchSampler()
            loader = torch.utils.data.DataLoader(
                _SeededItems(self.train_set if augment else self.eval_set), batch_sampler=sampler,
                num_workers=self.workers, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0, worker_init_fn=_ignore_stop_signals,
                generator=torch.Generator())  # else each epoch's iterator draws from the dropout stream
            self._loaders[augment] = (loader, sampler)
        loader, sampler = self._loaders[augment]
        base = generator.initial_seed() if augment and generator is not None else None
        sampler.batches = [[(i, None if base is None else (base * 1_000_003 + i) % 2**63) for i in b.tolist()]
                           for b in split_batches(indices, batch_size, steps)]
        for x, y in loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def raw(self, i: int):
        from PIL import Image
        with Image.open(self.eval_set.samples[i][0]) as im:
            return _rgb(im)

    def leave_out(self, paths: set[str]) -> None:
        """Drop these files from the split (unreadable ones the user chose to skip)."""
        for ds in (self.eval_set, self.train_set):
            ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in paths]
            ds.targets = [t for _, t in ds.samples]
        self.labels = torch.tensor(self.eval_set.targets)


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: Ctrl-C and SIGTERM reach the whole process group (and SLURM signals every
    process), but only the main process may act on them; a worker that died would end the run before
    last.pth is written."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _SeededItems(torch.utils.data.Dataset):
    """Item (i, seed): sample i of `dataset`, its random transforms seeded by `seed` (None: unseeded)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed = key
        if seed is None:
            return self.dataset[i]
        with torch.random.fork_rng(devices=[]):  # leaves the process's own stream (dropout) untouched
            torch.manual_seed(seed)
            return self.dataset[i]


class _BatchSampler(torch.utils.data.Sampler):
    """Yields whatever batches of indices were set last: the epoch's shuffled shard for this process."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def eight_bit(img):
    """Grey images of more than 8 bits (mode I;16 or I: 16-bit PNG and TIFF scans) scaled to 8-bit "L";
    convert() would clip every value above 255 to white. Values that all fit in 8 bits are kept."""
    if not img.mode.startswith("I"):
        return img
    import numpy as np
    from PIL import Image
    wide = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.round(wide / (257 if wide.max() > 255 else 1)).clip(0, 255).astype(np.uint8))


def _rgb(img):
    return eight_bit(img).convert("RGB")


def _open_rgb(path):
    from PIL import Image
    with Image.open(path) as im:
        return _rgb(im)


# ------------------------------------------------------------------------------------ folder datasets

# A folder split is kept on the device as uint8 (served like MNIST and CIFAR-10, no workers, no PIL per
# epoch) when its images, decoded at their stored size, take at most this share of the memory free at
# start-up, both on the host that decodes them and on the device (divided among a node's processes).
# Larger folders are read through DataLoader workers every epoch.
FOLDER_MEMORY_SHARE = 0.25
# Unreadable image files named in the one-line error (the rest are counted).
BAD_FILES_SHOWN = 5


def _free_memory(device: torch.device) -> int:
    """Bytes free for a split's tensor: available host memory (it is decoded there) and, for an
    accelerator, free device memory; shared by the processes torchrun starts on this node."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            host = 0  # unknown: take the DataLoader path, which needs no such memory
    free = host
    if device.type in ("cuda", "npu"):
        free = min(free, getattr(torch, device.type).mem_get_info(device)[0])
    return free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _is_master() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _probe(path: str):
    """(width, height) of an image file from its header, or the reason it cannot be opened."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size, None
    except Exception as e:  # missing, not an image, too many pixels (DecompressionBombError), ...
        return None, _reason(e, path)


def _check(path: str):
    """None if the whole file can be decoded, else the reason. Cheaper than decoding: JPEGs are decoded
    at 1/8 scale (every byte of the stream is still read), PNGs have their chunk checksums verified."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        return None
    except Exception as e:
        return _reason(e, path)


def _decode(path: str, size: tuple[int, int]):
    """(uint8 HxWx3 array, None), or (None, reason): the file as the eval transform reads it (RGB, and
    resized to `size` = (width, height) by the same PIL resize when it has another size)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = _rgb(im)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)  # what transforms.Resize does to a PIL image
        return np.asarray(im), None
    except Exception as e:
        return None, _reason(e, path)


def _reason(e: Exception, path: str) -> str:
    """Why a file failed, without its path (the line names it once)."""
    text = f"{type(e).__name__}: {e}".replace(f": '{path}'", "").replace(f" '{path}'", "")
    return text.replace("\n", " ")[:200]


def _chunked(fn, items: list, workers: int, desc: str) -> list:
    """[fn(item) for item in items], by `workers` processes (0: this one), with a progress bar on rank 0."""
    from functools import partial
    from tqdm import tqdm
    out = []
    bar = tqdm(total=len(items), desc=desc, disable=not _is_master() or len(items) < 1000, leave=False,
               dynamic_ncols=True)
    chunks = [items[i:i + 256] for i in range(0, len(items), 256)]
    if workers == 0 or len(chunks) < 2:
        results = map(partial(_map, fn), chunks)
    else:
        import concurrent.futures
        import multiprocessing
        fork = "fork" in multiprocessing.get_all_start_methods()  # no re-import of torch per worker
        ctx = multiprocessing.get_context("fork" if fork else None)
        pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx)
        results = pool.map(partial(_map, fn), chunks)
    try:
        for part in results:
            out += part
            bar.update(len(part))
    finally:
        bar.close()
        if workers and len(chunks) >= 2:
            pool.shutdown(cancel_futures=True)
    return out


def _map(fn, chunk):
    return [fn(*item) if isinstance(item, tuple) else fn(item) for item in chunk]


def bad_files_line(bad: list[tuple[str, str]], split: Path) -> str:
    shown = "; ".join(f"{Path(path).relative_to(split)} ({reason})" for path, reason in bad[:BAD_FILES_SHOWN])
    more = f"; and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
    return f"{len(bad)} unreadable image file(s) under {split}: {shown}{more}"


def load_folder(split: Path, classes_expected, mean, std, c: dict, device: torch.device):
    """A folder split, every file checked first: as a DeviceImages when its decoded images fit
    FOLDER_MEMORY_SHARE of the free memory, else as a FolderImages (DataLoader workers).
    Unreadable files stop the run with one line naming them, or are left out with c["skip_bad_images"]."""
    import time
    from torchvision import datasets
    t0 = time.perf_counter()
    listing = datasets.ImageFolder(split, loader=lambda path: path)  # lists the files, reads none
    if classes_expected is not None and listing.classes != list(classes_expected):
        raise UserError(f"{split} has classes {listing.classes}, but the training set had "
                        f"{list(classes_expected)}")
    paths = [path for path, _ in listing.samples]
    workers = c["workers"]
    probed = _chunked(_probe, paths, workers, f"checking {split}")
    bad = [(p, why) for p, (_, why) in zip(paths, probed) if why]
    sizes = {size for size, _ in probed if size}
    # One shared size no larger than the network's input is kept as it is (the device upsamples a batch
    # at a time, where antialiasing changes nothing); larger or mixed sizes are brought to the input size
    # on decoding, as the DataLoader path's Resize does, so the device never has to shrink an image.
    side = c["image_size"]
    w, h = sizes.pop() if len(sizes) == 1 else (side, side)
    if w > side or h > side:
        w, h = side, side
    need = len(paths) * 3 * w * h
    fits = need <= FOLDER_MEMORY_SHARE * _free_memory(device)
    ok = [i for i, (_, why) in enumerate(probed) if not why]
    if fits:
        decoded = _chunked(_decode, [(paths[i], (w, h)) for i in ok], workers, f"decoding {split}")
        bad += [(paths[i], why) for i, (_, why) in zip(ok, decoded) if why]
    else:
        checked = _chunked(_check, [paths[i] for i in ok], workers, f"checking {split}")
        bad += [(paths[i], why) for i, why in zip(ok, checked) if why]
    if bad:
        bad.sort()
        if not c.get("skip_bad_images", False):
            if not _is_master():
                sys.exit(2)  # rank 0 says it once for all processes
            raise UserError(bad_files_line(bad, split) + " (fix or remove them, or skip them with "
                            "--skip-bad-images)")
        if _is_master():
            print(f"skipping {bad_files_line(bad, split)}", file=sys.stderr, flush=True)
    bad_paths = {p for p, _ in bad}
    if not len(paths) - len(bad_paths):
        raise UserError(f"{split} holds no readable images")
    labels = torch.tensor([t for p, t in listing.samples if p not in bad_paths])
    if fits:
        import numpy as np
        images = torch.from_numpy(np.stack([a for a, _ in decoded if a is not None])).permute(0, 3, 1, 2)
        if _is_master():
            print(f"{split}: {len(labels):,} images of {w}x{h} decoded into {device} memory "
                  f"({need / 2**20:,.1f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
        # Crop padding of 1/8 of the side, as the DataLoader path pads its image_size-sided images.
        return DeviceImages(images.contiguous(), labels, listing.classes, mean, std, c["image_size"], device,
                            pad=min(w, h) // 8)
    if _is_master():
        print(f"{split}: {len(labels):,} images, {need / 2**30:,.1f} GB decoded, more than "
              f"{FOLDER_MEMORY_SHARE:.0%} of the free memory: read by {workers} DataLoader workers "
              "every epoch",
              flush=True)
    data = FolderImages(split, classes_expected, mean, std, c["image_size"], device, workers)
    if bad_paths:
        data.leave_out(bad_paths)
    return data


def load_split(c: dict, train: bool | str, device: torch.device, classes=None, download: bool = True):
    """The training or test split named by config c, ready to hand out batches on `device`
    (train="val": a folder dataset's val/ folder). download=False: a torchvision dataset that is not
    on disk is an error, and nothing is created."""
    root = Path(c["data_dir"])
    mean, std = STATS[c["dataset"]]
    if c["dataset"] == "folder":
        split = root / (train if isinstance(train, str) else "train" if train else "test")
        if not split.is_dir():
            raise UserError(f"{split} is not a folder; --dataset folder expects {root}/train/CLASS/*.jpg "
                            f"and {root}/test/CLASS/*.jpg")
        try:
            return load_folder(split, classes, mean, std, c, device)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"cannot read images under {split}: {e}") from None
    ds = _torchvision_split(c["dataset"], str(root), train, download)
    images = torch.as_tensor(ds.data)
    if images.ndim == 3:             # MNIST: (N, 28, 28)
        images = images.unsqueeze(1)
    else:                            # CIFAR-10: (N, 32, 32, 3) numpy, HWC
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    classes = [name.split(" - ")[0] for name in ds.classes]  # MNIST's "7 - seven" -> "7"
    return DeviceImages(images.contiguous(), labels, classes, mean, std, c["image_size"], device,
                        flip=c["dataset"] not in ("mnist", "fashion-mnist"))


class Subset:
    """Part of a split (DeviceImages or FolderImages), named by the split's own indices: batches(i) hands
    out the images at positions i of this part, so shuffles, shards and resume work on it unchanged."""

    def __init__(self, data, indices: torch.Tensor):
        self.data = data
        self.indices = indices
        self.classes = data.classes
        self.labels = data.labels[indices.to(data.labels.device)]

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, indices: torch.Tensor, *args, **kwargs):
        return self.data.batches(self.indices[indices], *args, **kwargs)

    def raw(self, i: int):
        return self.data.raw(int(self.indices[i]))


def validation_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices of a split of n images: round(fraction * n) of them held out
    (at least one when fraction > 0). Drawn from the seed alone, so every process of a run and every
    --resume of it holds out the same images. Both sorted: a folder is then read in file order."""
    n_val = max(1, round(fraction * n)) if fraction > 0 else 0
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)  # apart from shard_indices' seeds
    perm = torch.randperm(n, generator=g)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_train_val(c: dict, device: torch.device):
    """(training split, validation split or None) for config c. A folder dataset with DATA_DIR/val/ uses
    it as the validation split and the whole of train/; otherwise c["val_fraction"] of the training
    images are held out (0: none)."""
    train = load_split(c, True, device)
    if c["dataset"] == "folder" and (Path(c["data_dir"]) / "val").is_dir():
        return train, load_split(c, "val", device, classes=train.classes)
    if c["val_fraction"] <= 0:
        return train, None
    train_idx, val_idx = validation_indices(len(train), c["val_fraction"], c["seed"])
    if len(train_idx) == 0:
        raise UserError(f"--val-fraction {c['val_fraction']} leaves no training images of {len(train)}")
    return Subset(train, train_idx), Subset(train, val_idx)


def augment_enabled(c: dict) -> bool:
    """auto: on for cifar10 and folder (natural images), off for the digit and clothing datasets."""
    return c["augment"] == "on" or (c["augment"] == "auto" and c["dataset"] in ("cifar10", "folder"))


def shard_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's part of the epoch's shuffle. Every process draws the same permutation
    (seeded by seed and epoch), so the shards are disjoint and together cover all n samples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[rank::world]


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in an epoch, the same on every process: the shards differ by at most one
    sample, and counting from the shortest keeps a process from stepping alone (its gradient
    all-reduce would wait forever); a longer shard's extra sample joins its last batch."""
    return math.ceil((n // world) / batch_size)


def split_batches(indices: torch.Tensor, batch_size: int, steps: int | None = None) -> list[torch.Tensor]:
    """`indices` cut into batches of batch_size; with `steps`, exactly that many, the last one taking the rest."""
    if steps is None:
        return list(indices.split(batch_size))
    bounds = [i * batch_size for i in range(steps)] + [len(indices)]
    return [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------------------------------------ model

def build_model(c: dict, num_classes: int):
    return vgg(c["depth"], num_classes, c["batch_norm"], c["dropout"], c["width_div"])


def memory_estimate(c: dict, num_classes: int, amp: torch.dtype | None) -> tuple[int, int]:
    """(bytes that do not depend on the batch, bytes per image) of a training step, estimated on the meta
    device (shapes only, nothing computed): weights, gradients and optimizer state in fp32 plus the
    autocast copies of the weights; per image, every tensor the forward pass creates (autograd keeps
    nearly all of them for the backward pass in a VGG), in the autocast dtype, and the input."""
    from torch.utils._python_dispatch import TorchDispatchMode
    n = 3  # BatchNorm needs more than one image; 3 tells activations from weights by their first dimension
    with torch.device("meta"):
        model = build_model(c, num_classes).to(amp or torch.float32)
        x = torch.empty(n, 3, c["image_size"], c["image_size"], dtype=amp or torch.float32)
    params = sum(p.numel() for p in model.parameters())
    optimizer_copies = 2 if c.get("optimizer") == "adamw" else 1
    fixed = params * 4 * (2 + optimizer_copies) + (params * 2 if amp is not None else 0)

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
    """CUDA raises torch.OutOfMemoryError; MPS and Ascend NPUs a RuntimeError saying 'out of memory'."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def batch_that_fits(batch_size: int, total: int | None, fixed: int, per_image: int) -> int:
    """A batch size below the one that ran out of memory: the estimate for 90% of the device's memory
    when it is smaller, else half (the estimate leaves out the allocator's fragmentation and workspaces)."""
    estimate = (int(0.9 * total) - fixed) // per_image if total else batch_size
    return max(0, estimate) if estimate < batch_size else batch_size // 2


# ------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.
    A crash or a full disk at any moment leaves the previous `path` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise UserError(f"could not write {path}: {reason}; the previous checkpoint is unchanged") from None


def _fsync_dir(folder: Path) -> None:
    try:  # makes the rename itself durable; not possible on every OS or file system
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by train.py. weights_only=True: a file cannot run code when loaded."""
    path = Path(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as e:  # a name too long for the file system, a folder that cannot be searched
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not exists:
        raise UserError(f"checkpoint {path} does not exist (train first: python train.py)")
    if not is_file:  # a folder, a FIFO (which would block), a device
        raise UserError(f"checkpoint {path} is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors and plain values; refusing to load it "
                        "(weights_only=True)") from None
    except Exception:  # arbitrary bytes make the unpickler fail in many ways (EOFError, IndexError, ...)
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "classes"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (no model/config/classes)")
    return ckpt


def model_state(model: torch.nn.Module) -> dict:
    """The state dict of the plain network: without DDP's `module.` or torch.compile's `_orig_mod.`."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load weights; a checkpoint of another architecture or class count is a UserError saying which."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing or len(state) != len(own):
        raise UserError(f"{path} holds a different architecture ({len(state)} tensors, expected {len(own)}; "
                        f"e.g. {(missing or sorted(set(state) - set(own)))[:1]} does not match)")
    for k, v in own.items():
        if state[k].shape != v.shape:
            if k == "classifier.6.weight" and state[k].shape[1:] == v.shape[1:]:
                raise UserError(f"{path} was trained for {state[k].shape[0]} classes, but {v.shape[0]} are expected")
            raise UserError(f"{path} holds a different architecture: {k} has shape {tuple(state[k].shape)}, "
                            f"expected {tuple(v.shape)} (another depth, width or batch-norm setting)")
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ plots

def plot_curves(csv_path, png_path) -> None:
    """Redraw png_path from train.py's metrics.csv: loss and accuracy per epoch, train, validation and test.

    Drawn on a bare matplotlib Figure, which renders with Agg: no display is needed, and no pyplot
    means the backend of whatever program imports this module is left alone. A plot that cannot be
    drawn (matplotlib missing, unreadable CSV) is a warning on stderr, never the end of a training run.
    """
    import csv
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp{os.getpid()}.png")  # train.py deletes stale .*.tmp* files
    try:
        from matplotlib.figure import Figure
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        fig = Figure(figsize=(7, 2.8), dpi=100, layout="constrained")
        ax_loss, ax_acc = fig.subplots(1, 2)
        # A run without a validation split (or one begun before them) has no or empty val_ columns.
        has_val = bool(rows) and all(r.get("val_acc") for r in rows)
        for split, marker in (("train", "o"), ("val", "^"), ("test", "s")):
            if split == "val" and not has_val:
                continue
            ax_loss.plot(epochs, [float(r[f"{split}_loss"]) for r in rows], marker=marker, label=split)
            ax_acc.plot(epochs, [100 * float(r[f"{split}_acc"]) for r in rows], marker=marker, label=split)
        for ax, name in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy (%)")):
            ax.set(xlabel="epoch", ylabel=name)
            ax.xaxis.get_major_locator().set_params(integer=True)  # no epoch 1.5
            ax.grid(alpha=0.3)
            ax.legend()
        if has_val:  # the epoch train.py keeps as best.pth: the first with the highest validation accuracy
            best = max(range(len(rows)), key=lambda i: (float(rows[i]["val_acc"]), -i))
            fig.suptitle(f"best.pth: epoch {epochs[best]}, validation {float(rows[best]['val_acc']):.2%}, "
                         f"test {float(rows[best]['test_acc']):.2%}", fontsize=10)
        elif rows:
            fig.suptitle(f"last epoch {epochs[-1]}: test accuracy {float(rows[-1]['test_acc']):.2%}",
                         fontsize=10)
        fig.savefig(tmp)
        os.replace(tmp, png_path)  # a viewer never sees a half-written file
    except (ImportError, OSError, ValueError, KeyError) as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not draw {png_path}: {e}", file=sys.stderr)
