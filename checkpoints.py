"""Everything about the files a run keeps in SAVE_DIR: checkpoints, metrics.csv, the lock, old runs.

This module owns the checkpoint format. A checkpoint is one dict of tensors and plain values,
built here (`training_state` for last.pth, `weights` for epoch_NNN.pth and best.pth), written
atomically by `save` and read back by `load` with weights_only=True, which passes every file
through `upgrade`: the one place that knows what older formats lacked.
"""

import contextlib
import csv
import errno
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

import net

try:
    import fcntl  # the save-folder lock; not on Windows
except ImportError:
    fcntl = None

from errors import UserError

# What a run leaves in SAVE_DIR besides epoch_NNN.pth; --overwrite removes them at the new run's
# first save.
OLD_RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png", "confusion.png",
                 "predictions.png", "tensorboard")


# Any of these (or an epoch_NNN.pth) means SAVE_DIR holds a run that a fresh start would damage.
RUN_FILES = ("last.pth", "best.pth", "metrics.csv")


# val_loss and val_acc come last, so a metrics.csv begun before validation splits keeps its columns.
METRICS_FIELDS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds",
                  "images_per_s", "val_loss", "val_acc", "val_balanced_acc", "test_balanced_acc"]


# ------------------------------------------------------------------------------ checkpoint format

# The version of the format every checkpoint names under "format".
#   1: files written before the key existed (what each lacks depends on its age: see `upgrade`).
#   2: "format" added; config holds every setting that changes the model or the run.
#   3: config gains "ema_decay" and "nesterov"; last.pth gains "ema" (the averaged weights, or None).
#   4: config gains "cutout".
#   5: config gains "shift".
#   6: config gains "small_map_lr".
#   7: last.pth no longer says how a folder's images were read ("folder_in_memory": both ways give
#      the same batches). From here on the stored settings are merged over the defaults of the code
#      that reads them (cli.merge_stored), so a setting added or removed needs no new format.
FORMAT = 7


def last_path(save_dir) -> Path:
    """The training state a run resumes from."""
    return Path(save_dir) / "last.pth"


def best_path(save_dir) -> Path:
    """The weights of the epoch with the best validation accuracy (test.py's default)."""
    return Path(save_dir) / "best.pth"


def epoch_path(save_dir, epoch: int) -> Path:
    """The weights after `epoch` (1-based) epochs."""
    return Path(save_dir) / f"epoch_{epoch:03d}.pth"


def training_state(*, model: dict, optimizer: dict, scheduler: dict, scaler: dict, epoch: int,
                   step: int, best_acc: float, config: dict, classes: list, world: int,
                   rng: list, partial: list, ema: dict | None) -> dict:
    """What last.pth holds: everything `train.py --resume` needs to go on exactly.
    model/optimizer/scheduler/scaler: state dicts; epoch: epochs completed; step: steps done in the
    next one; best_acc: the best validation accuracy so far; config: the run's settings; classes:
    the class names in label order; world: the number of processes; rng: each process's random
    streams (devices.random_state); partial: the next epoch's totals so far; ema: the state dict of
    the weights' moving average (None: EMA_DECAY is 0). With an average, "model" holds the trained
    weights and the epoch files hold the average's."""
    return {"format": FORMAT, "model": model, "optimizer": optimizer, "scheduler": scheduler,
            "scaler": scaler, "epoch": epoch, "step": step, "best_acc": best_acc,
            "config": dict(config), "classes": classes, "world": world, "rng": rng,
            "partial": partial, "ema": ema}


def weights(state: dict, test_acc: float, val_acc: float | None,
            val_balanced_acc: float | None = None) -> dict:
    """What epoch_NNN.pth and best.pth hold: the weights that were evaluated (`evaluated_weights`:
    the trained ones, or their moving average) and what test.py needs to rebuild the network, from
    a `training_state`, with that epoch's accuracies (val_acc None: no validation split)."""
    return {"format": FORMAT, "model": evaluated_weights(state), "config": dict(state["config"]),
            **{k: state[k] for k in ("classes", "epoch", "best_acc")},
            "test_acc": test_acc, "val_acc": val_acc, "val_balanced_acc": val_balanced_acc}


def evaluated_weights(ckpt: dict) -> dict:
    """The state dict of the network a checkpoint's accuracies are of: in last.pth the weights'
    moving average when the run kept one (EMA_DECAY), else "model" (all an epoch file holds)."""
    if ckpt.get("ema"):
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items()
                if k.startswith("module.")}
    return ckpt["model"]


def upgrade(ckpt: dict, path) -> dict:
    """A checkpoint of any format as the current one: older files get the values their runs had
    (settings added since then were off), a newer one is refused."""
    version = ckpt.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise UserError(f"{path} has checkpoint format {version!r}, newer than this code reads "
                        f"(format {FORMAT}): update the code to use it")
    if version < 2:
        config = ckpt["config"]
        config.setdefault("val_fraction", 0.0)   # before validation splits: all images trained
        config.setdefault("label_smoothing", 0.0)
        config.setdefault("tta", False)
        config.setdefault("pretrained", None)    # before fine-tuning: from scratch
        config.setdefault("freeze_epochs", 1)
        config.setdefault("backbone_lr_mult", 0.1)
        config.setdefault("normalize", None)     # the dataset's own statistics
        ckpt.setdefault("best_acc", 0.0)
        if "optimizer" in ckpt:  # a training state
            ckpt.setdefault("world", 1)
    if version < 3:
        config = ckpt["config"]
        config.setdefault("ema_decay", 0.0)      # before weight averaging: the weights themselves
        config.setdefault("nesterov", False)
        if "optimizer" in ckpt:
            ckpt.setdefault("ema", None)
    if version < 5:
        ckpt["config"].setdefault("shift", 4)     # before SHIFT: 4 px (folders: 1/8 of the side)
    if version < 7:
        ckpt.pop("folder_in_memory", None)        # both ways of reading a folder now augment alike
    ckpt["format"] = FORMAT
    return ckpt


# -------------------------------------------------------------------------------- checkpoint files

def save(obj: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.
    A crash or a full disk at any moment leaves the previous `path` intact."""
    path = Path(path)
    try:
        with replaced_whole(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch's zip writer says RuntimeError, without errno
        raise UserError(f"could not write {path}: {write_failure(e, path.parent)}; "
                        "the previous checkpoint is unchanged") from None


@contextlib.contextmanager
def replaced_whole(path: Path):
    """A temporary file's path in `path`'s folder, renamed over `path` when the block ends without
    an error and removed when it fails: `path` is the old file or the new one, never half of one
    (tidy_save_dir removes what a killed process left, by the same name pattern)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)  # nothing left to remove after the rename
        except OSError:  # a folder that cannot be written holds no temporary file either
            pass


def write_failure(e: Exception, folder: Path) -> str:
    """Why a write failed, in words: a full disk where the error or the free space says so."""
    if getattr(e, "errno", None) == errno.ENOSPC:
        return "the disk is full"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return "the disk is full" if free is not None and free < 2**20 else f"writing failed ({first})"


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


def load(path, map_location="cpu") -> dict:
    """Load a checkpoint written by train.py. weights_only=True: a file cannot run code when
    loaded."""
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
        ckpt = safe_load(path, map_location)
    except PermissionError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except pickle.UnpicklingError:  # another kind of file, or objects other than tensors
        raise UserError(f"{path} is not a PyTorch checkpoint of tensors and plain values; "
                        "refusing to load it (weights_only=True)") from None
    # arbitrary bytes make the unpickler fail in many ways (EOFError, IndexError, ...)
    except Exception:
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "classes"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (no model/config/classes)")
    return upgrade(ckpt, path)


def load_model(path) -> tuple[torch.nn.Module, dict]:
    """(model on the CPU, checkpoint) of any file train.py writes: the network its configuration
    describes, with the weights its accuracies were measured on (evaluated_weights: from last.pth
    of a run with EMA_DECAY the average). Weights that are not finite are a warning."""
    ckpt = load(path, map_location="cpu")
    model = net.build_model(ckpt["config"], len(ckpt["classes"]))
    state = evaluated_weights(ckpt)
    load_model_state(model, state, path)
    bad = [k for k, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        print(f"warning: {path} holds values that are not finite in {len(bad)} tensor(s) (e.g. "
              f"{bad[0]}): its predictions mean nothing; use an earlier checkpoint",
              file=sys.stderr)
    return model, ckpt


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True (a file cannot run code when loaded) and without torch's
    warnings about the file's pickle protocol: the caller says in one line what went wrong."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def plain_names(state: dict) -> dict:
    """A state dict without the prefix every key gets from a wrapper: DDP's `module.`,
    torch.compile's `_orig_mod.` (a model saved while wrapped loads like the plain network)."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def model_state(model: torch.nn.Module) -> dict:
    """The state dict of the plain network: without DDP's `module.` or torch.compile's
    `_orig_mod.`."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load weights; a checkpoint of another architecture or class count is a UserError saying
    which."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing or len(state) != len(own):
        raise UserError(f"{path} holds a different architecture "
                        f"({len(state)} tensors, expected {len(own)}; "
                        f"e.g. {(missing or sorted(set(state) - set(own)))[:1]} does not match)")
    for k, v in own.items():
        if state[k].shape != v.shape:
            if k == "classifier.6.weight" and state[k].shape[1:] == v.shape[1:]:
                raise UserError(f"{path} was trained for {state[k].shape[0]} classes, "
                                f"but {v.shape[0]} are expected")
            raise UserError(f"{path} holds a different architecture: {k} has shape "
                            f"{tuple(state[k].shape)}, expected {tuple(v.shape)} "
                            "(another depth, width or batch-norm setting)")
    model.load_state_dict(state)


# --------------------------------------------------------------------------------- the save folder

_lock = None  # (open file, path) of SAVE_DIR/.lock while this process holds it


def lock_save_dir(folder: Path) -> None:
    """Take SAVE_DIR/.lock for the whole run, before anything in the folder is read or changed: a
    second train.py on the same folder is refused with the holder's pid. The OS drops the lock when
    the process ends, however it ends, so kill -9 leaves no stale lock behind (only the file, which
    is taken over)."""
    global _lock
    check_writable(folder)
    if fcntl is None:
        return
    path = folder / ".lock"
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:  # e.g. a folder of that name
            raise UserError(f"cannot open the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            # "?": the holder has the lock but has not written its pid yet
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"{folder} is in use by another train.py (pid {holder}): "
                            "wait for it to end, stop it, or pick another --save-dir") from None
        except OSError as e:  # a file system without locks (some network mounts): go on unguarded
            f.close()
            print(f"warning: could not lock {folder} ({e.strerror or e}); "
                  "make sure no other run uses it", file=sys.stderr)
            return
        try:  # the holder may have ended and removed the file between our open and our lock
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as e:  # a full disk: the lock holds without the pid in it
        print(f"warning: could not write this process's pid to {path} "
              f"({write_failure(e, folder)})", file=sys.stderr)
    _lock = (f, path)


def unlock_save_dir() -> None:
    """Remove the lock file, then let go of the lock (in that order: see lock_save_dir's inode
    check)."""
    global _lock
    if _lock is not None:
        f, path = _lock
        path.unlink(missing_ok=True)
        f.close()
        _lock = None


def check_writable(folder: Path, option: str = "--save-dir") -> None:
    """`folder` exists (made if need be) and can be written: else one line naming `option`."""
    what = "the save folder" if option == "--save-dir" else f"the {option} folder"
    try:
        if folder.is_symlink() and not folder.exists():
            raise UserError(f"{what} {folder} is a link to {os.readlink(folder)}, which does not "
                            f"exist: create that folder, or give another {option}")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {folder} is not a folder (a file or a device): give another "
                            f"{option}")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder}: {e.strerror or e}") from None


def previous_run_files(folder: Path) -> list[str]:
    epochs = [p.name for p in epoch_files(folder)]
    return epochs + [n for n in RUN_FILES if (folder / n).exists()]


def set_aside_old_run(folder: Path) -> Path | None:
    """--overwrite: move the previous run's files into SAVE_DIR/.replaced/ just before the new run's
    first save (renames, so instant). A new run that fails earlier leaves the old one whole; one
    killed during its first save leaves the old files in .replaced/."""
    old = [p for p in [*folder.glob("epoch_*.pth"), *(folder / n for n in OLD_RUN_FILES)]
           if p.exists() or p.is_symlink()]
    if not old:
        return None
    aside = folder / ".replaced"
    shutil.rmtree(aside, ignore_errors=True)  # left by an --overwrite killed in its first save
    aside.mkdir()
    for p in old:
        os.replace(p, aside / p.name)
    return aside


def tidy_save_dir(folder: Path, ckpt: dict | None, log) -> None:
    """Before a run writes anything: the folder can be written to, temporary files of a save that
    was killed are gone, and on --resume metrics.csv and best.pth agree with last.pth."""
    check_writable(folder)
    for stale in folder.glob(".*.tmp*"):  # left by a save that was killed; never renamed into place
        stale.unlink(missing_ok=True)
    if ckpt is not None:
        truncate_metrics(folder / "metrics.csv", ckpt["epoch"])
        if not restore_best(folder, ckpt, log):
            ckpt["best_acc"] = 0.0  # so that the next epoch writes best.pth again


class OldRun:
    """--overwrite: the previous run's files are set aside (set_aside_old_run) just before the new
    run's first save and removed just after it, so a new run that fails before it (a bad file, a
    loss that diverges, a Ctrl-C) never costs the old one."""

    def __init__(self, folder: Path, replace: bool):
        self.folder, self.pending, self.aside = folder, replace, None

    def before_save(self) -> None:
        if self.pending:
            self.aside = set_aside_old_run(self.folder)

    def after_save(self, log) -> None:
        if not self.pending:
            return
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            log(f"--overwrite: removed the previous run's files from {self.folder}")
        self.pending = False


def chosen_column(config: dict) -> str:
    """The metrics.csv column, and key of the epoch files, whose highest value chooses best.pth:
    the validation accuracy, or with BALANCE the balanced accuracy."""
    return "val_balanced_acc" if config.get("balance") else "val_acc"


def restore_best(folder: Path, ckpt: dict, log) -> bool:
    """--resume with best.pth deleted: copy it back from the kept epoch_NNN.pth of the best epoch
    (the best validation accuracy; without a validation split the last epoch; in checkpoints written
    before validation splits, the best test accuracy). False when none of them is that epoch."""
    best = best_path(folder)
    if best.exists() or ckpt["epoch"] == 0:
        return True
    chosen = chosen_column(ckpt.get("config", {}))
    # oldest first: training keeps the first epoch that reaches the best accuracy (a tie is no
    # improvement), so a tie is restored from the first of them too
    for path in epoch_files(folder):
        try:  # mmap: only the few plain values are read from the disk
            weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            continue
        if not isinstance(weights, dict):
            continue
        if "val_acc" not in weights:
            is_best = weights.get("test_acc") == ckpt["best_acc"] > 0
        elif weights["val_acc"] is None:
            is_best = weights.get("epoch") == ckpt["epoch"]
        else:
            is_best = weights.get(chosen) == ckpt["best_acc"]
        if is_best:
            save(weights, best)
            log(f"resume: {best} was missing: restored from {path.name}")
            return True
    log(f"resume: {best} is missing and no kept epoch_NNN.pth is the best epoch: "
        "the best of the epochs to come becomes best.pth")
    return False


def rotate(save_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` epoch_NNN.pth (0 keeps all)."""
    if keep > 0:
        for old in epoch_files(save_dir)[:-keep]:
            old.unlink(missing_ok=True)


def epoch_files(save_dir: Path) -> list[Path]:
    """SAVE_DIR's epoch_NNN.pth, oldest first: ordered by the number (past epoch 999 the names
    grow a digit, and as text "1000" < "999")."""
    def number(p: Path) -> int:
        digits = p.stem.removeprefix("epoch_")
        return int(digits) if digits.isdigit() else -1
    return sorted(save_dir.glob("epoch_*.pth"), key=lambda p: (number(p), p.name))


# ------------------------------------------------------------------------------------- metrics.csv

def read_metrics(path: Path, header: list[str]) -> list[list[str]] | None:
    """metrics.csv's rows, header first; None when there is none. metrics.csv is a log, never a
    reason to stop: one that cannot be read as written by this header is set aside with a
    warning."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if not path.is_file():  # a folder, or a FIFO that would block
            raise ValueError("not a regular file")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows and len(rows[0]) < len(header) and rows[0] == header[:len(rows[0])]:
            # written by a version with fewer columns: the missing ones are empty in its rows
            rows = [header] + [r + [""] * (len(header) - len(rows[0]))
                               if len(r) == len(rows[0]) else r
                               for r in rows[1:]]
        if not rows or rows[0] != header:
            raise ValueError("another header")
        for r in rows[1:]:
            if len(r) != len(header):
                raise ValueError(f"a row of {len(r)} columns")
            int(r[0])
    except (OSError, ValueError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
        aside = path.with_name(path.name + ".damaged")
        n = 1
        while aside.exists() or aside.is_symlink():
            n += 1
            aside = path.with_name(f"{path.name}.damaged{n}")
        try:
            os.replace(path, aside)
        except OSError as e2:
            raise UserError(f"{path} is damaged ({e}) and could not be moved aside: "
                            f"{e2.strerror or e2}") from None
        reason = str(e).splitlines()[0][:80]
        print(f"warning: {path} is damaged ({reason}): moved to {aside.name}; a new one is started",
              file=sys.stderr)
        return None
    return rows


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): OWASP's
# advice is to put a single quote before such a cell, and to quote every cell.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value) -> str:
    """A value as a CSV cell that no spreadsheet runs: a text that a formula could start with (a
    file or class named "=HYPERLINK(...)") gets a leading single quote; a plain number stays."""
    text = str(value)
    if text.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def write_csv(path: Path, rows: list[list[str]]) -> None:
    """Whole-file and atomic, as the checkpoints: a full disk leaves the previous file, never half a
    row. Every cell is quoted and neutralized (csv_cell), in every CSV the repo writes."""
    try:
        with replaced_whole(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL).writerows([[csv_cell(v) for v in row]
                                                           for row in rows])
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"could not write {path}: {write_failure(e, path.parent)}; "
                        f"the previous {path.name} is unchanged") from None


def append_metrics(path: Path, row: dict) -> None:
    rows = read_metrics(path, list(row)) or [list(row)]
    write_csv(path, rows + [[str(v) for v in row.values()]])


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows of epochs after the checkpoint's (written by a run that died before saving
    last.pth)."""
    rows = read_metrics(path, METRICS_FIELDS)
    if rows is not None:
        kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= epochs_done]
        if len(kept) != len(rows):
            write_csv(path, kept)
