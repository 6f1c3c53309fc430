"""Show what a model trained by train.py learned: its predictions on the test split, or on \
your own images.

    python test.py                                      # save_model/best.pth, first 20 test images
    python test.py --checkpoint save_model/epoch_003.pth --show 100
    python test.py --show-all                           # one line per test image
    python test.py --grid 100 --grid-seed 1 --out figs  # another sample of 100 test images
    python test.py --image my_digit.png photos/         # your own images (files or folders of them)
    python test.py --image scan.jpg --invert off        # keep colours as they are (digit models)
    python test.py --tta off                            # a model trained with --tta, plain logits
    python test.py --tta on --tta-shift 1               # + mirror and moved images (6 views)

On the test split it prints predicted against actual labels, the accuracy, a per-class table
(precision, recall, F1) and the confusion matrix, and writes confusion.png, predictions.png, cam.png
(Grad-CAM heat maps), mistakes.png (the highest losses) and mistakes.csv (every mistake) next to the
checkpoint (or to --out). With --image it prints, for each image, the predicted class and the three
most likely classes, and writes predictions.csv and cam.png.

The model is rebuilt from the configuration stored in the checkpoint, and every image is
preprocessed exactly as the test images were during training. Nothing opens a window.
"""

import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import cli
import devices
import folders
import gradcam
import imagedata
import plots
from errors import UserError
from imagedata import DATASETS

# ----------------------------------------------------------------------------------------- settings
# Edit these, or override any of them on the command line: python test.py --show 100
CHECKPOINT = "save_model/best.pth"  # checkpoint file written by train.py
SHOW = 20                # print the prediction of the first N test images
SHOW_ALL = False         # print the prediction of every test image
GRID = 64                # draw N test images with their predicted and actual labels in
                         # predictions.png (0: none)
GRID_SEED = 0            # predictions.png and cam.png show test images drawn with this seed, the
                         # classes in turn (the same images on every run)
CAM = 16                 # draw N test images (or --image files) with the Grad-CAM heat map of the
                         # predicted class in cam.png (0: none)
MISTAKES = 16            # draw the N test images with the highest loss in mistakes.png (0: none);
                         # mistakes.csv lists every misclassified test image
OUT: str | None = None   # folder for the pictures and CSV files; None: the checkpoint's folder
IMAGE: list[str] | None = None  # predict these image files, or every image in these folders
                                # (recursively), and skip the test split, so no dataset is needed; a
                                # path that cannot be read gets one line on stderr, the others still
                                # get their predictions, and the exit code is then 2
INVERT: Literal["auto", "on", "off"] = "auto"  # --image, digit models only: these datasets are
                                               # light on dark, so auto inverts an image whose mean
                                               # brightness is above 127 (dark on light)
TOP_K = 3                # --image: print the K most likely classes with their probabilities
BATCH_SIZE = 256         # images per forward pass
DEVICE = "auto"          # auto | cuda | cuda:1 | npu | mps | cpu
AMP: Literal["auto", "bf16", "fp16", "off", None] = None  # mixed precision; None: the checkpoint's
                                                          # setting
TTA: Literal["auto", "on", "off"] = "auto"  # average the logits of each image and its mirror image;
                                            # auto: as train.py evaluated (the checkpoint's TTA)
TTA_SHIFT: int | None = None  # with TTA: also the images moved this many 32nds of their side (as
                              # train.py's TTA_SHIFT); None: the checkpoint's
SKIP_BAD_IMAGES = False  # folder test split: leave out unreadable image files (else they stop the
                         # run)
DATA_DIR: str | None = None  # dataset root; None: the one used for training while it exists, else
                             # DATA_DIR from the environment, else ./data
# --------------------------------------------------------------------------------------------------
DEFAULTS = cli.settings(globals())  # the block above ends here: a constant below is no setting

# What each value must be (a failure is one line, exit code 2).
RULES = [
    ("show", ">= 0", lambda v: v >= 0), ("grid", ">= 0", lambda v: v >= 0),
    ("grid_seed", f"an integer from 0 to {2**32 - 1}", lambda v: 0 <= v <= 2**32 - 1),
    ("cam", ">= 0", lambda v: v >= 0), ("mistakes", ">= 0", lambda v: v >= 0),
    ("top_k", "at least 1", lambda v: v >= 1),
    ("batch_size", f"from 1 to {2**31 - 1}", lambda v: 1 <= v <= 2**31 - 1),
    ("tta_shift", "from 0 to 8 32nds of the side (0: mirror images only)", lambda v: 0 <= v <= 8),
]


def load_model(path, device):
    """(model on `device`, checkpoint): the network its configuration describes, with the weights
    its accuracies were measured on (checkpoints.load_model)."""
    model, ckpt = checkpoints.load_model(path)
    return devices.place(model, device), ckpt


# ----------------------------------------------------------------------------------- the test split

MOST_CONFUSED = 20  # above plots.MAX_MATRIX_CLASSES classes, this many of the worst pairs replace
                    # the matrix


def most_confused(cm: torch.Tensor, classes: list[str], k: int = MOST_CONFUSED) -> list[str]:
    """The k largest off-diagonal cells as `actual -> predicted: count (share of actual)`."""
    off = cm.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    n, totals = len(classes), cm.sum(1).tolist()
    return [f"{classes[i // n]} -> {classes[i % n]}: {v} "
            f"({v / totals[i // n]:.1%} of {classes[i // n]})"
            for v, i in zip(counts.tolist(), flat.tolist()) if v > 0]


def class_metrics(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: precision (right among those predicted as it), recall (right among those that
    are it) and F1 (their harmonic mean); 0 where a class was never predicted or never present."""
    cm = cm.float()
    hits = cm.diag()
    precision = hits / cm.sum(0).clamp(min=1)
    recall = hits / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return precision, recall, f1


def format_tables(cm: torch.Tensor, classes: list[str]) -> str:
    """The per-class table and the confusion matrix as text. Long class names (cifar10's
    "automobile") would make 10 columns too wide, so the matrix then numbers its columns and rows.
    Above plots.MAX_MATRIX_CLASSES classes the most confused pairs replace the matrix."""
    count, correct = cm.sum(1).tolist(), cm.diag().tolist()
    precision, recall, f1 = class_metrics(cm)
    name_w = max(13, *map(len, classes))
    lines = [f"{'class':<{name_w}}  {'count':>6}  {'correct':>7}  {'accuracy':>8}  "
             f"{'precision':>9}  {'recall':>6}  {'f1':>6}"]
    for name, n, k, p, r, f in zip(classes, count, correct, precision.tolist(), recall.tolist(),
                                   f1.tolist()):
        lines.append(f"{name:<{name_w}}  {n:>6}  {k:>7}  {k / n if n else float('nan'):>8.2%}  "
                     f"{p:>9.4f}  {r:>6.4f}  {f:>6.4f}")
    lines.append(f"{'macro average':<{name_w}}  {sum(count):>6}  {sum(correct):>7}  "
                 f"{sum(correct) / max(1, sum(count)):>8.2%}  {precision.mean():>9.4f}  "
                 f"{recall.mean():>6.4f}  {f1.mean():>6.4f}")

    if len(classes) > plots.MAX_MATRIX_CLASSES:
        pairs = most_confused(cm, classes)
        lines += ["", f"most confused pairs (actual -> predicted), of {len(classes)} classes:"]
        return "\n".join(lines + ["  " + p for p in pairs]
                         + ([] if pairs else ["  none: no mistakes"]))
    short = max(map(len, classes)) <= 5
    cols = classes if short else [str(j) for j in range(len(classes))]
    rows = classes if short else [f"{i} {name}" for i, name in enumerate(classes)]
    corner = "actual\\pred"
    row_w = max(len(corner), *map(len, rows))
    col_w = max(len(str(int(cm.max()))), *map(len, cols)) + 2
    lines += ["", "confusion matrix (rows: actual class, columns: predicted class):",
              f"{corner:<{row_w}}" + "".join(f"{c:>{col_w}}" for c in cols)]
    for name, row in zip(rows, cm.tolist()):
        lines.append(f"{name:<{row_w}}" + "".join(f"{v:>{col_w}}" for v in row))
    return "\n".join(lines)


def evaluate_split(args, model, ckpt, c, device, amp, out: Path | None) -> None:
    # never into a wrong DATA_DIR
    data = imagedata.load_split(c, False, device, classes=ckpt["classes"], download=False)
    try:  # a folder's DataLoader workers stop when the report ends, however it ends
        report(args, model, c, data, ckpt, device, amp, out)
    finally:
        imagedata.close(data)


def report(args, model, c, data, ckpt, device, amp, out: Path) -> None:
    """The printed report and the pictures for the test split `data`."""
    classes = [plots.printable(name) for name in ckpt["classes"]]
    batches = data.batches(torch.arange(len(data)), args.batch_size)
    logits = imagedata.predict_logits(model, batches, device, amp, c["tta"], c["tta_shift"])
    preds, labels = logits.argmax(1), data.labels.cpu()
    n_show = len(preds) if args.show_all else min(args.show, len(preds))
    for p, y in zip(preds[:n_show].tolist(), labels[:n_show].tolist()):
        print(f'Predicted: "{classes[p]}", Actual: "{classes[y]}"')
    correct = int((preds == labels).sum())
    print(f"test accuracy: {correct}/{len(labels)} = {correct / len(labels):.2%}")
    if len(classes) > 10:
        top5 = int((logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum())
        print(f"top-5 accuracy: {top5}/{len(labels)} = {top5 / len(labels):.2%}")

    cm = plots.confusion_matrix(preds, labels, len(classes))
    print()
    print(format_tables(cm, classes))
    print()
    if out is None:  # the folder cannot be written: said already
        return
    drawn = [plots.short(name) for name in classes]
    plots.draw_confusion(cm, drawn, out / "confusion.png")
    if args.grid:
        indices = sample_indices(labels, min(args.grid, len(data)), args.grid_seed)
        plots.draw_grid(data, indices, preds, labels, drawn, out / "predictions.png")
    report_mistakes(args, model, c, data, logits, labels, classes, out)


def sample_indices(labels: torch.Tensor, n: int, seed: int) -> list[int]:
    """n test images that cover the classes: each class's images in an order drawn from `seed`,
    then the classes taken in turn (a folder's test split is sorted by class, so its first images
    would all be of one). Sorted, so they can be found in the --show-all listing."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    by_class: dict[int, list[int]] = {}
    for i in order.tolist():
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = [by_class[k] for k in sorted(by_class)]
    chosen = []
    for rank in range(max(map(len, queues), default=0)):
        chosen += [q[rank] for q in queues if rank < len(q)]
    return sorted(chosen[:n])


def report_mistakes(args, model, c, data, logits, labels, classes, out: Path) -> None:
    """mistakes.csv (every misclassified image, worst loss first), cam.png (CAM images of the
    sample with the heat map of their predicted class) and mistakes.png (the MISTAKES highest
    losses)."""
    probs = torch.softmax(logits, dim=1)
    losses = F.cross_entropy(logits, labels, reduction="none")
    preds = probs.argmax(1)
    order = losses.argsort(descending=True, stable=True)
    wrong = [i for i in order.tolist() if preds[i] != labels[i]]
    rows = [["image", "actual", "predicted", "p_actual", "p_predicted", "loss"]]
    rows += [[plots.printable(data.name(i)), classes[labels[i]], classes[preds[i]],
              f"{probs[i, labels[i]]:.6f}", f"{probs[i, preds[i]]:.6f}", f"{losses[i]:.6f}"]
             for i in wrong]
    write_csv(out / "mistakes.csv", rows)
    classes = [plots.short(name) for name in classes]  # as the pictures show them
    layer, cams, name = None, {}, ""
    shown = sample_indices(labels, min(args.cam, len(labels)), args.grid_seed)
    worst = order[:args.mistakes].tolist()
    if shown or worst:
        layer, name = gradcam.cam_layer(model, c["image_size"])
        cams = heat_maps(model, data, sorted(set(shown) | set(worst)), preds, layer,
                         args.batch_size)
    if shown:
        plots.draw_cams([data.raw(i) for i in shown], [cams[i] for i in shown],
                        [f"pred {classes[preds[i]]}\ntrue {classes[labels[i]]}" for i in shown],
                        [bool(preds[i] != labels[i]) for i in shown],
                        f"Grad-CAM of the predicted class at {name}", out / "cam.png")
    if worst:
        plots.draw_cams([data.raw(i) for i in worst], [cams[i] for i in worst],
                        [f"pred {classes[preds[i]]}\ntrue {classes[labels[i]]}\n"
                         f"loss {losses[i]:.2f}, p {probs[i, preds[i]]:.2f}" for i in worst],
                        [bool(preds[i] != labels[i]) for i in worst],
                        f"highest losses: predicted and true class, loss, probability p of the "
                        f"predicted class; Grad-CAM at {name}", out / "mistakes.png")


def heat_maps(model, data, indices: list[int], classes: torch.Tensor, layer: int,
              batch_size: int) -> dict[int, torch.Tensor]:
    """{i: Grad-CAM heat map (H, W) of class classes[i] for image i}, a batch at a time."""
    cams = {}
    for chunk in torch.tensor(indices, dtype=torch.long).split(batch_size):
        for x, _ in data.batches(chunk, len(chunk)):  # one batch
            for i, cam in zip(chunk.tolist(), gradcam.grad_cam(model, x, layer, classes[chunk])):
                cams[i] = cam.cpu()
    return cams


def write_csv(path: Path, rows: list[list[str]]) -> None:
    """A CSV file written whole or not at all; one that cannot be written is a warning."""
    try:
        checkpoints.write_csv(path, rows)
    except UserError as e:
        print(f"warning: {e}", file=sys.stderr)
        return
    print(f"wrote {path}")


def output_dir(args, inputs: list[tuple[Path, str]]) -> Path | None:
    """The folder the pictures and CSV files go to: --out, else the checkpoint's. Never one inside
    `inputs` (folders of images, each with how to name it, and "itself" where only that folder is
    meant, not those inside it): the next run would read the pictures as images. One that cannot be written is a warning, and None: the report is still printed, and
    the exit code is then 2 (args.lost_pictures)."""
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    what = (f"--out {out}" if args.out else
            f"{out}, the checkpoint's folder (where the pictures go without --out),")
    try:
        if out.is_symlink() and not out.exists():
            raise UserError(f"{what} is a link to {os.readlink(out)}, which does not exist: "
                            "create that folder, or give --out another")
        if out.exists() and not out.is_dir():
            raise UserError(f"{what} is a file, not a folder: give --out a folder")
        for folder, named, *only in inputs:
            inside = out.resolve() == folder.resolve() if only else \
                out.resolve().is_relative_to(folder.resolve())
            if inside:
                raise UserError(f"{what} is inside {named}, where its pictures would be read as "
                                "images the next time: give --out a folder outside it")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(f"warning: cannot write the pictures and CSV files to {out} ({e.strerror or e}); the "
              "report is printed without them (give --out a folder that can be written)",
              file=sys.stderr)
        args.lost_pictures = True
        return None
    return out


def data_folders(c: dict) -> list[tuple[Path, str]]:
    """The image folders of a folder dataset (its splits), where no picture may go."""
    if c["dataset"] != "folder":
        return []
    root = Path(c["data_dir"])
    return [(root / split, f"the dataset's {split}/ ({root / split})")
            for split in ("train", "val", "test") if (root / split).is_dir()]


# ---------------------------------------------------------------------------------- your own images

def find_images(paths: list[str], report) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted). Paths that do not
    exist are reported and left out."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = folders.image_files(path)
            if not inside:
                report(f"{path} holds no image files ({', '.join(folders.IMAGE_SUFFIXES)})")
            for f in inside:  # a FIFO would block the read for ever
                if f.is_file():
                    found.append(f)
                else:
                    report(f"{f} is not a regular file")
        elif path.is_file():
            found.append(path)
        elif path.exists():  # a FIFO or a device: opening it could block for ever
            report(f"{path} is not a regular file")
        else:
            report(f"{path} does not exist")
    return found


# cam.png shows your pictures at most this many pixels a side: drawn at full size, six phone photos
# took gigabytes of memory.
SHOWN_SIDE = 256


def read_image(path: Path, dataset: str, invert: str, image_size: int | None = None):
    """The image as the checkpoint's dataset stores its samples, uint8: (1, 28, 28) grey for
    mnist and fashion-mnist, (3, 32, 32) RGB for cifar10, (3, S, S) RGB at the network's input
    size for folder (decoded as training decodes a folder's files: no EXIF rotation). Returns
    (tensor, whether it was inverted, the picture cam.png shows: as the network saw it for the
    built-in datasets, grey and inverted where it was; else the file in RGB, at most SHOWN_SIDE
    pixels a side). One picture is decoded at a time, at its own size."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        if dataset == "folder":
            picture = folders.rgb(im)
            x = torch.from_numpy(folders.resized(picture, (image_size, image_size)))
            picture.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
            return x.permute(2, 0, 1), False, picture
        # 16-bit grey (scanners, microscopes): by the depth the file declares, read before
        # anything else decodes it (convert() would clip it at 255)
        im = folders.eight_bit(im)
        im = ImageOps.exif_transpose(im)  # phone photos keep their rotation in EXIF
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Transparent pixels take the colour of the paper they would be drawn on: white.
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        size = DATASETS[dataset].stored_size
        im = im.convert("L" if DATASETS[dataset].grey else "RGB")
        # PIL's bilinear filter widens with the scale factor, so large pictures are smoothed, not
        # aliased.
        im = im.resize((size, size), Image.Resampling.BILINEAR)
        inverted = False
        if DATASETS[dataset].grey and (invert == "on"
                                       or invert == "auto" and np.asarray(im).mean() > 127):
            im, inverted = ImageOps.invert(im), True
        x = torch.from_numpy(np.array(im))
        return (x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)), inverted, im


def predict_files(args, model, c, classes, device, amp) -> int:
    """Print the prediction for every image, a batch of files at a time (a folder of photos at
    224 px would not fit in memory at once); returns how many paths could not be read."""
    dataset = c["dataset"]
    if args.invert == "on" and not DATASETS[dataset].grey:
        raise UserError("--invert applies to mnist and fashion-mnist models; this one was trained "
                        f"on {dataset}")
    mean, std = imagedata.normalization(c)
    errors = []

    def report(message):
        errors.append(message)
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)

    files = find_images(args.image, report)
    # the folders the images come from, and a file's own folder (`--image photos/*` again)
    inputs = [(Path(p), f"--image folder {p}") if Path(p).is_dir() else
              (Path(p).parent, f"{Path(p).parent}, the folder of --image {p}", "itself")
              for p in args.image]
    out = output_dir(args, inputs + data_folders(c)) if files else None
    rows = [["file", "predicted", "probability", f"top_{args.top_k}"]]
    layer, name = gradcam.cam_layer(model, c["image_size"])
    drawn, heats, titles = [], [], []  # for cam.png: the first CAM images
    for start in range(0, len(files), args.batch_size):
        paths, images, inverted, pictures = [], [], [], []
        for path in files[start:start + args.batch_size]:
            try:
                x, inv, picture = read_image(path, dataset, args.invert, c["image_size"])
            except (OSError, ValueError, SyntaxError, EOFError) as e:
                # UnidentifiedImageError is an OSError
                report(f"{path} is not an image that can be read ({type(e).__name__}: {e})"
                       .replace("\n", " "))
                continue
            except Exception as e:  # PIL's DecompressionBombError and other decoder failures
                report(f"{path} could not be decoded ({type(e).__name__}: {e})".replace("\n", " "))
                continue
            paths.append(path)
            images.append(x)
            inverted.append(inv)
            pictures.append(picture)
        if not images:
            continue
        # the very same device preprocessing as the test split: a DeviceImages of these images
        x = torch.stack(images)
        batches = list(imagedata.DeviceImages(
            x, torch.zeros(len(x), dtype=torch.long), classes, mean, std, c["image_size"],
            device).batches(torch.arange(len(x)), len(x)))
        logits = imagedata.predict_logits(model, batches, device, amp, c["tta"], c["tta_shift"])
        probs = torch.softmax(logits, dim=1)
        top_p, top_i = probs.topk(min(args.top_k, len(classes)), dim=1)
        for path, inv, ps, ks in zip(paths, inverted, top_p.tolist(), top_i.tolist()):
            top = ", ".join(f'"{classes[k]}" {p:.2%}' for p, k in zip(ps, ks))
            print(f'{path}: Predicted: "{classes[ks[0]]}" | top-{len(ks)}: {top}'
                  f'{" (inverted)" if inv else ""}')
            rows.append([plots.printable(str(path)), classes[ks[0]], f"{ps[0]:.6f}",
                         "; ".join(f"{classes[k]} {p:.6f}" for p, k in zip(ps, ks))])
        n = min(len(paths), args.cam - len(drawn))
        if n > 0:  # heat maps of the predicted class, for cam.png
            cams = gradcam.grad_cam(model, batches[0][0][:n], layer, top_i[:n, 0])
            for k in range(n):
                drawn.append(pictures[k])
                heats.append(cams[k].cpu())
                titles.append(f"{plots.short(Path(paths[k]).name)}\n"
                              f"pred {plots.short(classes[top_i[k, 0]])} {top_p[k, 0]:.0%}")
    if out is not None:  # else it could not be written, and said so
        write_csv(out / "predictions.csv", rows)
        plots.draw_cams(drawn, heats, titles, [False] * len(drawn),
                        f"Grad-CAM of the predicted class at {name}", out / "cam.png")
    return len(errors)


# --------------------------------------------------------------------------------------------- main

def main() -> None:
    _, args = cli.parse(DEFAULTS, __doc__.splitlines()[0], rules=RULES)
    if args.data_dir is None and os.environ.get("DATA_DIR") == "":  # train.py refuses it too
        raise UserError("DATA_DIR is empty: give a folder (. for the current one), or unset it")
    device = devices.pick_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    c = dict(ckpt["config"])
    c["data_dir"], data_from = imagedata.choose_data_dir(args.data_dir, c.get("data_dir"),
                                                         os.environ.get("DATA_DIR") or "data")
    c["skip_bad_images"] = args.skip_bad_images
    amp = devices.amp_dtype(device, args.amp or c["amp"])
    c["tta"] = c["tta"] if args.tta == "auto" else args.tta == "on"
    # the checkpoint's shift goes with its mirror images; a typed one is checked against --tta
    shift = c.get("tta_shift", 0) if args.tta_shift is None else args.tta_shift
    c["tta_shift"] = shift if c["tta"] or args.tta_shift is not None else 0
    imagedata.check_settings(c)
    tta_note = (", logits averaged with the mirror image (tta)" if c["tta"] else "") + (
        f" and the image moved by {c['tta_shift']}/32 of its side" if c["tta_shift"] else "")
    print(f"{args.checkpoint}: VGG{c['depth']}{'_bn' if c['batch_norm'] else ''} "
          f"width/{c['width_div']}, {c['dataset']} at {c['image_size']} px, "
          f"trained {ckpt['epoch']} epoch(s){tta_note}")
    args.lost_pictures = False
    if args.image:
        if predict_files(args, model, c, [plots.printable(n) for n in ckpt["classes"]], device,
                         amp):
            sys.exit(2)  # each unreadable path has had its line on stderr already
    else:
        # before the evaluation, which can take a while: fail early if it cannot be made
        out = output_dir(args, data_folders(c))
        try:
            evaluate_split(args, model, ckpt, c, device, amp, out)
        except UserError as e:  # say where the folder came from when the user did not type it
            if data_from == "--data-dir":
                raise
            raise UserError(f"{e} (data folder {c['data_dir']} from {data_from})") from None
    if args.lost_pictures:  # the report is printed; the folder for the pictures said its line
        sys.exit(2)


if __name__ == "__main__":
    # Output nobody reads (python test.py | head -1) never stops the report or the pictures.
    sys.stdout, sys.stderr = cli.QuietStream(sys.stdout), cli.QuietStream(sys.stderr)
    try:
        cli.run_main(main)
    except KeyboardInterrupt:  # Ctrl-C: one line; every picture is written whole or not at all
        print("test.py: stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
