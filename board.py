"""TensorBoard for a training run: what train.py writes there with TENSORBOARD = True.

    python train.py recipes/mnist_cpu.py --tensorboard
    tensorboard --logdir save_model/tensorboard

Two runs appear in TensorBoard: `epochs` (step = the epoch, from 1: loss and accuracy of the training,
validation and test splits, balanced accuracy where the epoch line shows it, the learning rate and
images/s) and `steps` (step = the optimizer step: the mean training loss of the last LOG_EVERY steps).
After the last epoch, `epochs` also holds the test split's confusion matrix and its worst mistakes,
of the last epoch's model, as pictures.

Nothing a checkpoint covers is lost and nothing is written twice: events are kept in memory and
written (and flushed) just before each last.pth is saved, so a run that dies loses only events of
steps that --resume trains again; and a resumed run tells TensorBoard to drop whatever was written
from the point it resumes from (purge_step). Only rank 0 writes. tensorboard is imported only here,
and this module only when TENSORBOARD is on.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

import imagedata
import plots


class Board:
    """The run's TensorBoard writers, opened at the first write (after an --overwrite has set the
    previous run's folder aside). epoch, step: where the run resumes from (epochs completed, and
    optimizer steps done in all), so that TensorBoard drops later events an earlier run wrote."""

    def __init__(self, folder: Path, epoch: int = 0, step: int = 0):
        self.folder, self.purge = Path(folder), {"epochs": epoch + 1, "steps": step + 1}
        self.pending: list[tuple] = []  # (run, "scalar" | "figure", tag, value, step)
        self.writers = None

    def train_steps(self, step: int, loss: float) -> None:
        """The mean training loss of the steps since the last log step, at optimizer step `step`."""
        self.pending.append(("steps", "scalar", "loss/train", loss, step))

    def epoch(self, epoch: int, train: tuple, val, test, lr: float, images_per_s: float,
              balanced: bool) -> None:
        """One epoch's values (epoch from 1); val, test: train.Score or None."""
        values = {"loss/train": train[0], "accuracy/train": train[1], "learning_rate": lr,
                  "images_per_s": images_per_s}
        for name, split in (("val", val), ("test", test)):
            if split is not None:
                values |= {f"loss/{name}": split[0], f"accuracy/{name}": split[1]}
                if balanced:
                    values[f"balanced_accuracy/{name}"] = split[2]
        self.pending += [("epochs", "scalar", tag, v, epoch) for tag, v in values.items()]

    def commit(self) -> None:
        """Write what is pending, and flush it to disk (called before each save of last.pth)."""
        if self.writers is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writers = {run: SummaryWriter(self.folder / run, purge_step=purge)
                            for run, purge in self.purge.items()}
        for run, kind, tag, value, step in self.pending:
            if kind == "scalar":
                self.writers[run].add_scalar(tag, value, step)
            else:
                self.writers[run].add_figure(tag, value, step)
        self.pending = []
        for writer in self.writers.values():
            writer.flush()

    @torch.inference_mode()
    def pictures(self, model, data, epoch: int, device, amp, mistakes: int = 16) -> None:
        """The confusion matrix of the test split and its `mistakes` highest losses, as pictures."""
        logits = imagedata.predict_logits(model, data.batches(torch.arange(len(data)), 256),
                                          device, amp)
        labels = data.labels.cpu()
        preds = logits.argmax(1)
        classes = [plots.short(plots.printable(name)) for name in data.classes]
        cm = plots.confusion_matrix(preds, labels, len(classes))
        self.pending.append(("epochs", "figure", "test/confusion_matrix",
                             plots.confusion_figure(cm, classes), epoch))
        worst = F.cross_entropy(logits, labels, reduction="none").argsort(descending=True)
        worst = worst[:mistakes].tolist()
        if worst:
            title = f"the {len(worst)} highest losses of the test split (mistakes in red)"
            self.pending.append(("epochs", "figure", "test/worst_mistakes",
                                 plots.grid_figure(data, worst, preds, labels, classes, title),
                                 epoch))

    def close(self) -> None:
        if self.writers is not None:
            for writer in self.writers.values():
                writer.close()

