"""Train a hand-written VGG16 (net.py) on MNIST, Fashion-MNIST, CIFAR-10 or your own image folders.

    python train.py                                # VGG16 on MNIST at 224 px, saved in save_model/
    python train.py --epochs 3 --dataset cifar10   # any constant below can be overridden like this
    python train.py --image-size 32 --width-div 4  # a size that trains in minutes on a laptop CPU
    python train.py recipes/mnist_cpu.py           # the settings of a recipe file (options still win)
    python train.py --resume                       # continue save_model/last.pth where it stopped
    torchrun --nproc_per_node=8 train.py           # data-parallel on 8 GPUs, BATCH_SIZE each
    python train.py --help                         # every option with its default

Then `python test.py` reloads save_model/best.pth and shows predicted against actual labels.
"""

import copy
import math
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import checkpoints
import cli
import devices
import imagedata
import plots
import pretrained
from cli import console
from errors import UserError
from net import build_model

# ---------------------------------------------------------------------------------- hyperparameters
# Edit these, or override any of them on the command line: python train.py --lr 0.05 --no-batch-norm
# data
DATASET = "mnist"         # mnist | fashion-mnist | cifar10 | folder (DATA_DIR/train/CLASS/*.jpg and
                          # DATA_DIR/test/...)
DATA_DIR = os.environ.get("DATA_DIR", "data")  # dataset root (environment variable DATA_DIR, else
                                               # ./data)
IMAGE_SIZE = 224          # network input side in pixels (>= 32); 28 px digits are upsampled on the
                          # device
AUGMENT = "auto"          # auto | on | off: random crop (SHIFT px padding), + flip except
                          # digits; auto = on for cifar10/folder
SHIFT = 4                 # with AUGMENT: the crops shift images by up to this many pixels
                          # (folders: 32nds of the side); 0: flips only
CUTOUT = 0.0              # with AUGMENT: a square of this share of the image's side, at a random
                          # place in each training image, set to the mean colour (0: off)
WORKERS = 4               # DataLoader worker processes (folder dataset only; the others live on the
                          # device)
SKIP_BAD_IMAGES = False   # folder dataset: leave out unreadable image files (else they stop the
                          # run)
VAL_FRACTION = 0.1        # share of train images held out to choose best.pth (0: none); a folder's
                          # val/ wins
TTA = False               # validation and test: average the logits of each image and its mirror
                          # image (fashion-mnist, cifar10, folder; the CIFAR-10 recipe: +1.8 points)
TTA_SHIFT = 0             # with TTA: also the image moved this many 32nds of its side (1 px at 32
                          # px) down-right and up-left, each mirrored too: 6 views, 3x the time
TEST_EVERY_EPOCH = True   # score the test split after every epoch (metrics.csv, curves.png); False:
                          # only best.pth, once, after the last epoch (saves that time each epoch)
# model
DEPTH = 16                # VGG depth: 11 | 13 | 16 | 19
WIDTH_DIV = 1             # divide every channel count by this (4 = a 'small VGG' for CPUs)
BATCH_NORM = True         # BatchNorm after each convolution; trains reliably from scratch
DROPOUT = 0.5             # dropout probability in the classifier
PRETRAINED = None         # None: random weights | imagenet: torchvision's ImageNet weights (full
                          # width) | a path: a checkpoint of this repo or a torchvision state dict
FREEZE_EPOCHS = 1         # with PRETRAINED: the first N epochs train only the new last layer
BACKBONE_LR_MULT = 0.1    # with PRETRAINED: after them the pretrained layers train at LR x this
# optim
EPOCHS = 10               # passes over the training set
BATCH_SIZE = 128          # images per step, per process
OPTIMIZER = "sgd"         # sgd (with momentum) | adamw
LR = 0.02                 # peak learning rate (for BATCH_SIZE 128 on one process)
MOMENTUM = 0.9            # SGD momentum (AdamW: beta1)
NESTEROV = False          # SGD: Nesterov momentum (the gradient taken one momentum step ahead)
WEIGHT_DECAY = 5e-4       # L2 penalty, applied by the optimizer
SMALL_MAP_LR = False      # below 224 px the pool copies each value of the last map for the first
                          # Linear (49 times below 64 px), which then learns that many times faster
                          # than LR says (torchvision's recipe); True: its weight at LR / the copies
                          # and WEIGHT_DECAY x them, so the layer moves at LR
LABEL_SMOOTHING = 0.0     # the training loss aims at 1 - this for the true class (0.1 is common;
                          # 0 = off); validation and test losses are plain cross-entropy
SCHEDULE = "cosine"       # cosine | linear | step | constant: the rate after the warm-up (cosine and
                          # linear fall to 0 at the last step); updated after every step
WARMUP_EPOCHS = 0.0       # linear warm-up from 0 over this many epochs (fractions allowed)
STEP_EPOCHS = 30          # step schedule: multiply the rate by STEP_GAMMA every STEP_EPOCHS epochs
STEP_GAMMA = 0.1          # step schedule: the factor
EMA_DECAY = 0.0           # validate, test and save a moving average of the weights (and BatchNorm
                          # statistics) instead of the weights: average = decay x average +
                          # (1 - decay) x weights after each step (0.999 is common; 0 = off)
# system
DEVICE = "auto"           # auto (cuda > npu > mps > cpu) | cuda | cuda:1 | npu | mps | cpu
AMP = "auto"              # auto | bf16 | fp16 | off: mixed precision (auto: bf16 where supported,
                          # fp16 on older GPUs)
COMPILE = False           # torch.compile the model (faster on recent GPUs after a minute of
                          # compiling)
SEED = 0                  # seeds the weights, the shuffles and the augmentation
SAVE_DIR = "save_model"   # where checkpoints, metrics.csv and curves.png go
KEEP = 3                  # how many epoch_NNN.pth to keep (each is about 530 MB for VGG16); 0 keeps
                          # all
SAVE_EVERY_MINUTES = 0.0  # also write last.pth inside an epoch this often (0 = only at epoch ends)
LOG_EVERY = 50            # steps between progress-bar updates (each costs one device sync)
# --------------------------------------------------------------------------------------------------
DEFAULTS = cli.frozen(globals())  # the settings above, frozen: a constant defined below is no flag

# Settings that do not change what is computed: on --resume these follow this invocation
# (--epochs only when typed, to extend a run), every other one comes from the checkpoint.
RUNTIME_KEYS = ("data_dir", "workers", "device", "amp", "compile", "save_dir", "keep",
                "save_every_minutes", "log_every", "epochs", "skip_bad_images", "test_every_epoch")


class Diverged(Exception):
    """The loss or the weights are no longer finite: run() says where in one line, and exits 3."""


@dataclass
class EpochTotals:
    """Sums over the images of an epoch so far; divided by `images` only when shown, so loss and
    accuracy are over the whole split, not averaged per batch. A checkpoint stores them as the list
    [loss, correct, images] ("partial")."""
    loss: float = 0.0     # summed cross-entropy
    correct: float = 0.0  # images predicted right
    images: float = 0.0   # images seen

    def __add__(self, other: "EpochTotals") -> "EpochTotals":
        return EpochTotals(self.loss + other.loss, self.correct + other.correct,
                           self.images + other.images)

    def as_list(self) -> list[float]:
        return [self.loss, self.correct, self.images]

    def summed(self, device: torch.device, distributed: bool) -> "EpochTotals":
        """The totals of all processes (each saw its own shard)."""
        return EpochTotals(*devices.sum_across(self.as_list(), device, distributed))


class Preemption:
    """When the loop stops or saves inside an epoch: SIGINT/SIGTERM ask it to finish its step, write
    last.pth and exit; SAVE_EVERY_MINUTES asks it to write last.pth and go on.

    The handler stays installed for repeated signals: torchrun forwards SIGTERM (and SIGINT) to
    each process group while SLURM or a terminal's Ctrl-C also reach every process directly, so a
    second signal comes at once and must not kill the save. Only a second Ctrl-C in a plain run
    stops at once (KeyboardInterrupt, which run() reports in one line).

    Every process must take the same decision at the same step, since saving gathers all of their
    random states, and a process that stopped or raised alone would leave the others waiting in a
    collective. A plain run decides at every step. Processes agree by one small all-reduce (each
    one a device sync) at log steps, at the epoch's last step, and often enough in between that a
    stop is taken within agree_seconds; the interval comes from the slowest process's step time,
    reduced with the flags, so all processes compute the same one."""

    # Under torchrun the processes agree on stopping at least this often (torchrun's grace is 30 s).
    agree_seconds = 5.0

    def __init__(self, distributed: bool, save_every_minutes: float = 0.0, log_every: int = 1,
                 device: torch.device | None = None):
        self.signal: int | None = None
        self.distributed = distributed
        self.save_seconds = 60 * save_every_minutes
        self.log_every = log_every
        self.device = device
        self.last_save = self.last_agreement = time.monotonic()
        self.steps_since_agreement, self.agree_every = 0, 1

    def install(self) -> None:
        for signum in devices.STOP_SIGNALS:
            signal.signal(signum, self)

    def __call__(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT and not self.distributed:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self, epoch: int, step: int, steps_per_epoch: int,
             first_bad: torch.Tensor) -> tuple[bool, bool]:
        """(stop now, save now) after `step` steps of epoch `epoch` (counted from 0). first_bad:
        this process's first step with a non-finite loss, or -1; under torchrun any process's is
        Diverged."""
        save_due = self.save_seconds > 0 and time.monotonic() - self.last_save >= self.save_seconds
        if not self.distributed:
            return self.signal is not None, save_due
        self.steps_since_agreement += 1
        due = self.steps_since_agreement >= self.agree_every
        if not due and step % self.log_every and step != steps_per_epoch:
            return False, False
        now = time.monotonic()
        bad = int(first_bad)
        # float32 (HCCL has no float64); a bad step is sent as steps_per_epoch - step, so MAX finds
        # the first.
        step_seconds = (now - self.last_agreement) / self.steps_since_agreement
        bad_flag = steps_per_epoch - bad if bad >= 0 else 0
        flags = torch.tensor([self.signal or 0, save_due, bad_flag, step_seconds],
                             dtype=torch.float32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, save, bad, step_seconds = flags.tolist()
        every = int(self.agree_seconds / max(step_seconds, 1e-6))
        self.steps_since_agreement, self.last_agreement = 0, now
        self.agree_every = max(1, min(self.log_every, every))
        if bad:  # on every process at once, so none waits in a collective for one that stopped
            raise Diverged(f"epoch {epoch + 1}, step {steps_per_epoch - int(bad) + 1}")
        self.signal = int(signum) or None
        return bool(signum), bool(save)


def continue_command(run: "Run") -> str:
    """The command that continues this run (its data folder is in last.pth)."""
    start = (f"torchrun --nproc_per_node={run.world} train.py" if run.distributed
             else "python train.py")
    save = ("" if Path(run.config["save_dir"]) == Path(DEFAULTS["SAVE_DIR"])
            else f" --save-dir {shlex.quote(str(run.config['save_dir']))}")
    return f"{start} --resume{save}"


def extra_options(parser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/last.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even though SAVE_DIR already holds one (its files "
                             "are replaced)")


def make_optimizer(model, c: dict, world: int = 1) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over pretrained.parameter_groups: no weight decay on biases and
    BatchNorm parameters; a fine-tune's pretrained layers at LR x BACKBONE_LR_MULT."""
    lr = effective_lr(c, world)
    groups = pretrained.parameter_groups(model, c, lr)
    fused = devices.fused_step(next(model.parameters()).device)
    if c["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(c["momentum"], 0.999), fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=c["momentum"], nesterov=c["nesterov"],
                           fused=fused)


def make_average(model, c: dict) -> AveragedModel | None:
    """The exponential moving average of the weights (EMA_DECAY), or None when it is 0. BatchNorm's
    running statistics are averaged with them (use_buffers), so the average evaluates as one
    network. In the first steps the decay is lower, min(EMA_DECAY, (1 + n) / (10 + n)) after n
    updates, so the random initial weights are forgotten quickly (the usual warm-up of an EMA)."""
    decay = c["ema_decay"]
    if not decay:
        return None

    def update(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        # the count as the host keeps it: reading the device's copy (n_averaged) would make the
        # host wait for the device every step
        n = int(average.n_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for a, w in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(w, weight)
            else:
                a.copy_(w)  # BatchNorm's count of batches

    average = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    average.n_averaged = average.n_averaged.cpu()  # where the count is kept (see update)
    return average.requires_grad_(False)


def effective_lr(c: dict, world: int) -> float:
    """LR is the rate for one process's BATCH_SIZE images; `world` processes step on world times as
    many, so the rate grows with them (the linear scaling rule; a warm-up helps at large
    batches)."""
    return c["lr"] * world


def make_scheduler(optimizer, c: dict, steps_per_epoch: int):
    """A factor on the learning rate per optimizer step: linear warm-up, then cosine, linear, step
    or constant. The loop steps it after the optimizer, so step k trains at LR * factor(k)."""
    total = c["epochs"] * steps_per_epoch
    warmup = round(c["warmup_epochs"] * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if c["schedule"] == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if c["schedule"] == "linear":
            return 1.0 - progress
        if c["schedule"] == "step":
            return c["step_gamma"] ** (step // (c["step_epochs"] * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def merge_resumed_config(stored: dict, given: dict, typed: set, log) -> dict:
    """The checkpoint's settings, so the run continues as it began, except:
    the run-time settings (device, data folder, ...), which follow this invocation, and a typed
    --epochs.
    Each typed value that differs from the checkpoint is reported with the value that is used."""
    merged = dict(stored)
    for key, value in given.items():
        if key in RUNTIME_KEYS and (key != "epochs" or key in typed) or key not in stored:
            merged[key] = value
        if key in typed and key in stored and stored[key] != value:
            flag = "--" + key.replace("_", "-")
            used = "this value" if merged[key] == value else f"the checkpoint's {stored[key]!r}"
            log(f"resume: {flag} {value!r} differs from the checkpoint's {stored[key]!r}: "
                f"using {used}")
    return merged


# ---------------------------------------------------------------------------------- the run's state

@dataclass
class Run:
    """What stays fixed during a run, on this process."""
    config: dict
    classes: list[str]
    device: torch.device
    amp: torch.dtype | None
    rank: int = 0
    world: int = 1
    steps_per_epoch: int = 1
    folder_in_memory: bool | None = None  # a folder's training images: decoded in memory or read
                                          # by DataLoader workers (None: not a folder)
    pretrained: str | None = None         # what the weights started from, for the header

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def save_dir(self) -> Path:
        return Path(self.config["save_dir"])

    @property
    def last_path(self) -> Path:
        return checkpoints.last_path(self.save_dir)

    def log(self, *args, **kwargs) -> None:
        """Progress lines, from rank 0 only."""
        if self.master:
            console(*args, **kwargs)


@dataclass
class TrainingState:
    """Everything a step changes, and where the run stands: what last.pth saves and --resume
    restores."""
    model: torch.nn.Module  # the plain network (not wrapped by DDP or torch.compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    aug_gen: torch.Generator  # the augmentation's random stream
    average: AveragedModel | None  # the weights' moving average (EMA_DECAY), or None
    epoch: int = 0            # epochs completed
    step: int = 0             # steps done in the next epoch
    best_acc: float = 0.0     # the best validation accuracy so far
    # The totals of the steps done in the next epoch (rank 0: over all processes, as in last.pth)
    partial: EpochTotals = field(default_factory=EpochTotals)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network validation, test and the epoch files use: the average when there is one."""
        return self.average.module if self.average is not None else self.model

    def checkpoint(self, run: Run, epoch: int, step: int, partial: EpochTotals) -> dict:
        """The full training state as last.pth holds it. epoch/step: epochs completed, and steps
        done in the next one; partial: this process's totals so far in that epoch (summed here over
        all processes). Every process must call this: it gathers their random states."""
        if not all_finite(self.model, run):
            raise Diverged(f"epoch {epoch + 1 if step else epoch}, step {step} "
                           "(the weights or the BatchNorm statistics are no longer finite)")
        partial = partial.summed(run.device, run.distributed)
        rng = devices.random_state(run.device, self.aug_gen)
        rngs = [None] * run.world
        if run.distributed:
            # each process has its own dropout and augmentation streams
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return checkpoints.training_state(
            model=checkpoints.model_state(self.model), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), epoch=epoch,
            step=step, best_acc=self.best_acc, config=run.config, classes=run.classes,
            world=run.world, rng=rngs, partial=partial.as_list(),
            folder_in_memory=run.folder_in_memory,
            ema=self.average.state_dict() if self.average is not None else None)


def all_finite(model: torch.nn.Module, run: Run) -> bool:
    """Whether every parameter and floating-point buffer (BatchNorm's running statistics) is
    finite, on every process: all of them must then agree to save or to stop."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    if run.distributed:
        flag = torch.tensor([float(finite)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def build_state(run: Run, ckpt: dict | None,
                fetched: pretrained.Source | None = None) -> TrainingState:
    """Model, optimizer, schedule, loss scaler and augmentation stream: fresh (the same initial
    weights on every process, or the pretrained ones `fetched`), or where last.pth left them."""
    c, device, world, rank = run.config, run.device, run.world, run.rank
    torch.manual_seed(c["seed"])
    model = build_model(c, len(run.classes))
    if ckpt is None and fetched is not None:  # start from pretrained weights
        run.pretrained = pretrained.load_pretrained(model, c, run.classes, fetched)
    elif c.get("pretrained") is not None:
        run.pretrained = f"{c['pretrained']} (resumed)"
    model = model.to(device)
    if device.type in ("cuda", "cpu"):
        # faster convolutions on both (measured on the CPU)
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, c, world)
    scheduler = make_scheduler(optimizer, c, run.steps_per_epoch)
    # fp16 needs loss scaling, bf16 not
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)
    torch.manual_seed(c["seed"] + rank)  # dropout differs between processes
    aug_gen = torch.Generator(device=device if device.type != "mps" else "cpu")
    state = TrainingState(model, optimizer, scheduler, scaler, aug_gen, make_average(model, c))
    if ckpt is None:
        return state
    checkpoints.load_model_state(model, ckpt["model"], run.last_path)
    if state.average is not None:
        if not ckpt["ema"]:
            raise UserError(f"{run.last_path} was trained with --ema-decay {c['ema_decay']} but "
                            "holds no average of the weights (ema) to continue it")
        checkpoints.load_model_state(state.average, ckpt["ema"], run.last_path)
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the saved groups name the device they were made for
        group["fused"] = devices.fused_step(device)
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when the run was not in fp16 (GradScaler refuses an empty state)
        scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step, state.best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_acc"]
    if run.master:  # the checkpoint holds the epoch's sums over all processes
        state.partial = EpochTotals(*ckpt["partial"])
    ckpt_world = ckpt["world"]
    if world == ckpt_world:  # the random streams go on where they were (dropout, augmentation)
        moved = devices.restore_random_state(ckpt["rng"][rank], device, aug_gen)
        if moved:
            run.log(moved)
            if state.step and "augmentation" in moved:  # else the epoch's start seeds it
                aug_gen.manual_seed(imagedata.augmentation_seed(c["seed"], state.epoch, rank))
    else:
        # Fewer or more processes mean more or fewer steps per epoch: go on from the same share of
        # the epoch, and put the schedule at the matching step.
        state.step = min(run.steps_per_epoch, state.step * ckpt_world // world)
        scheduler.last_epoch = state.epoch * run.steps_per_epoch + state.step
        # the rate of the new global batch
        scheduler.base_lrs = [effective_lr(c, world) * g.get("lr_mult", 1.0)
                              for g in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                       scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        run.log(f"resume: the run had {ckpt_world} process(es) and now has {world}: the schedule "
                f"is rescaled (learning rate {effective_lr(c, world):g} for the global batch of "
                f"{c['batch_size'] * world})"
                f"{', the rest of the epoch re-sharded' if state.step else ''} "
                "and the random streams start afresh")
    return state


# ---------------------------------------------------------------------------------------- one epoch

def train_one_epoch(run: Run, state: TrainingState, train_model, data, epoch: int,
                    preemption: Preemption, save, warn_slow: bool = False) -> EpochTotals:
    """The steps of epoch `epoch` (counted from 0) from state.step on; returns this process's totals
    over the whole epoch (those before a mid-epoch resume included). save(ckpt) writes last.pth."""
    c, device, steps_per_epoch = run.config, run.device, run.steps_per_epoch
    start_step = state.step
    if start_step == 0:
        state.partial = EpochTotals()
    batches = imagedata.epoch_batches(data, c, epoch, start_step, steps_per_epoch, state.aug_gen,
                                      run.rank, run.world)
    # Running sums stay on the device: no host sync until a log step.
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # MPS has no float64
    correct = torch.zeros((), dtype=torch.long, device=device)
    # the first step with a non-finite loss
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    seen = 0
    bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{c['epochs']}",
               disable=not run.master, dynamic_ncols=True, leave=False,
               file=cli.QuietStream(sys.stderr))
    t_log, seen_log, first_steps = time.perf_counter(), 0, []
    step = start_step
    model = state.model
    pretrained.train_mode(model, frozen=pretrained.frozen_at(c, epoch))
    for x, y in batches:
        with devices.autocast(device, run.amp):
            logits = train_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=c["label_smoothing"])
        scaler = state.scaler
        scaler.scale(loss).backward()
        scaler.step(state.optimizer)
        scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()  # after the optimizer step: the rate of the step to come
        if state.average is not None:
            state.average.update_parameters(model)
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        seen += len(y)
        step += 1
        bar.update()
        if warn_slow and step - start_step in (1, 2):  # step 1 includes warm-up
            first_steps.append(time.perf_counter())
            warning = len(first_steps) == 2 and devices.slow_epoch_warning(
                device, first_steps[1] - first_steps[0], steps_per_epoch)
            if warning:
                bar.write(warning, file=sys.stderr)
        stopping, save_now = preemption.poll(epoch, step, steps_per_epoch, first_bad)
        if step % c["log_every"] == 0 or save_now or stopping:
            if int(first_bad) >= 0:
                raise Diverged(f"epoch {epoch + 1}, step {int(first_bad) + 1}")
            now = time.perf_counter()
            so_far = state.partial + EpochTotals(float(loss_sum), int(correct), seen)
            bar.set_postfix(loss=f"{so_far.loss / so_far.images:.4f}",
                            acc=f"{so_far.correct / so_far.images:.2%}",
                            img_s=f"{(seen - seen_log) * run.world / (now - t_log):.0f}")
            t_log, seen_log = now, seen
        if save_now or stopping:
            so_far = state.partial + EpochTotals(float(loss_sum), int(correct), seen)
            save(state.checkpoint(run, epoch, step, so_far))
            preemption.saved()
            if stopping:
                if run.distributed:
                    # torchrun ends the group when one process exits: not before the save
                    dist.barrier()
                bar.close()
                name = signal.Signals(preemption.signal).name
                run.log(f"stopped by {name} at epoch {epoch + 1}, step {step}; saved "
                        f"{run.last_path}; continue with: {continue_command(run)}",
                        file=sys.stderr)
                sys.exit(128 + preemption.signal)
    bar.close()
    if int(first_bad) >= 0:
        raise Diverged(f"epoch {epoch + 1}, step {int(first_bad) + 1}")
    state.step = 0
    return state.partial + EpochTotals(float(loss_sum), int(correct), seen)


@torch.inference_mode()
def evaluate(model, data, batch_size: int, device, amp, rank: int = 0, world: int = 1,
             tta: bool = False, tta_shift: int = 0) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split; each process takes every world-th sample. With
    tta, of the logits averaged over each image and its mirror image (and with tta_shift over the
    moved images too: imagedata.predict)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # MPS has no float64
    correct = torch.zeros((), dtype=torch.long, device=device)
    indices = torch.arange(len(data))[rank::world]
    for x, y in data.batches(indices, batch_size):
        with devices.autocast(device, amp):
            logits = imagedata.predict(model, x, tta, tta_shift)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    loss_sum, correct = devices.sum_across([loss_sum.item(), correct.item()], device, world > 1)
    return loss_sum / len(data), correct / len(data)


# ---------------------------------------------------------------------------------------- the run

def start_or_resume(config: dict, args, log) -> tuple[dict, dict | None]:
    """(the run's settings, last.pth or None): decided before anything in SAVE_DIR is written."""
    last_path = checkpoints.last_path(config["save_dir"])
    args.data_from = imagedata.choose_data_dir(
        config["data_dir"] if "data_dir" in args.explicit else None, None, config["data_dir"])[1]
    if args.resume:
        ckpt = checkpoints.load(last_path)
        if "optimizer" not in ckpt:
            raise UserError(f"{last_path} has no training state to resume from")
        typed = config["data_dir"] if "data_dir" in args.explicit else None
        data_dir, args.data_from = imagedata.choose_data_dir(
            typed, ckpt["config"].get("data_dir"), config["data_dir"])
        config = merge_resumed_config(ckpt["config"], config | {"data_dir": data_dir},
                                      args.explicit, log)
        cli.check_config(config)
        imagedata.check_settings(config)
        # a typed --epochs below where the run stands would silently do nothing
        done, step = ckpt["epoch"], ckpt["step"]
        if "epochs" in args.explicit and config["epochs"] < done + (1 if step else 0):
            where = (f"is in epoch {done + 1} (step {step})" if step else
                     f"has finished {done} epoch(s)")
            raise UserError(f"--epochs {config['epochs']}: {last_path} {where}; give --epochs "
                            f"{done + 1} or more to train on (python test.py tests its best.pth)")
        return config, ckpt
    if not args.overwrite and (found := checkpoints.previous_run_files(last_path.parent)):
        if last_path.exists():
            raise UserError(f"{last_path} already holds a run: continue it with --resume, start "
                            "over with --overwrite, or pick another --save-dir")
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"{last_path.parent} already holds a run ({names}) without a last.pth to "
                        "continue it from: start over with --overwrite, or pick another --save-dir")
    return config, None


def check_fine_tune(c: dict, args) -> None:
    """FREEZE_EPOCHS and BACKBONE_LR_MULT act only on a run that starts from pretrained weights:
    given without PRETRAINED they would be dropped without a word (a resumed run keeps its own)."""
    if c["pretrained"] is None and not args.resume:
        for key in ("freeze_epochs", "backbone_lr_mult"):
            if key in args.explicit:
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{flag} acts on a run from pretrained weights, and this one has "
                                f"none: add --pretrained (imagenet, or a file), or leave {flag} out")


def check_save_dir_outside_data(c: dict) -> None:
    """A save folder inside a folder dataset's train/, val/ or test/ would become a class of it."""
    if c["dataset"] != "folder":
        return
    save = Path(c["save_dir"]).resolve()
    for split in ("train", "val", "test"):
        folder = (Path(c["data_dir"]) / split).resolve()
        if save.is_relative_to(folder):
            raise UserError(f"--save-dir {c['save_dir']} is inside the dataset's {split}/ "
                            f"({folder}), where it would become a class: pick a folder outside it")


def load_data(c: dict, device: torch.device, world: int, ckpt: dict | None):
    """(train, validation or None, test) splits, checked against the run: two classes at least, the
    classes the checkpoint was trained on, an image for every process."""
    # a folder resumes on the path it began on (last.pth says which): the two paths draw their
    # augmentation differently
    stored = ckpt["folder_in_memory"] if ckpt is not None else None
    train_data, val_data = imagedata.load_train_val(c, device, in_memory=stored)
    test_data = imagedata.load_split(c, False, device, classes=train_data.classes)
    classes = train_data.classes
    if len(classes) < 2:
        raise UserError(f"the training set has only {len(classes)} class ({', '.join(classes)}); "
                        "a classifier needs at least 2")
    if ckpt is not None and list(ckpt["classes"]) != list(classes):
        shown = lambda names: f"{list(names)[:10]}{' ...' if len(names) > 10 else ''}"  # noqa: E731
        raise UserError(f"{c['data_dir']} has classes {shown(classes)}, but "
                        f"{Path(c['save_dir']) / 'last.pth'} was trained on "
                        f"{shown(ckpt['classes'])}: resume with the data the run began with")
    if len(train_data) < world:
        raise UserError(f"the training set has {len(train_data)} images, fewer than the {world} "
                        "processes")
    return train_data, val_data, test_data


def save_last(run: Run, old_run: checkpoints.OldRun, ckpt: dict) -> None:
    """last.pth, from rank 0 (--overwrite: the previous run goes at this first save)."""
    if run.master:
        old_run.before_save()
        checkpoints.save(ckpt, run.last_path)
        old_run.after_save(run.log)


def finish_epoch(run: Run, state: TrainingState, old_run: checkpoints.OldRun, epoch: int,
                 totals: EpochTotals, val_data, test_data, t0: float) -> dict:
    """Validation and test accuracy of the epoch's weights; then epoch_NNN.pth, best.pth,
    metrics.csv, curves.png and last.pth, and the epoch's line. Returns the epoch's results."""
    c, device, amp = run.config, run.device, run.amp
    if run.distributed:  # each process's BatchNorm statistics saw only its own batches: take rank
        # 0's, as DDP does before each forward, so all evaluate (and save) one model
        # (a list: every process must broadcast the same tensors in the same order)
        for module in dict.fromkeys([state.model, state.evaluated]):
            for buf in module.buffers():
                dist.broadcast(buf, 0)
    has_val, has_test = val_data is not None, c["test_every_epoch"]
    batch, views, model = 2 * c["batch_size"], (c["tta"], c["tta_shift"]), state.evaluated
    val_loss, val_acc = (evaluate(model, val_data, batch, device, amp, run.rank, run.world, *views)
                         if has_val else (math.nan, math.nan))
    # The test split is only reported: choosing the epoch on it would make its accuracy a biased
    # maximum.
    test_loss, test_acc = (evaluate(model, test_data, batch, device, amp, run.rank, run.world,
                                    *views) if has_test else (math.nan, math.nan))
    # the same values on every process (summed across them), so all stop together
    scored = (val_loss,) * has_val + (test_loss,) * has_test
    if not all(map(math.isfinite, scored)):
        raise Diverged(f"epoch {epoch + 1}, end (the evaluated loss is no longer finite)")
    seconds = time.perf_counter() - t0
    lr = state.optimizer.param_groups[-1]["lr"]  # the head's, when a fine-tune has two rates
    is_best = not has_val or epoch == 0 or val_acc > state.best_acc
    if has_val:
        state.best_acc = max(state.best_acc, val_acc) if epoch else val_acc
    state.epoch = epoch + 1
    ckpt = state.checkpoint(run, epoch + 1, 0, EpochTotals())
    train_loss, train_acc = totals.loss / totals.images, totals.correct / totals.images
    if run.master:
        # The epoch's weights first, so a full disk at the metrics write cannot cost them; last.pth
        # goes last: if the run dies before it, --resume redoes this epoch, and the metrics row
        # written here is dropped again (see truncate_metrics).
        old_run.before_save()
        weights = checkpoints.weights(ckpt, test_acc if has_test else None,
                                      val_acc if has_val else None)
        checkpoints.save(weights, checkpoints.epoch_path(run.save_dir, epoch + 1))
        if is_best:
            checkpoints.save(weights, checkpoints.best_path(run.save_dir))
        row = [epoch + 1, f"{train_loss:.6f}", f"{train_acc:.6f}",
               f"{test_loss:.6f}" if has_test else "", f"{test_acc:.6f}" if has_test else "",
               f"{lr:.6g}", f"{seconds:.2f}", f"{totals.images / seconds:.1f}",
               f"{val_loss:.6f}" if has_val else "", f"{val_acc:.6f}" if has_val else ""]
        checkpoints.append_metrics(run.save_dir / "metrics.csv",
                                   dict(zip(checkpoints.METRICS_FIELDS, row)))
        plots.plot_curves(run.save_dir / "metrics.csv", run.save_dir / "curves.png")
        checkpoints.save(ckpt, run.last_path)
        old_run.after_save(run.log)
        checkpoints.rotate(run.save_dir, c["keep"])
    run.log(f"epoch {epoch + 1}/{c['epochs']}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
            f"{f'val loss {val_loss:.4f} acc {val_acc:.2%} | ' if has_val else ''}"
            f"{f'test loss {test_loss:.4f} acc {test_acc:.2%} | ' if has_test else ''}"
            f"lr {lr:.3g} | "
            f"{seconds:.1f} s, {totals.images / seconds:.0f} img/s{' | best' if is_best else ''}",
            flush=True)
    return {"train": (train_loss, train_acc), "val": (val_loss, val_acc) if has_val else None,
            "test": (test_loss, test_acc) if has_test else None}


def test_best(run: Run, state: TrainingState, test_data) -> tuple[float, float] | None:
    """Without TEST_EVERY_EPOCH: the test split scored once, on best.pth's weights, by rank 0 alone
    (the save folder may be its own); the result is said and stored in best.pth. None where there
    is no best.pth, or it cannot be read (a warning; the file is left as it is)."""
    path = checkpoints.best_path(run.save_dir)
    if not run.master or not path.exists():
        return None
    try:  # the file of this run, unless something outside it changed it
        best = checkpoints.load(path)
        model = copy.deepcopy(state.evaluated)  # the training state stays as it ended
        checkpoints.load_model_state(model, best["model"], path)
    except UserError as e:
        print(f"warning: could not test {path}: {e}", file=sys.stderr)
        return None
    c = run.config
    loss, acc = evaluate(model, test_data, 2 * c["batch_size"], run.device, run.amp,
                         tta=c["tta"], tta_shift=c["tta_shift"])
    del model
    best["test_acc"] = acc
    checkpoints.save(best, path)
    run.log(f"best.pth (epoch {best['epoch']}): test loss {loss:.4f} acc {acc:.2%}")
    return loss, acc


@contextmanager
def closing_data(*splits):
    """The splits' DataLoader workers are stopped when the run ends, however it ends."""
    try:
        yield
    finally:
        imagedata.close(*splits)


def wrap(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """The module the training steps call: DDP under torchrun, compiled with COMPILE."""
    if run.distributed:
        ids = [run.device.index] if run.device.type in ("cuda", "npu") else None
        model = DDP(model, device_ids=ids)
    return torch.compile(model) if run.config["compile"] else model


def header(run: Run, state: TrainingState, n_train: int, n_val: int, n_test: int,
           amp_reason: str) -> str:
    """The first line of a run: network, data, device, precision, learning rate and batch."""
    c, world = run.config, run.world
    n_params = sum(p.numel() for p in state.model.parameters())
    lr_note = f" (LR {c['lr']:g} x {world} processes)" if run.distributed else ""
    return (f"VGG{c['depth']}{'_bn' if c['batch_norm'] else ''} width/{c['width_div']}: "
            f"{n_params:,} parameters | {c['dataset']} {n_train:,} train / {n_val:,} validation / "
            f"{n_test:,} test at {c['image_size']} px"
            f"{', scored with mirror images (tta)' if c['tta'] else ''}"
            f"{' and moved ones (tta-shift)' if c['tta'] and c['tta_shift'] else ''} | "
            f"{f'pretrained: {run.pretrained} | ' if run.pretrained else ''}"
            f"device {run.device}{f' x {world} processes' if run.distributed else ''}, "
            f"precision {str(run.amp).replace('torch.', '') if run.amp else 'fp32'} "
            f"({amp_reason}) | "
            f"lr {effective_lr(c, world):g}{lr_note}, global batch {c['batch_size'] * world}")


def main() -> tuple[TrainingState, dict]:
    """One training run, as `python train.py` (or torchrun) starts it; returns the final state and
    the last epoch's results."""
    config, args = cli.parse_config(DEFAULTS, __file__, __doc__.splitlines()[0],
                                    extra=extra_options, checks=(imagedata.check_settings,),
                                    recipes=True)
    check_fine_tune(config, args)
    rank, world, local_rank = devices.setup_distributed()
    log = console if rank == 0 else (lambda *a, **k: None)
    save_dir = Path(config["save_dir"])
    check_save_dir_outside_data(config)  # before the lock creates it

    # ---- device and processes (the device follows this invocation, also on --resume)
    device = devices.pick_device(config["device"], local_rank)
    if world > 1:
        devices.init_distributed(device, config["device"], local_rank)
        # the data folder and the workers are the node's own
        devices.check_same_settings(config | {"resume": args.resume, "overwrite": args.overwrite},
                                    ignore=("data_dir", "workers"))
    # pretrained weights: downloaded (or found missing) before anything in SAVE_DIR is touched
    fetched = (pretrained.fetch_once_per_machine(config, local_rank, world > 1, device)
               if config["pretrained"] is not None and not args.resume else None)

    # ---- the save folder: locked, then a fresh run or last.pth
    if rank == 0:
        checkpoints.lock_save_dir(save_dir)
    c, ckpt = start_or_resume(config, args, log)
    if rank == 0:
        checkpoints.tidy_save_dir(save_dir, ckpt, log)
    if fetched is not None:  # the statistics the weights were trained with normalize the inputs
        c["normalize"] = fetched.normalize

    # ---- precision, data
    devices.prepare(device)
    amp, amp_reason = devices.amp_choice(device, c["amp"])
    try:
        train_data, val_data, test_data = load_data(c, device, world, ckpt)
    except UserError as e:  # say where the folder came from when the user did not type it
        if args.data_from == "--data-dir":
            raise
        raise UserError(f"{e} (data folder {c['data_dir']} from {args.data_from})") from None
    run = Run(c, train_data.classes, device, amp, rank, world,
              imagedata.steps_per_epoch(len(train_data), c["batch_size"], world),
              imagedata.in_memory(train_data) if c["dataset"] == "folder" else None)

    # ---- from here on, out of memory is one line with a batch size that fits
    with devices.out_of_memory_explained(c, device, amp, len(run.classes)), \
            closing_data(train_data, val_data, test_data):
        # ---- model, optimizer, schedule: fresh, or where last.pth left them
        state = build_state(run, ckpt, fetched)
        del fetched
        if ckpt is not None:  # (no validation has chosen a best epoch inside the first)
            best = (f", best validation accuracy {state.best_acc:.2%}"
                    if val_data is not None and state.epoch else "")
            run.log(f"resumed {run.last_path}: epoch {state.epoch + 1}, step {state.step}{best}")
        old_run = checkpoints.OldRun(save_dir,
                                     replace=run.master and args.overwrite and ckpt is None)
        del ckpt
        n_val = len(val_data) if val_data is not None else 0
        run.log(header(run, state, len(train_data), n_val, len(test_data), amp_reason))
        if c["pretrained"] is not None and c["freeze_epochs"] >= c["epochs"] and run.master:
            console(f"warning: --freeze-epochs {c['freeze_epochs']} covers all {c['epochs']} "
                    "epoch(s): only the new last layer trains, the pretrained layers never do",
                    file=sys.stderr)

        # ---- training: Ctrl-C / SIGTERM finish the step, write last.pth and exit
        preemption = Preemption(run.distributed, c["save_every_minutes"], c["log_every"], device)
        preemption.install()
        start_epoch, results = state.epoch, {}
        frozen = None
        try:
            for epoch in range(start_epoch, c["epochs"]):
                t0 = time.perf_counter()
                if pretrained.frozen_at(c, epoch) != frozen:  # the first epoch, and the unfreeze
                    frozen = pretrained.frozen_at(c, epoch)
                    pretrained.set_frozen(state.model, frozen)
                    # DDP syncs the gradients of the parameters that need them when it is built
                    train_model = wrap(run, state.model)
                totals = train_one_epoch(run, state, train_model, train_data, epoch, preemption,
                                         lambda ckpt: save_last(run, old_run, ckpt),
                                         warn_slow=run.master and epoch == start_epoch)
                totals = totals.summed(device, run.distributed)
                results = finish_epoch(run, state, old_run, epoch, totals, val_data, test_data, t0)
                if run.master:
                    preemption.saved()
        except Diverged as e:  # say whether a good checkpoint of this run is there to go back to
            kept = ("the last good checkpoint is kept" if run.last_path.exists() and not
                    old_run.pending else "no checkpoint of this run was written"
                    + ("; the previous run's files are as they were" if old_run.pending else ""))
            raise Diverged(f"{e}; {kept}") from None
        if not c["test_every_epoch"]:
            results["best_test"] = test_best(run, state, test_data)

    chosen = (f"best.pth has the best validation accuracy, {state.best_acc:.2%}"
              if val_data is not None else "best.pth is the last epoch")
    if run.master and not checkpoints.best_path(save_dir).exists():  # deleted, and no epoch file to restore
        chosen = "there is no best.pth (deleted, and no kept epoch file was the best epoch)"
    run.log(f"done: {chosen}; checkpoints in {save_dir}/ (python test.py for its test accuracy and "
            "predictions)")
    if run.distributed:
        dist.destroy_process_group()
    return state, results


def run() -> tuple[TrainingState, dict] | None:
    try:
        return cli.run_main(main)
    except Diverged as e:
        print(f"train.py: error: the loss became NaN or infinite at {e} (try a lower --lr, or "
              "--amp off)", file=sys.stderr)
        sys.exit(3)
    except Exception as e:
        if devices.is_out_of_memory(e):
            print("train.py: error: out of memory before training began "
                  f"({str(e).splitlines()[0][:200]})", file=sys.stderr)
            sys.exit(2)
        if "RANK" in os.environ and isinstance(e, RuntimeError):
            # under torchrun: a collective failed because another process ended (kill -9, a
            # crash); torch gives no more than its error to tell it by
            print("train.py: error: exchanging data with the other processes failed; another "
                  "process of this torchrun run has probably stopped "
                  f"({str(e).splitlines()[0][:160]}); last.pth holds the last save",
                  file=sys.stderr)
            sys.exit(1)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the save the first one asked for
        print("train.py: stopped by a second Ctrl-C; last.pth holds the last save", file=sys.stderr)
        sys.exit(130)
    finally:
        # for callers that run main() again in the same process (the tests)
        checkpoints.unlock_save_dir()
        devices.leave_process_group()


if __name__ == "__main__":
    run()
