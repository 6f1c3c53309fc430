"""Train a hand-written VGG16 (net.py) on MNIST, Fashion-MNIST, CIFAR-10 or your own image folders.

    python train.py recipes/mnist_cpu.py           # 99.6% on MNIST in minutes on a laptop CPU
    python train.py                                # VGG16 on MNIST at 224 px (a GPU's job)
    python train.py --epochs 3 --dataset cifar10   # any setting below can be overridden like this
    python train.py --dataset folder --data-dir photos --pretrained imagenet   # your own photos
    python train.py --resume                       # continue save_model/last.pth where it stopped
    torchrun --nproc_per_node=8 train.py           # data-parallel on 8 GPUs, BATCH_SIZE each
    python train.py --help                         # every setting with its default

Then `python test.py` reloads save_model/best.pth and shows predicted against actual labels.
The recipe is this file: the settings, then the model, the optimizer and the schedule, then one
epoch's steps and the loop. What keeps a run safe (signals, saves, resume) is runstate.py.
"""

import math
import os
import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel

import checkpoints
import cli
import cpuconv
import devices
import folders
import imagedata
import net
import pretrained
import runstate
from cli import console
from errors import UserError
from runstate import Diverged, Run, TrainingState

# ---------------------------------------------------------------------------------- settings
# Edit these, or override any of them on the command line: python train.py --lr 0.05 --no-batch-norm
# data
DATASET = "mnist"         # mnist | fashion-mnist | cifar10 | folder (DATA_DIR/train/CLASS/*.jpg and
                          # DATA_DIR/test/...)
DATA_DIR = os.environ.get("DATA_DIR", "data")  # dataset root (environment variable DATA_DIR, else
                                               # ./data)
IMAGE_SIZE = 224          # network input side in pixels (>= 32); 28 px digits are upsampled on the
                          # device
AUGMENT: Literal["auto", "on", "off"] = "auto"  # random crops (SHIFT) and flips (not for digits);
                                                # auto: on for cifar10 and folder
SHIFT = 4                 # with AUGMENT: the crops shift images by up to this many pixels (folders:
                          # 32nds of the side); 0: flips only
WORKERS = 4               # processes that read a folder dataset's files
SKIP_BAD_IMAGES = False   # folder dataset: leave out unreadable image files (else they stop the
                          # run)
BALANCE = False           # each epoch draws the training images so that every class comes equally
                          # often, and best.pth is chosen by the classes' mean recall (balanced
                          # accuracy): for folders whose classes differ in size
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
PRETRAINED: str | None = None  # None: random weights | imagenet: torchvision's ImageNet weights
                               # (full width) | a path: a checkpoint of this repo or a state dict
FREEZE_EPOCHS = 1         # with PRETRAINED: the first N epochs train only the new last layer
BACKBONE_LR_MULT = 0.1    # with PRETRAINED: after them the pretrained layers train at LR x this
# optim
EPOCHS = 10               # passes over the training set
BATCH_SIZE = 128          # images per step, per process
OPTIMIZER: Literal["sgd", "adamw"] = "sgd"  # SGD with momentum, or AdamW
LR = 0.02                 # peak learning rate (for BATCH_SIZE 128 on one process)
MOMENTUM = 0.9            # SGD momentum (AdamW: beta1)
NESTEROV = False          # SGD: Nesterov momentum (the gradient taken one momentum step ahead)
WEIGHT_DECAY = 5e-4       # L2 penalty on the weights (not on biases and BatchNorm), by the
                          # optimizer
LABEL_SMOOTHING = 0.0     # the training loss aims at 1 - this for the true class (0.1 is common);
                          # validation and test losses are plain cross-entropy
SCHEDULE: Literal["cosine", "constant"] = "cosine"  # the rate after the warm-up: cosine falls to 0
                                                    # at the last step; updated after every step
WARMUP_EPOCHS = 0.0       # linear warm-up from 0 over this many epochs (fractions allowed)
EMA_DECAY = 0.0           # validate, test and save a moving average of the weights (and BatchNorm
                          # statistics): average = decay x average + (1 - decay) x weights after
                          # each step (0.999 is common; 0 = off)
# system
DEVICE = "auto"           # auto (cuda > npu > mps > cpu) | cuda | cuda:1 | npu | mps | cpu
AMP: Literal["auto", "bf16", "fp16", "off"] = "auto"  # mixed precision (auto: bf16 where it is
                                                      # faster, fp16 on older GPUs)
COMPILE = False           # torch.compile the model (faster on recent GPUs after a minute of
                          # compiling; slower on the CPUs measured)
SEED = 0                  # seeds the weights, the shuffles and the augmentation
SAVE_DIR = "save_model"   # where checkpoints, metrics.csv and curves.png go
KEEP = 3                  # how many epoch_NNN.pth to keep (each is about 530 MB for VGG16); 0 keeps
                          # all
SAVE_EVERY_MINUTES = 0.0  # also write last.pth inside an epoch this often (0 = only at epoch ends)
LOG_EVERY = 50            # steps between progress-bar updates (each costs one device sync)
TENSORBOARD = False       # also write TensorBoard event files to SAVE_DIR/tensorboard (board.py)
# ------------------------------------------------------------------------------------------
DEFAULTS = cli.settings(globals())  # the block above ends here: a constant below is no setting

# What each value must be; checked on the command line, in recipes, in the block above and in a
# checkpoint's stored settings (a failure is one line, exit code 2).
RULES = [
    ("image_size", f"from {net.MIN_IMAGE_SIZE} to {net.MAX_IMAGE_SIZE} pixels",
     lambda v: net.MIN_IMAGE_SIZE <= v <= net.MAX_IMAGE_SIZE),
    ("shift", "from 0 to 16 pixels (0: flips only)", lambda v: 0 <= v <= 16),
    ("workers", "from 0 to 256", lambda v: 0 <= v <= 256),
    ("val_fraction", "in [0, 1)", lambda v: 0 <= v < 1),
    ("tta_shift", "from 0 to 8 32nds of the side (0: mirror images only)", lambda v: 0 <= v <= 8),
    ("depth", f"one of {', '.join(map(str, net.CFGS))}", lambda v: v in net.CFGS),
    ("width_div", f"one of {', '.join(map(str, net.WIDTH_DIVS))} (it divides 64)",
     lambda v: v in net.WIDTH_DIVS),
    ("dropout", "in [0, 1)", lambda v: 0 <= v < 1),
    ("freeze_epochs", ">= 0", lambda v: v >= 0),
    ("backbone_lr_mult", ">= 0", lambda v: v >= 0),
    ("epochs", "from 1 to 1000000 (shuffles are seeded by seed * 1000003 + epoch)",
     lambda v: 1 <= v <= 1_000_000),
    ("batch_size", f"from 1 to {2**31 - 1}", lambda v: 1 <= v <= 2**31 - 1),
    ("lr", "positive", lambda v: v > 0),
    ("momentum", "in [0, 1)", lambda v: 0 <= v < 1),
    ("weight_decay", ">= 0", lambda v: v >= 0),
    ("label_smoothing", "in [0, 1)", lambda v: 0 <= v < 1),
    ("warmup_epochs", ">= 0", lambda v: v >= 0),
    ("ema_decay", "in [0, 1) (0: off)", lambda v: 0 <= v < 1),
    ("seed", f"an integer from 0 to {2**32 - 1}", lambda v: 0 <= v <= 2**32 - 1),
    ("keep", ">= 0 (0 keeps all)", lambda v: v >= 0),
    ("save_every_minutes", ">= 0", lambda v: v >= 0),
    ("log_every", "at least 1", lambda v: v >= 1),
]

# Settings that do not change what is computed: on --resume these follow this invocation (those in
# WHEN_TYPED only when typed: --epochs extends a run, --tensorboard or --no-tensorboard switches
# it); every other one comes from the checkpoint.
RUNTIME = ("data_dir", "workers", "device", "amp", "compile", "save_dir", "keep",
           "save_every_minutes", "log_every", "epochs", "skip_bad_images", "test_every_epoch",
           "tensorboard")
WHEN_TYPED = ("epochs", "tensorboard")

# Settings this code had and dropped (measured without a gain: docs/recipes.md), with the value
# that meant "off": a run that used one still tests, but does not resume.
REMOVED = {"cutout": 0.0, "small_map_lr": False, "step_epochs": 30, "step_gamma": 0.1}


def check_settings(c: dict) -> None:
    """How settings relate (each the one line of a UserError): Nesterov is SGD's and needs momentum;
    the schedules that remain; and the datasets' own rules (imagedata.check_settings)."""
    if c["nesterov"] and c["optimizer"] != "sgd":
        raise UserError(f"--nesterov is a momentum of SGD; --optimizer is {c['optimizer']}")
    if c["nesterov"] and c["momentum"] == 0:
        raise UserError("--nesterov needs a momentum above 0 (--momentum is 0)")
    imagedata.check_settings(c)


def check_fine_tune(c: dict, given: set) -> None:
    """FREEZE_EPOCHS and BACKBONE_LR_MULT act only on a run that starts from pretrained weights:
    given without PRETRAINED they would be dropped without a word."""
    for key in ("freeze_epochs", "backbone_lr_mult"):
        if key in given and c["pretrained"] is None:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} acts on a run from pretrained weights, and this one has none: "
                            f"add --pretrained (imagenet, or a file), or leave {flag} out")


# ---------------------------------------------------------------------- model, optimizer, schedule

def make_state(run: Run, source: pretrained.Source | None) -> TrainingState:
    """The network (the same initial weights on every process, or the pretrained ones), optimizer,
    schedule, loss scaler, augmentation stream and weight average of a fresh run."""
    c, device = run.config, run.device
    torch.manual_seed(c["seed"])
    model = net.build_model(c, len(run.classes))
    if source is not None:
        run.pretrained = pretrained.load_pretrained(model, c, run.classes, source)
    model = devices.place(model, device)
    if not c["compile"]:  # small maps as matrix products (bf16, AMX)
        cpuconv.use_where_faster(model, device, run.amp)
    optimizer = make_optimizer(model, c, run.world)
    scheduler = make_scheduler(optimizer, c, run.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)  # bf16 needs none
    torch.manual_seed(c["seed"] + run.rank)  # dropout differs between processes
    aug_gen = torch.Generator(device=device if device.type != "mps" else "cpu")
    return TrainingState(model, optimizer, scheduler, scaler, aug_gen, make_average(model, c))


def effective_lr(c: dict, world: int) -> float:
    """LR is the rate for one process's BATCH_SIZE images; `world` processes step on world times as
    many, so the rate grows with them (the linear scaling rule; a warm-up helps at large
    batches)."""
    return c["lr"] * world


def make_optimizer(model, c: dict, world: int = 1) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over pretrained.parameter_groups: no weight decay on biases and
    BatchNorm parameters; a fine-tune's pretrained layers at LR x BACKBONE_LR_MULT."""
    lr = effective_lr(c, world)
    groups = pretrained.parameter_groups(model, c, lr)
    fused = devices.fused_step(next(model.parameters()).device)  # one pass over the weights
    if c["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(c["momentum"], 0.999), fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=c["momentum"], nesterov=c["nesterov"],
                           fused=fused)


def make_scheduler(optimizer, c: dict, steps_per_epoch: int):
    """A factor on the learning rate per optimizer step: linear warm-up, then cosine or constant.
    The loop steps it after the optimizer, so step k trains at LR * factor(k)."""
    total = c["epochs"] * steps_per_epoch
    warmup = round(c["warmup_epochs"] * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if c["schedule"] == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


# ----------------------------------------------------------------------------------- one epoch

def train_one_epoch(run: Run, state: TrainingState, train_model, data, epoch: int,
                    keeper: runstate.Keeper) -> runstate.EpochTotals:
    """The steps of epoch `epoch` (counted from 0) from state.step on; returns the totals of the
    whole epoch over all processes (those before a mid-epoch resume included)."""
    c, device = run.config, run.device
    batches = imagedata.epoch_batches(data, c, epoch, state.step, run.steps_per_epoch,
                                      state.aug_gen, run.rank, run.world)
    progress = keeper.epoch(state, epoch)
    pretrained.train_mode(state.model, frozen=pretrained.frozen_at(c, epoch))
    for x, y in batches:
        with devices.autocast(device, run.amp):
            logits = train_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=c["label_smoothing"])
        state.scaler.scale(loss).backward()   # fp16 scales the loss; otherwise a no-op
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()                # after the optimizer step: the rate of the next
        if state.average is not None:
            state.average.update_parameters(state.model)
        progress.step_done(loss, logits, y)   # sums, progress bar; Ctrl-C and timed saves
    return progress.done()


class Score(NamedTuple):
    """A split's scores, over all of its images."""
    loss: float      # mean cross-entropy
    acc: float       # accuracy
    balanced: float  # balanced accuracy: the mean over classes of their recall


@torch.inference_mode()
def evaluate(model, data, batch_size: int, device, amp, rank: int = 0, world: int = 1,
             tta: bool = False, tta_shift: int = 0) -> Score:
    """The scores over the whole split; each process takes every world-th sample. With tta, of the
    logits averaged over each image and its mirror image (and with tta_shift over the moved images
    too: imagedata.predict)."""
    model.eval()
    n = len(data.classes)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # MPS has no float64
    hits = torch.zeros(n, dtype=torch.long, device=device)     # right, per class
    count = torch.zeros(n, dtype=torch.long, device=device)    # images, per class
    indices = torch.arange(len(data))[rank::world]
    for x, y in data.batches(indices, batch_size):
        with devices.autocast(device, amp):
            logits = imagedata.predict(model, x, tta, tta_shift)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        hits += torch.bincount(y[logits.argmax(1) == y], minlength=n)
        count += torch.bincount(y, minlength=n)
    totals = devices.sum_across([loss_sum.item(), *hits.tolist(), *count.tolist()], device,
                                world > 1)
    hits, count = torch.tensor(totals[1:n + 1]), torch.tensor(totals[n + 1:])
    recall = hits[count > 0] / count[count > 0]
    return Score(totals[0] / len(data), float(hits.sum()) / len(data), float(recall.mean()))


def score(run: Run, model, data) -> Score:
    """evaluate() with the run's settings: batches twice the training batch, TTA as configured."""
    c = run.config
    return evaluate(model, data, 2 * c["batch_size"], run.device, run.amp, run.rank, run.world,
                    c["tta"], c["tta_shift"])


# -------------------------------------------------------------------------------------- the run

def main() -> tuple[TrainingState, dict]:
    """One training run, as `python train.py` (or torchrun) starts it; returns the final state and
    the last epoch's results."""
    config, args = cli.parse(DEFAULTS, __doc__.splitlines()[0], rules=RULES, check=check_settings,
                             extra=extra_options, recipes=True)
    if not args.resume:
        check_fine_tune(config, args.given)
    rank, world, local_rank = devices.setup_distributed()
    runstate.check_save_dir_outside_data(config)  # before the lock creates it
    device = devices.pick_device(config["device"], local_rank)  # this invocation's, also on resume
    if world > 1:
        devices.init_distributed(device, config["device"], local_rank)
        # the data folder and the workers are the node's own
        devices.check_same_settings(config | {"resume": args.resume, "overwrite": args.overwrite},
                                    ignore=("data_dir", "workers"))
    # pretrained weights: downloaded (or found missing) before anything in SAVE_DIR is touched
    source = (pretrained.fetch_once_per_machine(config, local_rank, world > 1, device)
              if config["pretrained"] is not None and not args.resume else None)
    if rank == 0:  # the save folder: locked, then a fresh run or last.pth
        checkpoints.lock_save_dir(Path(config["save_dir"]))
    log = console if rank == 0 else (lambda *a, **k: None)
    c, ckpt = runstate.start_or_resume(config, args, log, DEFAULTS, (RUNTIME, WHEN_TYPED), REMOVED,
                                       RULES, check_settings)
    if rank == 0:
        checkpoints.tidy_save_dir(Path(c["save_dir"]), ckpt, log)
    if source is not None:  # the statistics the weights were trained with normalize the inputs
        c["normalize"] = source.normalize
    devices.prepare(device)
    amp, amp_reason = devices.amp_choice(device, c["amp"])
    splits = load_data(c, device, world, ckpt, args.data_from)
    run = Run(c, splits[0].classes, device, amp, rank, world,
              imagedata.steps_per_epoch(len(splits[0]), c["batch_size"], world))
    try:  # from here on, out of memory is one line with a batch size that fits
        with devices.out_of_memory_explained(c, device, amp, len(run.classes)):
            return train(run, ckpt, source, splits, amp_reason, args)
    finally:  # a folder's DataLoader workers stop however the run ends
        imagedata.close(*splits)


def train(run: Run, ckpt: dict | None, source, splits, amp_reason: str, args):
    """The run itself: its state fresh or resumed, then epoch after epoch, each one saved."""
    c = run.config
    train_data, val_data, test_data = splits
    state = make_state(run, source if ckpt is None else None)
    if ckpt is not None:
        runstate.restore(state, ckpt, run, effective_lr(c, run.world))
    with start(run, state, ckpt, args.overwrite, val_data is not None) as keeper:
        run.log(header(run, state, [len(s) if s is not None else 0 for s in splits], amp_reason))
        try:
            results = epochs(run, state, keeper, splits)
            if not c["test_every_epoch"]:  # rank 0 alone: no collective
                results["best_test"] = keeper.test_best(
                    state, test_data, lambda model, data: evaluate(
                        model, data, 2 * c["batch_size"], run.device, run.amp, tta=c["tta"],
                        tta_shift=c["tta_shift"]))
            if keeper.board is not None:  # the last epoch's confusion matrix and worst mistakes
                keeper.board.pictures(state.evaluated, test_data, state.epoch, run.device, run.amp)
                keeper.board.commit()
        finally:
            if keeper.board is not None:
                keeper.board.close()  # what no checkpoint covers is not written
        if run.distributed:  # the others wait for rank 0's last work, so that all leave the
            torch.distributed.barrier()  # process group together (torch 2.3 hung in a destroy)
        finish(run, state, val_data is not None)
    return state, results


def epochs(run: Run, state: TrainingState, keeper: runstate.Keeper, splits) -> dict:
    """Epoch after epoch from where the state stands: train, score, save. Returns the last
    epoch's results."""
    c = run.config
    train_data, val_data, test_data = splits
    results, frozen = {}, None
    try:
        for epoch in range(state.epoch, c["epochs"]):
            t0 = time.perf_counter()
            if pretrained.frozen_at(c, epoch) != frozen:  # the first epoch, and the unfreeze
                frozen = pretrained.frozen_at(c, epoch)
                pretrained.set_frozen(state.model, frozen)
                # DDP syncs the gradients of the parameters that need them when it is built
                train_model = wrap(run, state.model)
            totals = train_one_epoch(run, state, train_model, train_data, epoch, keeper)
            runstate.share_batchnorm_statistics(run, state)
            val = score(run, state.evaluated, val_data) if val_data is not None else None
            # the test split is only reported: choosing on it would make its accuracy a biased max
            test = score(run, state.evaluated, test_data) if c["test_every_epoch"] else None
            results = keeper.end_epoch(state, epoch, totals, val, test, time.perf_counter() - t0)
    except Diverged as e:
        raise keeper.diverged(e) from None
    return results


def start(run: Run, state: TrainingState, ckpt: dict | None, overwrite: bool,
          has_val: bool) -> runstate.Keeper:
    """The lines a run starts with (where it resumes, a fine-tune that never unfreezes), and its
    Keeper: inside its block Ctrl-C and SIGTERM save and stop, and TensorBoard gets its events."""
    c = run.config
    if ckpt is not None:
        if c["pretrained"] is not None:
            run.pretrained = f"{c['pretrained']} (resumed)"
        best = (f", best validation accuracy {state.best_acc:.2%}"  # none in the first epoch
                if has_val and state.epoch else "")
        run.log(f"resumed {run.last_path}: epoch {state.epoch + 1}, step {state.step}{best}")
    if c["pretrained"] and c["freeze_epochs"] >= c["epochs"] and run.master and ckpt is None:
        console(f"warning: --freeze-epochs {c['freeze_epochs']} covers all {c['epochs']} "
                "epoch(s): only the new last layer trains, the pretrained layers never do",
                file=sys.stderr)
    board = None
    if c["tensorboard"] and run.master:
        import board as tensorboard  # imports tensorboard only when it is asked for
        board = tensorboard.Board(run.save_dir / "tensorboard", state.epoch,
                                  state.epoch * run.steps_per_epoch + state.step)
    old_run = checkpoints.OldRun(run.save_dir, replace=run.master and overwrite and ckpt is None)
    return runstate.Keeper(run, old_run, DEFAULTS["SAVE_DIR"], board)


def load_data(c: dict, device: torch.device, world: int, ckpt: dict | None, data_from: str):
    """(train, validation or None, test) splits, checked against the run: two classes at least, the
    classes the checkpoint was trained on, an image for every process. An error names where the
    data folder came from when the user did not type it."""
    try:
        train_data, val_data = imagedata.load_train_val(c, device)
        test_data = imagedata.load_split(c, False, device, classes=train_data.classes)
    except UserError as e:
        if data_from == "--data-dir":
            raise
        raise UserError(f"{e} (data folder {c['data_dir']} from {data_from})") from None
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
    unbalanced = imagedata.class_counts(train_data.labels, classes)
    if unbalanced and not c["balance"] and folders.is_master():
        console(unbalanced, file=sys.stderr)
    return train_data, val_data, test_data


def wrap(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """The module the training steps call: DDP under torchrun, compiled with COMPILE."""
    if run.distributed:
        ids = [run.device.index] if run.device.type in ("cuda", "npu") else None
        model = DDP(model, device_ids=ids)
    return torch.compile(model) if run.config["compile"] else model


def header(run: Run, state: TrainingState, sizes: list[int], amp_reason: str) -> str:
    """The first line of a run: network, data, device, precision, learning rate and batch."""
    c, world = run.config, run.world
    n_params = sum(p.numel() for p in state.model.parameters())
    lr_note = f" (LR {c['lr']:g} x {world} processes)" if run.distributed else ""
    return (f"VGG{c['depth']}{'_bn' if c['batch_norm'] else ''} width/{c['width_div']}: "
            f"{n_params:,} parameters | {c['dataset']} {sizes[0]:,} train / {sizes[1]:,} "
            f"validation / {sizes[2]:,} test at {c['image_size']} px"
            f"{', scored with mirror images (tta)' if c['tta'] else ''}"
            f"{' and moved ones (tta-shift)' if c['tta'] and c['tta_shift'] else ''} | "
            f"{f'pretrained: {run.pretrained} | ' if run.pretrained else ''}"
            f"device {run.device}{f' x {world} processes' if run.distributed else ''}, "
            f"precision {str(run.amp).replace('torch.', '') if run.amp else 'fp32'} "
            f"({amp_reason}) | "
            f"lr {effective_lr(c, world):g}{lr_note}, global batch {c['batch_size'] * world}")


def finish(run: Run, state: TrainingState, has_val: bool) -> None:
    """The run's last line: which epoch best.pth holds, and where the files are."""
    chosen = (f"best.pth has the best validation accuracy, {state.best_acc:.2%}" if has_val
              else "best.pth is the last epoch")
    if run.master and not checkpoints.best_path(run.save_dir).exists():
        chosen = "there is no best.pth (deleted, and no kept epoch file was the best epoch)"
    run.log(f"done: {chosen}; checkpoints in {run.save_dir}/ (python test.py for its test accuracy "
            "and predictions)")


def extra_options(parser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/last.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even though SAVE_DIR already holds one (its files "
                             "are replaced)")


def run() -> tuple[TrainingState, dict] | None:
    """main(), with every way a run can end said in one line (exit 2: bad input, 3: divergence)."""
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
    finally:  # for callers that run main() again in the same process (the tests)
        checkpoints.unlock_save_dir()
        devices.leave_process_group()


if __name__ == "__main__":
    run()
