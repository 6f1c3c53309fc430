"""Images from disk to a normalized batch on the device: the dataset table, splits and batches.

MNIST, Fashion-MNIST and CIFAR-10 (and folders of images that fit in memory) are kept on the device
as uint8 (DeviceImages) and preprocessed there a batch at a time; larger folders are read through
DataLoader workers (FolderImages). Both hand out the images at given indices, in order, so shuffles,
shards across processes and resumes work the same on either.
"""

import functools
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import devices
from cli import QuietStream, console
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
    augmentation still flips; CUTOUT only with augmentation; TTA_SHIFT only with TTA."""
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
    if c.get("cutout") and augment_off:
        raise UserError(f"--cutout is part of the training images' augmentation, which is off "
                        f"for {dataset} (--augment {c['augment']}): add --augment on")


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], mean, std,
                 image_size: int, device: torch.device, pad: int = SHIFT, flip: bool = True,
                 cutout: float = 0.0):
        self.images = images.to(device)      # (N, C, h, w) uint8, C = 1 or 3
        self.labels = labels.to(device)      # (N,) int64
        self.classes = classes
        self.image_size = image_size
        self.device = device
        self.paths: list[str] | None = None  # a folder's files, in order (test.py names them)
        self.pad = pad                       # random-crop padding, in pixels of the stored image
                                             # (0: no shifts, only the flips)
        # horizontal flips (not for digits: a mirrored 2 is no 2)
        self.flip = flip
        self.cutout = cutout                 # side of the erased square, a share of the image's side
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
        if augment and self.cutout:  # at the stored resolution, like the crop
            x = erase_squares(x, self.cutout, generator)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 channels: a view, copied once just below
        return x.contiguous(memory_format=torch.channels_last)

    def batches(self, indices: torch.Tensor, batch_size: int, augment: bool = False,
                generator: torch.Generator | None = None, steps: int | None = None):
        """Yield (images, labels) for `indices` in order, `batch_size` at a time (see
        split_batches)."""
        for idx in split_batches(indices.to(self.device), batch_size, steps):
            yield self.preprocess(self.images[idx], augment, generator), self.labels[idx]

    def name(self, i: int) -> str:
        """Where sample i comes from: its file for a folder, else its index in the split."""
        return self.paths[i] if self.paths is not None else str(i)

    def raw(self, i: int):
        """Sample i as the dataset stores it, as a PIL image (28x28 grey or 32x32 colour)."""
        from PIL import Image
        img = self.images[i].cpu()
        return (Image.fromarray(img[0].numpy()) if img.shape[0] == 1
                else Image.fromarray(img.permute(1, 2, 0).numpy()))


class FolderImages:
    """Your own images: ImageFolder train/ or test/ read through a DataLoader with workers."""

    def __init__(self, root: Path | None, classes_expected, mean, std, image_size: int,
                 device: torch.device, workers: int, cutout: float = 0.0, shift: int = SHIFT,
                 listed: tuple[list[str], list[tuple[str, int]]] | None = None):
        """root: a split folder to list, or `listed`: its (classes, samples) listed already."""
        from torchvision import transforms
        self.device = device
        self.workers = workers
        normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        resize = transforms.Resize((image_size, image_size), antialias=True)
        classes, samples = listed or list_images(root, classes_expected)
        self.eval_set = ImageFiles(classes, samples, eval_transform(image_size, mean, std))
        self.train_set = ImageFiles(classes, samples, transforms.Compose(
            [transforms.Lambda(rgb), resize,
             *([transforms.RandomCrop(image_size, padding=folder_pad(image_size, shift))]
               if shift else []),
             transforms.RandomHorizontalFlip(), *normalize,
             *([transforms.Lambda(functools.partial(erase_square, side=cutout))] if cutout else [])]))
        self.classes = classes
        self.labels = torch.tensor(self.eval_set.targets)
        self._loaders = {}

    def __len__(self) -> int:
        return len(self.eval_set)

    def batches(self, indices: torch.Tensor, batch_size: int, augment: bool = False,
                generator: torch.Generator | None = None, steps: int | None = None):
        """Yield (images, labels) for `indices` in order (see split_batches). The augmentation of
        image i is seeded by (generator's seed, i): it does not depend on which worker loads it or
        when, so a resumed run sees the same crops and flips as an uninterrupted one."""
        # built once, so persistent workers stay alive across epochs
        if augment not in self._loaders:
            sampler = _BatchSampler()
            loader = torch.utils.data.DataLoader(
                _SeededItems(self.train_set if augment else self.eval_set), batch_sampler=sampler,
                num_workers=self.workers, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0, worker_init_fn=_ignore_stop_signals,
                # else each epoch's iterator draws from the dropout stream
                generator=torch.Generator())
            self._loaders[augment] = (loader, sampler)
        loader, sampler = self._loaders[augment]
        base = generator.initial_seed() if augment and generator is not None else None
        sampler.batches = [[(i, None if base is None else (base * SEED_MIX + i) % 2**63)
                            for i in b.tolist()]
                           for b in split_batches(indices, batch_size, steps)]
        for x, y in loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def name(self, i: int) -> str:
        return self.eval_set.samples[i][0]

    def close(self) -> None:
        """Stop the DataLoader workers now, by dropping the loaders (their iterators shut the
        workers down when freed). The workers ignore SIGTERM (_ignore_stop_signals), so one still
        alive when Python exits would keep multiprocessing's exit handler waiting for ever."""
        self._loaders = {}

    def raw(self, i: int):
        from PIL import Image
        with Image.open(self.eval_set.samples[i][0]) as im:
            return rgb(im)

    def leave_out(self, paths: set[str]) -> None:
        """Drop these files from the split (unreadable ones the user chose to skip)."""
        for ds in (self.eval_set, self.train_set):
            ds.samples = [s for s in ds.samples if s[0] not in paths]
        self.labels = torch.tensor(self.eval_set.targets)


# The files a folder dataset (and test.py --image, in folders) takes as images, by suffix.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                  ".ppm", ".pbm", ".pnm")


def image_files(folder: Path, others: frozenset[Path] = frozenset()) -> list[Path]:
    """The image files under `folder`, recursively, sorted. Names starting with a dot
    (.ipynb_checkpoints/, .DS_Store, editors' temporary files) are neither folders to search nor
    images; links are followed, but never into a folder already visited (a link back up would
    list the same images again and again). Anything with an image suffix that is not a regular
    file (a FIFO, a dangling link) is listed, so that reading it reports it. `others`: the real
    paths (Path.resolve()) of folders never to enter (a split's root and its other classes, which
    a link inside one class could otherwise reach)."""
    found, seen, top = [], set(), folder.resolve()

    def walk(path: Path) -> None:
        try:
            real = path.resolve()
            if real in seen or (real in others and real != top):
                return
            seen.add(real)
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links
                walk(Path(entry.path))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(entry.path))
    walk(folder)
    return sorted(found)


def list_images(split: Path, classes: list[str] | None = None
                ) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(file, class index)]) of split/CLASS/...: as torchvision's ImageFolder lists
    them (classes sorted, files sorted within a class), except that names starting with a dot are
    skipped, links never lead into a folder twice, and .gif counts as an image. A class is named
    by its folder's name read as UTF-8, whatever the file system's encoding, so a run begun under
    one locale goes on under another. `classes`: the training split's list, which then numbers
    this split's classes (a val/ or test/ folder may lack a class, never bring a new one)."""
    try:
        folders = sorted((class_name(e.name), e.name) for e in os.scandir(split)
                         if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot read {split}: {e.strerror or e}") from None
    if not folders:
        raise UserError(f"{split} holds no class folders ({split}/CLASS/image.jpg)")
    if classes is None:
        classes = [name for name, _ in folders]
    unknown = [name for name, _ in folders if name not in classes]
    if unknown:
        raise UserError(f"{split} has class folder(s) {', '.join(unknown[:5])} that the training "
                        f"set does not have (it has {', '.join(list(classes)[:10])}"
                        f"{' ...' if len(classes) > 10 else ''}): rename or remove them")
    # resolved once here: once per class inside image_files made 1,000 classes a million lookups
    fenced = frozenset(p.resolve() for p in (split, *(split / f for _, f in folders)))
    samples = [(str(path), classes.index(name)) for name, folder in folders
               for path in image_files(split / folder, fenced)]
    empty = sorted({name for name, _ in folders} - {classes[k] for _, k in samples})
    if empty:
        raise UserError(f"{split}: class folder(s) {', '.join(empty)} hold no image files "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return list(classes), samples


def class_name(folder: str) -> str:
    """A class folder's name as UTF-8 text: the bytes the file system holds, decoded as UTF-8
    (bytes that are not UTF-8 stay as Python keeps them, lone surrogates), whatever encoding this
    process's locale gave the name."""
    return os.fsencode(folder).decode("utf-8", "surrogateescape")


def one_split_each(samples: list[tuple[str, int]], taken: set[str], split: Path
                   ) -> list[tuple[str, int]]:
    """`samples` without the files (by their real path, through any links) that another split
    `taken` holds, and each file once: an image must never be in two splits (test accuracy
    measured on images the model trained on), nor twice in one. Says how many were left out."""
    kept, seen, elsewhere, twice = [], set(), [], []
    for path, label in samples:
        real = os.path.realpath(path)
        if real in taken:
            elsewhere.append(path)
        elif real in seen:
            twice.append(path)
        else:
            seen.add(real)
            kept.append((path, label))
    if (elsewhere or twice) and _is_master():
        parts = ([f"{len(elsewhere)} that another split holds too (e.g. "
                  f"{Path(elsewhere[0]).relative_to(split)})"] if elsewhere else []) + \
                ([f"{len(twice)} linked twice (e.g. {Path(twice[0]).relative_to(split)})"]
                 if twice else [])
        console(f"warning: left out of {split} {' and '.join(parts)} image file(s): an image is "
                "in one split only, once", file=sys.stderr)
    return kept


def real_paths(split: Path, classes: list[str] | None = None) -> set[str]:
    """The real paths (links followed) of a folder split's image files; empty if it has none."""
    if not split.is_dir():
        return set()
    return {os.path.realpath(path) for path, _ in list_images(split, classes)[1]}


class ImageFiles(torch.utils.data.Dataset):
    """Item i: (transform(image file i as RGB), its class index), for a list from list_images."""

    def __init__(self, classes: list[str], samples: list[tuple[str, int]], transform):
        self.classes, self.samples, self.transform = classes, samples, transform

    @property
    def targets(self) -> list[int]:
        return [k for _, k in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(open_rgb(path)), label


def eval_transform(image_size: int, mean=DATASETS["folder"].mean, std=DATASETS["folder"].std):
    """A folder image (PIL, any mode) -> the normalized float (3, S, S) the network sees at
    evaluation; test.py --image applies it to your own pictures for folder models."""
    from torchvision import transforms
    return transforms.Compose([transforms.Lambda(rgb),
                               transforms.Resize((image_size, image_size), antialias=True),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: Ctrl-C, SIGTERM and the other stop signals reach the whole process group (and SLURM signals
    every process), but only the main process may act on them; a worker that died would end the run
    before last.pth is written."""
    for signum in devices.STOP_SIGNALS:  # (no import here: a forked worker may deadlock in one)
        signal.signal(signum, signal.SIG_IGN)


class _SeededItems(torch.utils.data.Dataset):
    """Item (i, seed): sample i of `dataset`, its random transforms seeded by `seed` (None:
    unseeded)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed = key
        if seed is None:
            return self.dataset[i]
        # leaves the process's own stream (dropout) untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[i]


class _BatchSampler(torch.utils.data.Sampler):
    """Yields whatever batches of indices were set last: the epoch's shuffled shard for this
    process."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def eight_bit(img):
    """Grey images of more than 8 bits (PIL's modes I;16* and I: 16-bit PNG and TIFF scans,
    32-bit TIFF) as 8-bit "L", scaled by the bit depth the file declares (a 16-bit value v becomes
    round(v / 257)), never by what the picture holds: two dim scans that differ in one pixel stay
    alike. convert() would clip every value above 255 to white. Call it on a file just opened:
    the depth is read from its decoder's raw mode, which loading the pixels discards."""
    if not img.mode.startswith("I"):
        return img
    import numpy as np
    from PIL import Image
    bits = bit_depth(img)
    wide = np.asarray(img).astype(np.int64 if bits > 16 else np.uint32)
    # v x 255 / (2^bits - 1), rounded, in integers (no float copy of a large scan)
    top = 2**bits - 1
    eight = (wide.clip(0, None) * 255 + top // 2) // top
    return Image.fromarray(eight.astype(np.uint8))


def bit_depth(img) -> int:
    """The bits per pixel a grey image of PIL mode I;16* or I declares: 16 for I;16*, and for I
    what its decoder reads (PIL before 10 opened 16-bit PNGs as I, raw mode I;16B); else 32."""
    if img.mode.startswith("I;16"):
        return 16
    for tile in getattr(img, "tile", None) or []:
        raw = tile[3] if len(tile) > 3 else None
        raw = raw[0] if isinstance(raw, tuple) and raw else raw
        if isinstance(raw, str) and raw.startswith("I;16"):
            return 16
    return 32


def rgb(img):
    """A PIL image of any mode as RGB, with more than 8 bits scaled as eight_bit does (one already
    in RGB is returned as it is, decoded: no copy of a large picture, and usable once its file is
    closed)."""
    img = eight_bit(img)
    if img.mode != "RGB":
        return img.convert("RGB")
    img.load()
    return img


def open_rgb(path):
    from PIL import Image
    with Image.open(path) as im:
        return rgb(im)


# --------------------------------------------------------------------------------- folder datasets

# A folder split is kept on the device as uint8 (served like MNIST and CIFAR-10, no workers, no PIL
# per epoch) when its images, decoded at their stored size, take at most this share of the memory
# free at start-up, both on the host that decodes them and on the device (divided among a node's
# processes). Larger folders are read through DataLoader workers every epoch.
FOLDER_MEMORY_SHARE = 0.25


# Unreadable image files named in the one-line error (the rest are counted).
BAD_FILES_SHOWN = 5


def _free_memory(device: torch.device) -> int:
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


def _is_master() -> bool:
    """Rank 0 of the process group, or no group: the process that reports for all of them."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _probe(path: str):
    """(width, height) of an image file from its header, or the reason it cannot be opened."""
    from PIL import Image
    if not os.path.isfile(path):  # a FIFO would block the read for ever; a dangling link
        return None, ("not a regular file" if os.path.lexists(path) else "a dangling link")
    try:
        with Image.open(path) as im:
            return im.size, None
    except Exception as e:  # missing, not an image, too many pixels (DecompressionBombError), ...
        return None, _reason(e, path)


def _check(path: str):
    """None if the whole file can be decoded, else the reason. Cheaper than decoding: JPEGs are
    decoded at 1/8 scale (every byte of the stream is still read), PNGs have their chunk checksums
    verified."""
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
    """(uint8 HxWx3 array, None), or (None, reason): the file as the eval transform reads it (RGB,
    and resized to `size` = (width, height) by the same PIL resize when it has another size)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = rgb(im)
        if im.size != size:
            # what transforms.Resize does to a PIL image
            im = im.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(im), None
    except Exception as e:
        return None, _reason(e, path)


def _reason(e: Exception, path: str) -> str:
    """Why a file failed, without its path (the line names it once)."""
    text = f"{type(e).__name__}: {e}".replace(f": '{path}'", "").replace(f" '{path}'", "")
    return text.replace("\n", " ")[:200]


def _chunked(fn, items: list, workers: int, desc: str) -> list:
    """[fn(item) for item in items], by `workers` processes (0: this one), with a progress bar on
    rank 0."""
    from functools import partial
    from tqdm import tqdm
    out = []
    bar = tqdm(total=len(items), desc=desc, disable=not _is_master() or len(items) < 1000,
               leave=False, dynamic_ncols=True, file=QuietStream(sys.stderr))
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
    shown = "; ".join(f"{Path(path).relative_to(split)} ({reason})"
                      for path, reason in bad[:BAD_FILES_SHOWN])
    more = f"; and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
    return f"{len(bad)} unreadable image file(s) under {split}: {shown}{more}"


def load_folder(split: Path, classes_expected, mean, std, c: dict, device: torch.device,
                in_memory: bool | None = None, taken: set[str] = frozenset()):
    """A folder split, every file checked first: as a DeviceImages when its decoded images fit
    FOLDER_MEMORY_SHARE of the free memory, else as a FolderImages (DataLoader workers); in_memory
    True/False: that path whatever the memory (a resumed run keeps the path it began on, since
    the two draw their augmentation differently). Unreadable
    files stop the run with one line naming them, or are left out with c["skip_bad_images"].
    taken: real paths of files other splits hold, left out of this one (one_split_each)."""
    import time
    t0 = time.perf_counter()
    classes, samples = list_images(split, classes_expected)  # lists the files, reads none
    samples = one_split_each(samples, taken, split)
    paths = [path for path, _ in samples]
    workers = c["workers"]
    probed = _chunked(_probe, paths, workers, f"checking {split}")
    bad = [(p, why) for p, (_, why) in zip(paths, probed) if why]
    sizes = {size for size, _ in probed if size}
    # One shared size no larger than the network's input is kept as it is (the device upsamples a
    # batch at a time, where antialiasing changes nothing); larger or mixed sizes are brought to the
    # input size on decoding, as the DataLoader path's Resize does, so the device never has to
    # shrink an image.
    side = c["image_size"]
    w, h = sizes.pop() if len(sizes) == 1 else (side, side)
    if w > side or h > side:
        w, h = side, side
    need = len(paths) * 3 * w * h
    fits = (need <= FOLDER_MEMORY_SHARE * _free_memory(device) if in_memory is None
            else in_memory)
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
            console(f"skipping {bad_files_line(bad, split)}", file=sys.stderr)
    bad_paths = {p for p, _ in bad}
    if not len(paths) - len(bad_paths):
        raise UserError(f"{split} holds no readable images")
    labels = torch.tensor([t for p, t in samples if p not in bad_paths])
    if fits:
        import numpy as np
        images = torch.from_numpy(
            np.stack([a for a, _ in decoded if a is not None])).permute(0, 3, 1, 2)
        if _is_master():
            console(f"{split}: {len(labels):,} images of {w}x{h} decoded into {device} memory "
                    f"({need / 2**20:,.1f} MB) in {time.perf_counter() - t0:.1f} s")
        # Crop padding of SHIFT 32nds of the side (1/8 by default), as the DataLoader path pads its
        # image_size-sided images.
        data = DeviceImages(images.contiguous(), labels, classes, mean, std,
                            c["image_size"], device, pad=folder_pad(min(w, h), shift(c)),
                            cutout=c.get("cutout", 0.0))
        data.paths = [p for p in paths if p not in bad_paths]
        return data
    if _is_master():
        console(f"{split}: {len(labels):,} images, {need / 2**30:,.1f} GB decoded, more than "
                f"{FOLDER_MEMORY_SHARE:.0%} of the free memory: read by {workers} DataLoader "
                "workers every epoch")
    data = FolderImages(None, classes_expected, mean, std, c["image_size"], device, workers,
                        c.get("cutout", 0.0), shift(c), listed=(classes, samples))
    if bad_paths:
        data.leave_out(bad_paths)
    return data


# -------------------------------------------------------------------- splits, shuffles and batches

def load_split(c: dict, train: bool | str, device: torch.device, classes=None,
               download: bool = True, in_memory: bool | None = None,
               taken: set[str] = frozenset()):
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
            return load_folder(split, classes, mean, std, c, device, in_memory, taken)
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
                        pad=shift(c), flip=DATASETS[c["dataset"]].flips,
                        cutout=c.get("cutout", 0.0))


def close(*splits) -> None:
    """Stop the DataLoader workers of these splits (None and in-memory splits have none)."""
    for data in splits:
        data = getattr(data, "data", data)
        if isinstance(data, FolderImages):
            data.close()


def in_memory(data) -> bool:
    """Whether a split (or a part of one) is kept in memory as a DeviceImages."""
    return isinstance(getattr(data, "data", data), DeviceImages)


class Subset:
    """Part of a split (DeviceImages or FolderImages), named by the split's own indices: batches(i)
    hands out the images at positions i of this part, so shuffles, shards and resume work on it
    unchanged."""

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


def load_train_val(c: dict, device: torch.device, in_memory: bool | None = None):
    """(training split, validation split or None) for config c. A folder dataset with DATA_DIR/val/
    uses it as the validation split and the whole of train/; otherwise c["val_fraction"] of the
    training images are held out (0: none). A file that test/ (or val/) holds too, through a link,
    is left out of training (and of val/): each image is in one split only."""
    root = Path(c["data_dir"])
    tested = real_paths(root / "test") if c["dataset"] == "folder" else set()
    validated = real_paths(root / "val") if c["dataset"] == "folder" else set()
    train = load_split(c, True, device, in_memory=in_memory, taken=tested | validated)
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
    if lost and _is_master():
        console(f"warning: holding out {len(val_idx)} validation image(s) leaves no training images "
              f"of class(es) {', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''}: add images, "
              "or lower --val-fraction", file=sys.stderr)
    return Subset(train, train_idx), Subset(train, val_idx)


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


def erase_squares(x: torch.Tensor, side: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout (DeVries and Taylor, 2017): in each normalized image of x (B, C, h, w) a square of
    `side` times the image's side, centred on a random pixel and cut off at the borders, is set to
    0, the mean colour. The centres come from `generator` (None: the global stream)."""
    b, _, h, w = x.shape
    s = round(side * min(h, w))
    g = generator.device if generator is not None else x.device  # MPS draws on a CPU generator
    top = torch.randint(0, h, (b, 1, 1, 1), device=g, generator=generator).to(x.device) - s // 2
    left = torch.randint(0, w, (b, 1, 1, 1), device=g, generator=generator).to(x.device) - s // 2
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    inside = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
    return x.masked_fill(inside, 0.0)


def erase_square(image: torch.Tensor, side: float) -> torch.Tensor:
    """erase_squares for one image (C, h, w): the DataLoader path's transform, seeded per image."""
    return erase_squares(image.unsqueeze(0), side)[0]


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
    indices = shard_indices(len(data), c["seed"], epoch, rank, world)
    if from_step == 0:
        generator.manual_seed(augmentation_seed(c["seed"], epoch, rank))
    return data.batches(indices[from_step * c["batch_size"]:], c["batch_size"],
                        augment_enabled(c), generator, steps=steps - from_step)


def shard_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's part of the epoch's shuffle. Every process draws the same permutation
    (seeded by seed and epoch), so the shards are disjoint and together cover all n samples."""
    g = torch.Generator().manual_seed(seed * SEED_MIX + epoch)
    return torch.randperm(n, generator=g)[rank::world]


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
