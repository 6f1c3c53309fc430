"""The pictures: curves.png (train.py), confusion.png and predictions.png (test.py).

Drawn on bare matplotlib Figures, which render with Agg: no display is needed, nothing opens a
window, and no pyplot means the backend of whatever program imports this module is left alone.
"""

import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch


# beyond this the confusion matrix is too wide to read: the worst pairs are listed
MAX_MATRIX_CLASSES = 30

def plot_curves(csv_path, png_path, chosen: str = "val_acc") -> int | None:
    """Redraw png_path from train.py's metrics.csv: loss and accuracy per epoch, train, validation
    and test (and the balanced accuracies, dashed, where the run has them). Returns the epoch its
    title names as best.pth's, the first with the highest `chosen` column (None: no validation, or
    no picture).

    Drawn on a bare matplotlib Figure, which renders with Agg: no display is needed, and no pyplot
    means the backend of whatever program imports this module is left alone. A plot that cannot be
    drawn (matplotlib missing, unreadable CSV) is a warning on stderr, never the end of a training
    run.
    """
    import csv
    png_path = Path(png_path)
    # train.py deletes stale .*.tmp* files
    tmp = png_path.with_name(f".{png_path.name}.tmp{os.getpid()}.png")
    try:
        from matplotlib.figure import Figure
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        fig = Figure(figsize=(7, 2.8), dpi=100, layout="constrained")
        ax_loss, ax_acc = fig.subplots(1, 2)
        # A run without a validation split (or one begun before them) has no or empty val_ columns;
        # one with TEST_EVERY_EPOCH off empty test_ columns (also in only some rows, after --resume
        # with it changed): each split is drawn at the epochs that have it.
        has_val = bool(rows) and all(r.get("val_acc") for r in rows)
        for split, marker in (("train", "o"), ("val", "^"), ("test", "s")):
            scored = [(e, r) for e, r in zip(epochs, rows) if r.get(f"{split}_acc")]
            if not scored or split == "val" and not has_val:
                continue
            line, = ax_loss.plot([e for e, _ in scored],
                                 [float(r[f"{split}_loss"]) for _, r in scored], marker=marker,
                                 label=split)
            ax_acc.plot([e for e, _ in scored], [100 * float(r[f"{split}_acc"]) for _, r in scored],
                        marker=marker, label=split)
            balanced = [(e, r) for e, r in scored if r.get(f"{split}_balanced_acc")]
            if balanced:  # the mean recall of the classes, in the split's colour
                ax_acc.plot([e for e, _ in balanced],
                            [100 * float(r[f"{split}_balanced_acc"]) for _, r in balanced],
                            marker=marker, linestyle="--", color=line.get_color(),
                            label=f"{split} balanced")
        for ax, name in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy (%)")):
            ax.set(xlabel="epoch", ylabel=name)
            ax.xaxis.get_major_locator().set_params(integer=True)  # no epoch 1.5
            ax.grid(alpha=0.3)
            ax.legend()
        # the epoch train.py keeps as best.pth: the first with the highest validation score
        best = None
        if has_val and all(r.get(chosen) for r in rows):
            best = max(range(len(rows)), key=lambda i: (float(rows[i][chosen]), -i))
            test = rows[best]["test_acc"]
            what = "validation" + (" balanced" if chosen == "val_balanced_acc" else "")
            fig.suptitle(f"best.pth: epoch {epochs[best]}, {what} {float(rows[best][chosen]):.2%}"
                         f"{f', test {float(test):.2%}' if test else ''}", fontsize=10)
        elif rows and rows[-1]["test_acc"]:
            fig.suptitle(f"last epoch {epochs[-1]}: "
                         f"test accuracy {float(rows[-1]['test_acc']):.2%}", fontsize=10)
        fig.savefig(tmp)
        os.replace(tmp, png_path)  # a viewer never sees a half-written file
        return epochs[best] if best is not None else None
    except (ImportError, OSError, ValueError, KeyError) as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not draw {png_path}: {e}", file=sys.stderr)
        return None


def save_figure(fig, path: Path) -> None:
    """Write a picture whole or not at all (a temporary file renamed into place, also when Ctrl-C
    or a full disk cuts it short). A picture that cannot be drawn or written is a warning: it never
    stops the printed report."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        with warnings.catch_warnings():  # a layout matplotlib cannot fit is no reason to warn
            warnings.simplefilter("ignore", UserWarning)
            fig.savefig(tmp)
        os.replace(tmp, path)
    except Exception as e:  # OSError, or a name matplotlib cannot lay out
        print(f"warning: could not write {path}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder that cannot be written holds no temporary file either
            pass
    print(f"wrote {path}")


# Class and file names in pictures are cut to this many characters (a 250-character folder name
# made mistakes.png 18,000 pixels wide); the printed report and the CSV files keep them whole.
SHORT_NAME = 24


def short(name: str, limit: int = SHORT_NAME) -> str:
    """A name as the pictures show it: at most `limit` characters, an ellipsis where it was cut."""
    return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def printable(name: str) -> str:
    """A class name as it can be printed and drawn: bytes of a folder name that are not UTF-8
    (kept by Python as lone surrogates) shown as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts: row = actual class, column = predicted class."""
    return torch.bincount(labels * n + preds, minlength=n * n).view(n, n)


def draw_confusion(cm: torch.Tensor, classes: list[str], path: Path) -> None:
    """confusion.png: see confusion_figure."""
    save_figure(confusion_figure(cm, classes), path)


def confusion_figure(cm: torch.Tensor, classes: list[str]):
    """The confusion matrix: counts in the cells, coloured by their share of the actual class."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, needs no display
    n = len(classes)
    share = (cm.double() / cm.sum(1, keepdim=True).clamp(min=1)).numpy()
    # at most 1600 px: with many classes a cell is a pixel or less
    side = min(max(4.0, 0.4 * n + 1.4), 16.0)
    fig = Figure(figsize=(side, side * 0.92), dpi=100, layout="constrained")
    ax = fig.subplots()
    # gamma < 1 so that a class confused 1% of the time is already visibly tinted
    ax.imshow(share, cmap="Blues", norm=PowerNorm(0.4, vmin=0, vmax=1))
    if n <= 30:  # beyond that the numbers no longer fit in the cells
        for (i, j), v in np.ndenumerate(cm.numpy()):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else ("0.75" if v == 0 else "black"))
    long_names = max(map(len, classes)) > 3
    if n <= MAX_MATRIX_CLASSES:
        ax.set_xticks(range(n), classes, rotation=45 if long_names else 0,
                      ha="right" if long_names else "center", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        ax.set(xlabel="predicted", ylabel="actual")
    else:  # names would overlap: the axes count class indices (the order of the per-class table)
        ax.set(xlabel="predicted (class index)", ylabel="actual (class index)")
    acc = cm.diag().sum().item() / max(1, cm.sum().item())
    ax.set_title(f"confusion matrix, test accuracy {acc:.2%}", fontsize=9)
    return fig


def draw_grid(data, indices: list[int], preds: torch.Tensor, labels: torch.Tensor,
              classes: list[str], path: Path) -> None:
    """predictions.png: see grid_figure."""
    save_figure(grid_figure(data, indices, preds, labels, classes), path)


def grid_figure(data, indices: list[int], preds: torch.Tensor, labels: torch.Tensor,
                classes: list[str], title: str | None = None):
    """Images as the dataset stores them, each with its predicted and actual label; mistakes get a
    red caption and a red frame."""
    from matplotlib.figure import Figure
    cols = min(len(indices), max(8, math.ceil(math.sqrt(len(indices)))))
    rows = math.ceil(len(indices) / cols)
    cell = max(0.95, 0.075 * (5 + max(map(len, classes))))  # inches: room for "pred automobile"
    fig = Figure(figsize=(cols * cell, rows * 1.12 + 0.3), dpi=80, layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    wrong = 0
    for ax, i in zip(axes, indices):
        img, p, y = data.raw(i), int(preds[i]), int(labels[i])
        ok = p == y
        wrong += not ok
        gray = img.mode == "L"
        ax.imshow(img, cmap="gray" if gray else None, vmin=0 if gray else None,
                  vmax=255 if gray else None, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"pred {classes[p]}\ntrue {classes[y]}", fontsize=7,
                     color="black" if ok else "red", fontweight="normal" if ok else "bold", pad=2)
        for spine in ax.spines.values():
            spine.set_color("0.8" if ok else "red")
            spine.set_linewidth(0.5 if ok else 2.5)
    for ax in axes[len(indices):]:  # the empty cells of the last row
        ax.set_axis_off()
    fig.suptitle(title or f"{len(indices)} test images: predicted and true label, {wrong} wrong "
                 "(in red)", fontsize=9)
    return fig


def draw_cams(images: list, heats: list, titles: list[str], wrong: list[bool], title: str,
              path: Path) -> None:
    """cam.png and mistakes.png: each image with its Grad-CAM heat map laid over it (red: where the
    class score rises most), under its title; wrong predictions in red."""
    from matplotlib.figure import Figure
    if not images:
        return
    cols = min(len(images), 8)
    rows = math.ceil(len(images) / cols)
    longest = max(len(line) for t in titles for line in t.splitlines())
    cell = max(1.3, 0.075 * (longest + 2))
    lines = max(t.count("\n") + 1 for t in titles)
    fig = Figure(figsize=(cols * cell, rows * (cell + 0.15 * lines) + 0.4), dpi=80,
                 layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, img, heat, text, bad in zip(axes, images, heats, titles, wrong):
        w, h = img.size
        gray = img.mode == "L"
        ax.imshow(img, cmap="gray" if gray else None, vmin=0 if gray else None,
                  vmax=255 if gray else None, interpolation="nearest", extent=(0, w, h, 0))
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(0, w, h, 0),
                  interpolation="bilinear")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(text, fontsize=7, color="red" if bad else "black", pad=2)
    for ax in axes[len(images):]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
