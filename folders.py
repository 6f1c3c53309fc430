"""Your own images on disk: which files a folder dataset holds, and how each one is read.

A folder dataset is DATA_DIR/train/CLASS/*.jpg and DATA_DIR/test/CLASS/*.jpg (val/ optional). This
module lists a split's classes and files (as torchvision's ImageFolder does, with the traps of real
folders handled: hidden names, links, FIFOs, the same file in two splits), checks and decodes them
with PIL in worker processes, and turns any picture into 8-bit RGB (16-bit scans by their declared
depth). imagedata.py turns what it reads into batches on the device; test.py --image reads your
pictures with the same functions.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from cli import QuietStream, console
from errors import UserError


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
    if (elsewhere or twice) and is_master():
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


def eight_bit(img):
    """Grey images of more than 8 bits (PIL's modes I;16* and I: 16-bit PNG and TIFF scans,
    32-bit TIFF) as 8-bit "L", scaled by the bit depth the file declares (a 16-bit value v becomes
    round(v / 257)), never by what the picture holds: two dim scans that differ in one pixel stay
    alike. convert() would clip every value above 255 to white. Call it on a file just opened:
    the depth is read from its decoder's raw mode, which loading the pixels discards."""
    if not img.mode.startswith("I"):
        return img
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


# Unreadable image files named in the one-line error (the rest are counted).
BAD_FILES_SHOWN = 5


def is_master() -> bool:
    """Rank 0 of the process group, or no group: the process that reports for all of them."""
    return not dist.is_initialized() or dist.get_rank() == 0


def probe(path: str):
    """(width, height) of an image file from its header, or the reason it cannot be opened."""
    from PIL import Image
    if not os.path.isfile(path):  # a FIFO would block the read for ever; a dangling link
        return None, ("not a regular file" if os.path.lexists(path) else "a dangling link")
    try:
        with Image.open(path) as im:
            return im.size, None
    except Exception as e:  # missing, not an image, too many pixels (DecompressionBombError), ...
        return None, reason(e, path)


def check(path: str):
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
        return reason(e, path)


def decode(path: str, size: tuple[int, int]):
    """(uint8 HxWx3 array, None), or (None, reason): the file in RGB at `size` (resized())."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return resized(rgb(im), size), None
    except Exception as e:
        return None, reason(e, path)


def resized(picture, size: tuple[int, int]) -> np.ndarray:
    """A PIL picture as a uint8 (height, width, channels) array at `size` = (width, height): PIL's
    bilinear resize where its size differs (what torchvision's Resize does to a PIL image; its
    filter widens with the scale factor, so a large picture is smoothed, not aliased)."""
    from PIL import Image
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    return np.array(picture)  # a copy torch may write to


def reason(e: Exception, path: str) -> str:
    """Why a file failed, without its path (the line names it once)."""
    text = f"{type(e).__name__}: {e}".replace(f": '{path}'", "").replace(f" '{path}'", "")
    return text.replace("\n", " ")[:200]


def chunked(fn, items: list, workers: int, desc: str) -> list:
    """[fn(item) for item in items], by `workers` processes (0: this one), with a progress bar on
    rank 0."""
    from functools import partial
    from tqdm import tqdm
    out = []
    bar = tqdm(total=len(items), desc=desc, disable=not is_master() or len(items) < 1000,
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




@dataclass
class FolderSplit:
    """A folder split as read from disk: its classes, its readable files in order with their labels,
    the size every image is decoded at, and the decoded images when they were kept in memory."""
    classes: list[str]
    paths: list[str]
    labels: list[int]
    size: tuple[int, int]  # (width, height)
    images: np.ndarray | None = None  # (N, height, width, 3) uint8


def stored_size(sizes: set, image_size: int) -> tuple[int, int]:
    """The (width, height) a split's images are decoded at: the one size they all share when it is
    no larger than the network's input (the device upsamples a batch at a time, where antialiasing
    changes nothing); else the input size, as a DataLoader's Resize would, so the device never has
    to shrink an image."""
    w, h = next(iter(sizes)) if len(sizes) == 1 else (image_size, image_size)
    return (image_size, image_size) if w > image_size or h > image_size else (w, h)


def read_split(split: Path, classes: list[str] | None, image_size: int, workers: int,
               skip_bad: bool, taken: set[str] = frozenset(), keep=lambda nbytes: True
               ) -> FolderSplit:
    """A folder split, every file checked before training begins: listed (list_images), without
    the files other splits hold (`taken`, one_split_each), each file's header read, then every
    image decoded when keep(bytes decoded) says they are to be kept in memory, else every file
    checked whole (cheaper). Unreadable files stop the run with one line naming them, or are left
    out with skip_bad."""
    classes, samples = list_images(split, classes)  # lists the files, reads none
    samples = one_split_each(samples, taken, split)
    paths = [path for path, _ in samples]
    probed = chunked(probe, paths, workers, f"checking {split}")
    bad = [(p, why) for p, (_, why) in zip(paths, probed) if why]
    size = stored_size({s for s, _ in probed if s}, image_size)
    ok = [i for i, (_, why) in enumerate(probed) if not why]
    decoded = None
    if keep(len(ok) * 3 * size[0] * size[1]):
        decoded = chunked(decode, [(paths[i], size) for i in ok], workers, f"decoding {split}")
        bad += [(paths[i], why) for i, (_, why) in zip(ok, decoded) if why]
    else:
        checked = chunked(check, [paths[i] for i in ok], workers, f"checking {split}")
        bad += [(paths[i], why) for i, why in zip(ok, checked) if why]
    if bad:
        bad.sort()
        if not skip_bad:
            if not is_master():
                sys.exit(2)  # rank 0 says it once for all processes
            raise UserError(bad_files_line(bad, split) + " (fix or remove them, or skip them with "
                            "--skip-bad-images)")
        if is_master():
            console(f"skipping {bad_files_line(bad, split)}", file=sys.stderr)
    bad_paths = {p for p, _ in bad}
    kept = [(p, k) for p, k in samples if p not in bad_paths]
    if not kept:
        raise UserError(f"{split} holds no readable images")
    images = (np.stack([a for a, _ in decoded if a is not None]) if decoded is not None else None)
    return FolderSplit(classes, [p for p, _ in kept], [k for _, k in kept], size, images)
