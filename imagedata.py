"""Images from disk to a normalized batch on the device: the dataset table, splits and batches.

MNIST, Fashion-MNIST and CIFAR-10, and folders of your own images that fit in memory, are kept on
the device as uint8 (DeviceImages) and preprocessed there a batch at a time; larger folders are
decoded by DataLoader workers every epoch (StreamedImages) and then preprocessed by the very same
code, so a seed gives the same batches either way. Both hand out the images at given indices, in
order, so shuffles, shards across processes and resumes work the same on either.
"""

import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import devices
import folders
from cli import console
from errors import UserError


@dataclass(frozen=True)
class Dataset:
    """What the code needs to know about one dataset. Adding a dataset is one entry in DATASETS."""
    mean: tuple[float, ...]        # per-channel mean of the training split, pixels in [0, 1]
    std: tuple[float, ...]         # per-channel standard deviation, likewise
    # the torchvision.datasets class that reads it; None: DATA_DIR/train/CLASS/*
    torchvision: str | None
    # what that class looks for under the data root (for the error message)
    files: str | None
    # the side its images are stored at (test.py --image brings a picture to it)
    stored_size: int | None
    # light strokes on a dark background, one channel (test.py --invert)
    grey: bool
    augment: bool                  # --augment auto: on for natural images
    # horizontal flips suit it (a mirrored 2 is no 2, a mirrored shirt a shirt)
    flips: bool

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std


DATASETS = {
    "mnist": Dataset((0.1307,), (0.3081,), "MNIST",
                     "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", 28, True, False,
                     False),
    "fashion-mnist": Dataset((0.2860,), (0.3530,), "FashionMNIST",
                             "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", 28,
                             True, False, True),
    "cifar10": Dataset((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10",
                       "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}", 32, False,
                       True, True),
    # Folders of your own images: ImageNet's statistics, any size (resized to IMAGE_SIZE).
    "folder": Dataset((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None, None, None, False,
                      True, True),
}



def check_settings(c: dict) -> None:
    """The datasets' rules for a config (train.py's, a checkpoint's, test.py's): DATASET is one of
    DATASETS, and TTA only where training flips the images: not for digits (a mirrored digit is no
    digit), nor where the run's augmentation is off (Fashion-MNIST's shoes all point one way; a model
    that never saw them mirrored tested 85% with TTA against 93% without); SHIFT 0 only where the
    augmentation still flips; TTA_SHIFT only with TTA."""
    dataset = c.get("dataset")
    if dataset is None:
        return
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    augment_off = "augment" in c and not augment_enabled(c)
    if c.get("tta") is True and not DATASETS[dataset].flips:
        suited = ", ".join(name for name, d in DATASETS.items() if d.flips)
        raise UserError(f"--tta averages each image with its mirror image, which does not suit "
                        f"{dataset}; it is for {suited}")
    if c.get("shift") == 0 and "augment" in c and augment_enabled(c) and not DATASETS[dataset].flips:
        raise UserError(f"--shift 0 leaves {dataset}'s augmentation nothing to do (it is never "
                        f"flipped): give --shift 1 or more, or --augment off")
    if c.get("tta") is True and augment_off:
        raise UserError(f"--tta averages each image with its mirror image, which training never "
                        f"showed: augmentation (crops and flips) is off for {dataset} (--augment "
                        f"{c['augment']}): train with --augment on, or use --tta off")
    if c.get("tta_shift") and c.get("tta") is not True:
        raise UserError(f"--tta-shift {c['tta_shift']} adds moved images to the mirror images of "
                        f"--tta, which is off: add --tta, or give --tta-shift 0")


# Seeds of the random streams, mixed from the run's seed so that no two streams coincide: the
# epoch's shuffle is seed * SEED_MIX + epoch, its augmentation seed * SEED_MIX + epoch * EPOCH_MIX +
# rank, and the validation split seed * SEED_MIX + VAL_OFFSET (apart from any epoch's shuffle).
SEED_MIX, EPOCH_MIX, VAL_OFFSET = 1_000_003, 1_009, 999_983


def choose_data_dir(typed: str | None, stored: str | None, default: str) -> tuple[str, str]:
    """(dataset root, where it came from), one rule for train.py --resume and test.py: a typed
    --data-dir wins, then the folder the checkpoint names while it exists, then `default` (DATA_DIR
    from the environment, else ./data)."""
    if typed is not None:
        return typed, "--data-dir"
    if stored is not None and Path(stored).is_dir():
        return stored, "the checkpoint (--data-dir overrides it)"
    where = "DATA_DIR" if os.environ.get("DATA_DIR") else "the default ./data"
    if stored is not None:
        where += (f", since the checkpoint's {stored} is not a folder seen from {Path.cwd()}; "
                  "--data-dir names another")
    else:
        where += "; --data-dir names another"
    return default, where


def _torchvision_split(name: str, root: str, train: bool, download: bool = True):
    """The torchvision dataset object; downloads when absent (if `download`), one line when that
    fails."""
    from torchvision import datasets
    cls = getattr(datasets, DATASETS[name].torchvision)
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:
        pass  # not on disk: try to download it
    except OSError as e:  # e.g. a name too long for the file system
        raise UserError(f"cannot read {name} under {root}: {e.strerror or e}") from None
    if not download:
        raise UserError(f"{name} not found under {Path(root).resolve()}; "
                        f"expected {DATASETS[name].files} "
                        "there (set DATA_DIR or --data-dir to the dataset root)")
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        return cls(root, train=train, download=True)
    except Exception as e:  # offline, read-only folder, bad checksum: all end the same way
        raise UserError(f"{name} not found under {Path(root).resolve()} and could not be "
                        f"downloaded ({type(e).__name__}); expected {DATASETS[name].files} there "
                        "(set DATA_DIR or --data-dir to the dataset root)") from None


# The random crops' zero padding, in pixels of the 28 or 32 px images (folders: in 32nds of their
# side), for a config without SHIFT (train.py's default).
SHIFT = 4


class DeviceImages:
    """A whole split as a uint8 tensor on the training device, preprocessed a batch at a time there.

    Keeping 28x28 or 32x32 uint8 images on the device (MNIST is 47 MB, CIFAR-10 150 MB) avoids
    DataLoader workers, PIL and the copy of 224 px floats (600 KB an image) for every batch.
    """

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor, classes: list[str],
                 mean, std, image_size: int, device: torch.device, pad: int = SHIFT,
                 flip: bool = True):
        self.images = images.to(device) if images is not None else None  # (N, C, h, w) uint8
        self.labels = labels.to(device)      # (N,) int64
        self.classes = classes
        self.image_size = image_size
        self.device = device
        self.paths: list[str] | None = None  # a folder's files, in order (test.py names them)
        self.pad = pad                       # random-crop padding, in pixels of the stored image
                                             # (0: no shifts, only the flips)
        # horizontal flips (not for digits: a mirrored 2 is no 2)
        self.flip = flip
        # one value per channel, or one for all; 3 for grey images: they become RGB first
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def preprocess(self, x: torch.Tensor, augment: bool = False,
                   generator: torch.Generator | None = None):
        """uint8 (B, C, h, w) on the device -> normalized float (B, 3, S, S), channels_last."""
        x = x.float().div_(255)
        if augment:  # random crop with zero padding (and horizontal flip), at the stored resolution
            b, _, h, w = x.shape
            p = self.pad
            x = F.pad(x, (p, p, p, p))
            # MPS draws on a CPU generator
            g = generator.device if generator is not None else x.device
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
        # Normalizing before the resize is the same result (bilinear weights sum to 1) on 64x fewer
        # pixels. IMAGE_SIZE >= 32 only ever upsamples 28/32 px images, where antialias changes
        # nothing: without it, MPS (torch < 2.7) has a kernel and Ascend 910A does not fall back to
        # the CPU.
        if x.shape[1] < self.mean.shape[1]:  # grey digits for weights trained on RGB (ImageNet)
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 channels: a view, copied once just below
        return x.contiguous(memory_format=torch.channels_last)

    def batches(self, indices: torch.Tensor, batch_size: int, augment: bool = False,
                generator: torch.Generator | None = None, steps: int | None = None):
        """Yield (images, labels) for `indices` in order, `batch_size` at a time (see
        split_batches)."""
        for idx, x in self.stored(indices, batch_size, steps):
            yield self.preprocess(x, augment, generator), self.labels[idx]

    def stored(self, indices: torch.Tensor, batch_size: int, steps: int | None = None):
        """Yield (indices, uint8 images as stored) a batch at a time, on the device."""
        for idx in split_batches(indices.to(self.device), batch_size, steps):
            yield idx, self.images[idx]

    def name(self, i: int) -> str:
        """Where sample i comes from: its file for a folder, else its index in the split."""
        return self.paths[i] if self.paths is not None else str(i)

    def raw(self, i: int):
        """Sample i as the dataset stores it, as a PIL image (28x28 grey or 32x32 colour)."""
        from PIL import Image
        img = self.images[i].cpu()
        return (Image.fromarray(img[0].numpy()) if img.shape[0] == 1
                else Image.fromarray(img.permute(1, 2, 0).numpy()))

    def close(self) -> None:
        """Nothing to stop: a split in memory has no worker processes."""


class StreamedImages(DeviceImages):
    """A folder split too large to keep in memory: its files are decoded by DataLoader worker
    processes every epoch, at the size an in-memory split would store them, and then preprocessed
    on the device by DeviceImages' own code. The random draws of the augmentation happen there, in
    this process, so the batches are the same as those of the split in memory."""

    def __init__(self, split: folders.FolderSplit, mean, std, image_size: int,
                 device: torch.device, workers: int, pad: int):
        super().__init__(None, torch.tensor(split.labels), split.classes, mean, std, image_size,
                         device, pad)
        self.paths, self.size, self.workers = split.paths, split.size, workers
        self._loader = None

    def stored(self, indices: torch.Tensor, batch_size: int, steps: int | None = None):
        if self._loader is None:  # built once, so its persistent workers live across epochs
            self._sampler = _BatchSampler()
            self._loader = torch.utils.data.DataLoader(
                _DecodedFiles(self.paths, self.size), batch_sampler=self._sampler,
                num_workers=self.workers, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0, worker_init_fn=_ignore_stop_signals,
                # else each epoch's iterator draws from the dropout stream
                generator=torch.Generator())
        batches = split_batches(indices.cpu(), batch_size, steps)
        self._sampler.batches = [b.tolist() for b in batches]
        for idx, (x, why) in zip(batches, self._loader):
            failed = [(int(i), w) for i, w in zip(idx, why) if w]
            if failed:  # changed on disk since it was checked
                raise UserError(f"{self.paths[failed[0][0]]} can no longer be read "
                                f"({failed[0][1]})")
            yield idx.to(self.device), x.to(self.device, non_blocking=True)

    def raw(self, i: int):
        from PIL import Image
        array, why = folders.decode(self.paths[i], self.size)
        if array is None:
            raise UserError(f"{self.paths[i]} can no longer be read ({why})")
        return Image.fromarray(array)

    def close(self) -> None:
        """Stop the DataLoader workers now, by dropping the loader (its iterators shut the workers
        down when freed). The workers ignore SIGTERM (_ignore_stop_signals), so one still alive
        when Python exits would keep multiprocessing's exit handler waiting for ever."""
        self._loader = None


class _DecodedFiles(torch.utils.data.Dataset):
    """Item i: (file i decoded as uint8 (3, h, w) at `size` as folders.decode reads it, ""), or
    (zeros, why it cannot be read): the main process says it in one line."""

    def __init__(self, paths: list[str], size: tuple[int, int]):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        array, why = folders.decode(self.paths[i], self.size)
        if array is None:
            return torch.zeros(3, self.size[1], self.size[0], dtype=torch.uint8), why
        return torch.from_numpy(array).permute(2, 0, 1), ""


# --------------------------------------------------------------------------------- folder splits

# A folder split is kept on the device as uint8 (served like MNIST and CIFAR-10, no workers, no PIL
# per epoch) when its images, decoded at their stored size, take at most this share of the memory
# free at start-up, both on the host that decodes them and on the device (divided among a node's
# processes). Larger folders are read through DataLoader workers every epoch.
FOLDER_MEMORY_SHARE = 0.25


def free_memory(device: torch.device) -> int:
    """Bytes free for a split's tensor: available host memory (it is decoded there) and, for an
    accelerator, free device memory; shared by the processes torchrun starts on this node."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            host = 0  # unknown: take the DataLoader path, which needs no such memory
    free = host
    if device.type in ("cuda", "npu"):
        free = min(free, getattr(torch, device.type).mem_get_info(device)[0])
    return free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def load_folder(split: Path, classes: list[str] | None, mean, std, c: dict, device: torch.device,
                taken: set[str] = frozenset()) -> DeviceImages:
    """A folder split (folders.read_split: every file checked first), decoded into memory when its
    images fit FOLDER_MEMORY_SHARE of the free memory, else streamed by DataLoader workers every
    epoch: the same batches either way. taken: real paths of files other splits hold."""
    import time
    t0 = time.perf_counter()
    budget = FOLDER_MEMORY_SHARE * free_memory(device)
    read = folders.read_split(split, classes, c["image_size"], c["workers"],
                              c.get("skip_bad_images", False), taken, lambda n: n <= budget)
    w, h = read.size
    need = len(read.paths) * 3 * w * h
    # Crop padding of SHIFT 32nds of the stored side (1/8 by default)
    pad = folder_pad(min(w, h), shift(c))
    if read.images is None:
        if folders.is_master():
            console(f"{split}: {len(read.paths):,} images, {need / 2**30:,.1f} GB decoded, more "
                    f"than {FOLDER_MEMORY_SHARE:.0%} of the free memory: decoded by "
                    f"{c['workers']} DataLoader workers every epoch")
        return StreamedImages(read, mean, std, c["image_size"], device, c["workers"], pad)
    if folders.is_master():
        console(f"{split}: {len(read.paths):,} images of {w}x{h} decoded into {device} memory "
                f"({need / 2**20:,.1f} MB) in {time.perf_counter() - t0:.1f} s")
    images = torch.from_numpy(read.images).permute(0, 3, 1, 2).contiguous()
    data = DeviceImages(images, torch.tensor(read.labels), read.classes, mean, std,
                        c["image_size"], device, pad)
    data.paths = read.paths
    return data


# -------------------------------------------------------------------- splits, shuffles and batches

def load_split(c: dict, train: bool | str, device: torch.device, classes=None,
               download: bool = True, taken: set[str] = frozenset()):
    """The training or test split named by config c, ready to hand out batches on `device`
    (train="val": a folder dataset's val/ folder). download=False: a torchvision dataset that is not
    on disk is an error, and nothing is created. taken: a folder's files that other splits hold."""
    root = Path(c["data_dir"])
    mean, std = normalization(c)
    if c["dataset"] == "folder":
        split = root / (train if isinstance(train, str) else "train" if train else "test")
        if not split.is_dir():
            raise UserError(f"{split} is not a folder; "
                            f"--dataset folder expects {root}/train/CLASS/*.jpg "
                            f"and {root}/test/CLASS/*.jpg")
        try:
            return load_folder(split, classes, mean, std, c, device, taken)
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
                        pad=shift(c), flip=DATASETS[c["dataset"]].flips)


def close(*splits) -> None:
    """Stop the DataLoader workers of these splits (None and in-memory splits have none)."""
    for data in splits:
        if data is not None:
            getattr(data, "data", data).close()


class Subset:
    """Part of a split (DeviceImages or StreamedImages), named by the split's own indices:
    batches(i) hands out the images at positions i of this part, so shuffles, shards and resume work
    on it unchanged."""

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

    def name(self, i: int) -> str:
        return self.data.name(int(self.indices[i]))


def validation_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices of a split of n images: round(fraction * n) of them held out
    (at least one when fraction > 0). Drawn from the seed alone, so every process of a run and every
    --resume of it holds out the same images. Both sorted: a folder is then read in file order."""
    n_val = max(1, round(fraction * n)) if fraction > 0 else 0
    g = torch.Generator().manual_seed(seed * SEED_MIX + VAL_OFFSET)
    perm = torch.randperm(n, generator=g)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_train_val(c: dict, device: torch.device):
    """(training split, validation split or None) for config c. A folder dataset with DATA_DIR/val/
    uses it as the validation split and the whole of train/; otherwise c["val_fraction"] of the
    training images are held out (0: none). A file that test/ (or val/) holds too, through a link,
    is left out of training (and of val/): each image is in one split only."""
    root = Path(c["data_dir"])
    tested = folders.real_paths(root / "test") if c["dataset"] == "folder" else set()
    validated = folders.real_paths(root / "val") if c["dataset"] == "folder" else set()
    train = load_split(c, True, device, taken=tested | validated)
    if c["dataset"] == "folder" and (root / "val").is_dir():
        return train, load_split(c, "val", device, classes=train.classes, taken=tested)
    if c["val_fraction"] <= 0:
        return train, None
    train_idx, val_idx = validation_indices(len(train), c["val_fraction"], c["seed"])
    if len(train_idx) == 0:
        raise UserError(f"--val-fraction {c['val_fraction']} leaves no training images "
                        f"of {len(train)}")
    kept = set(train.labels[train_idx.to(train.labels.device)].tolist())
    lost = [name for k, name in enumerate(train.classes) if k not in kept]
    if lost and folders.is_master():
        console(f"warning: holding out {len(val_idx)} validation image(s) leaves no training "
                f"images of class(es) {', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''}: "
                "add images, or lower --val-fraction", file=sys.stderr)
    return Subset(train, train_idx), Subset(train, val_idx)


@torch.inference_mode()
def predict_logits(model, batches, device, amp, tta: bool = False,
                   shift: int = 0) -> torch.Tensor:
    """Logits (float32, on the CPU) of every image of `batches`, in order (tta: averaged with
    those of the mirror image, and with a shift with those of the moved images: predict).
    Softmax is left to the caller."""
    model.eval()
    logits = []
    for x, _ in batches:
        with devices.autocast(device, amp):
            logits.append(predict(model, x, tta, shift).float().cpu())
    return torch.cat(logits)


def predict(model, x: torch.Tensor, tta: bool = False, shift: int = 0) -> torch.Tensor:
    """The model's logits for a batch; with tta, the mean of the logits of each image and of its
    mirror image (test-time augmentation: the net sees both views of a picture it was trained on
    with flips), and with a shift as well those of the image moved by `shift` 32nds of its side
    down and right, and up and left, each with its mirror image: six views."""
    logits = model(x)
    if not tta:
        return logits
    logits = logits + model(x.flip(3))
    if not shift:
        return logits / 2
    for d in (shift, -shift):
        moved = move(x, round(d * x.shape[-1] / 32))
        logits = logits + model(moved) + model(moved.flip(3))
    return logits / 6


def move(x: torch.Tensor, d: int) -> torch.Tensor:
    """x (B, C, h, w) moved d pixels down and d right (d < 0: up and left); the rows and columns
    that come in repeat the nearest edge of the image."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) - d).clamp_(0, h - 1)
    cols = (torch.arange(w, device=x.device) - d).clamp_(0, w - 1)
    return x.index_select(2, rows).index_select(3, cols)


def normalization(c: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that the inputs of c's network are normalized with: those stored in the run's
    config (a fine-tune keeps the statistics its pretrained weights were trained with), else the
    dataset's own."""
    if c.get("normalize"):
        return tuple(c["normalize"][0]), tuple(c["normalize"][1])
    return DATASETS[c["dataset"]].stats


def augment_enabled(c: dict) -> bool:
    """auto: the dataset table's choice (on for natural images, off for digits and clothes)."""
    return c["augment"] == "on" or (c["augment"] == "auto" and DATASETS[c["dataset"]].augment)


def shift(c: dict) -> int:
    """The random crops' largest shift (SHIFT): pixels of a 28 or 32 px image, 32nds of a folder
    image's side; 0: the flips alone."""
    return c.get("shift", SHIFT)


def folder_pad(side: int, shift: int) -> int:
    """A folder image's crop padding: `shift` 32nds of its side (1/8 for the default 4)."""
    return side * shift // 32


def epoch_batches(data, c: dict, epoch: int, from_step: int, steps: int,
                  generator: torch.Generator, rank: int = 0, world: int = 1):
    """The (images, labels) batches of epoch `epoch` (counted from 0) that process `rank` of
    `world` trains on, from step `from_step` of its `steps` on: the epoch's seeded shuffle cut into
    this process's shard, augmented (where augment_enabled) from `generator`, which is seeded for
    the epoch at step 0; a run resumed mid-epoch passes the generator as last.pth left it."""
    indices = shard_indices(len(data), c["seed"], epoch, rank, world,
                            data.labels.cpu() if c.get("balance") else None)
    if from_step == 0:
        generator.manual_seed(augmentation_seed(c["seed"], epoch, rank))
    return data.batches(indices[from_step * c["batch_size"]:], c["batch_size"],
                        augment_enabled(c), generator, steps=steps - from_step)


def shard_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """This process's part of the epoch's shuffle. Every process draws the same permutation
    (seeded by seed and epoch), so the shards are disjoint and together cover all n samples. With
    `labels` (BALANCE) the epoch is n draws, with replacement, in which every class is equally
    likely: image i with probability 1 / (classes x the size of its class), seeded likewise, so a
    resumed epoch and every process see the same draws."""
    g = torch.Generator().manual_seed(seed * SEED_MIX + epoch)
    if labels is None:
        return torch.randperm(n, generator=g)[rank::world]
    weights = 1.0 / torch.bincount(labels)[labels].double()
    return torch.multinomial(weights, n, replacement=True, generator=g)[rank::world]


def class_counts(labels: torch.Tensor, classes: list[str]) -> str | None:
    """One line when the largest class of a training split has at least 3 times the images of the
    smallest (a model then leans towards the large classes), else None."""
    counts = torch.bincount(labels.cpu(), minlength=len(classes))
    big, small = int(counts.argmax()), int(counts.argmin())
    if counts[small] == 0 or counts[big] < 3 * counts[small]:
        return None
    return (f"warning: the training split is unbalanced: {classes[big]} has "
            f"{int(counts[big]):,} images, {classes[small]} {int(counts[small]):,} "
            f"({int(counts[big]) / int(counts[small]):.1f}x); --balance draws every class equally "
            "often (and chooses best.pth by the mean recall of the classes)")


def augmentation_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of a process's augmentation stream at the start of an epoch."""
    return seed * SEED_MIX + epoch * EPOCH_MIX + rank


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in an epoch, the same on every process: the shards differ by at most one
    sample, and counting from the shortest keeps a process from stepping alone (its gradient
    all-reduce would wait forever); a longer shard's extra sample joins its last batch."""
    return math.ceil((n // world) / batch_size)


def split_batches(indices: torch.Tensor, batch_size: int,
                  steps: int | None = None) -> list[torch.Tensor]:
    """`indices` cut into batches of batch_size; with `steps`, exactly that many, the last one
    taking the rest."""
    if steps is None:
        return list(indices.split(batch_size))
    bounds = [i * batch_size for i in range(steps)] + [len(indices)]
    return [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: Ctrl-C, SIGTERM and the other stop signals reach the whole process
    group (and SLURM signals every process), but only the main process may act on them; a worker
    that died would end the run before last.pth is written."""
    for signum in devices.STOP_SIGNALS:  # (no import here: a forked worker may deadlock in one)
        signal.signal(signum, signal.SIG_IGN)


class _BatchSampler(torch.utils.data.Sampler):
    """Yields whatever batches of indices were set last: the epoch's shuffled shard for this
    process."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)
