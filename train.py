"""Train a hand-written VGG16 (net.py) on MNIST, Fashion-MNIST, CIFAR-10 or your own image folders.

    python train.py                                   # VGG16 on MNIST at 224 px; checkpoints in save_model/
    python train.py --epochs 3 --dataset cifar10      # any constant below can be overridden like this
    python train.py --image-size 32 --width-div 4     # a size that trains in minutes on a laptop CPU
    python train.py --resume                          # continue save_model/last.pth exactly where it stopped
    torchrun --nproc_per_node=8 train.py              # data-parallel on 8 GPUs (BATCH_SIZE is per process)
    python train.py --help                            # every option with its default

Then `python test.py` reloads save_model/best.pth and shows predicted against actual labels.
"""

import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import cli
import devices
import imagedata
import plots
from cli import UserError, console
from net import build_model

# ------------------------------------------------------------------------------------------ hyperparameters
# Edit these, or override any of them on the command line (python train.py --lr 0.05 --no-batch-norm).
# data
DATASET = "mnist"                              # mnist | fashion-mnist | cifar10 | folder (DATA_DIR/train/CLASS/*.jpg and DATA_DIR/test/...)
DATA_DIR = os.environ.get("DATA_DIR", "data")  # dataset root (environment variable DATA_DIR, else ./data)
IMAGE_SIZE = 224                               # network input side in pixels (>= 32); 28 px digits are upsampled on the device
AUGMENT = "auto"                               # auto | on | off: random crop (4 px padding), + flip except digits/clothes; auto = on for cifar10/folder
WORKERS = 4                                    # DataLoader worker processes (folder dataset only; the others live on the device)
SKIP_BAD_IMAGES = False                        # folder dataset: leave out unreadable image files (else they stop the run)
VAL_FRACTION = 0.1                             # share of train images held out to choose best.pth (0: none); a folder's val/ wins
# model
DEPTH = 16                                     # VGG depth: 11 | 13 | 16 | 19
WIDTH_DIV = 1                                  # divide every channel count by this (4 = a 'small VGG' for CPUs)
BATCH_NORM = True                              # BatchNorm after each convolution; trains reliably from scratch
DROPOUT = 0.5                                  # dropout probability in the classifier
# optim
EPOCHS = 10                                    # passes over the training set
BATCH_SIZE = 128                               # images per step, per process
OPTIMIZER = "sgd"                              # sgd (with momentum) | adamw
LR = 0.02                                      # peak learning rate (for BATCH_SIZE 128 on one process)
MOMENTUM = 0.9                                 # SGD momentum (AdamW: beta1)
WEIGHT_DECAY = 5e-4                            # L2 penalty, applied by the optimizer
SCHEDULE = "cosine"                            # cosine | step | constant; the learning rate is updated after every step
WARMUP_EPOCHS = 0.0                            # linear warm-up from 0 over this many epochs (fractions allowed)
STEP_EPOCHS = 30                               # step schedule: multiply the rate by STEP_GAMMA every STEP_EPOCHS epochs
STEP_GAMMA = 0.1                               # step schedule: the factor
# system
DEVICE = "auto"                                # auto (cuda > npu > mps > cpu) | cuda | cuda:1 | npu | mps | cpu
AMP = "auto"                                   # auto | bf16 | fp16 | off: mixed precision (auto: bf16 where supported, fp16 on older GPUs)
COMPILE = False                                # torch.compile the model (faster on recent GPUs after a minute of compiling)
SEED = 0                                       # seeds the weights, the shuffles and the augmentation
SAVE_DIR = "save_model"                        # where checkpoints, metrics.csv and curves.png go
KEEP = 3                                       # how many epoch_NNN.pth to keep (each is about 530 MB for VGG16); 0 keeps all
SAVE_EVERY_MINUTES = 0.0                       # also write last.pth inside an epoch this often (0 = only at epoch ends)
LOG_EVERY = 50                                 # steps between progress-bar updates (each costs one device sync)
# ---------------------------------------------------------------------------------------------------------
DEFAULTS = cli.frozen(globals())  # the settings above, frozen: a constant defined below is no flag

# Settings that do not change what is computed: on --resume these follow this invocation
# (--epochs only when typed, to extend a run), every other one comes from the checkpoint.
RUNTIME_KEYS = ("data_dir", "workers", "device", "amp", "compile", "save_dir", "keep", "save_every_minutes",
                "log_every", "epochs", "skip_bad_images")


class Diverged(Exception):
    pass


class StopSignals:
    """SIGINT/SIGTERM ask the loop to finish its step, write last.pth and exit.

    The handler stays installed for repeated signals: torchrun forwards SIGTERM (and SIGINT) to each
    process group while SLURM or a terminal's Ctrl-C also reach every process directly, so a second signal
    comes at once and must not kill the save. Only a second Ctrl-C in a plain run stops at once
    (KeyboardInterrupt, which run() reports in one line)."""

    # Under torchrun the processes agree on stopping at least this often (torchrun's grace is 30 s).
    agree_seconds = 5.0

    def __init__(self, distributed: bool):
        self.signal: int | None = None
        self.distributed = distributed

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT and not self.distributed:
            raise KeyboardInterrupt
        self.signal = self.signal or signum


def extra_options(parser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/last.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even though SAVE_DIR already holds one (its files are replaced)")


def make_optimizer(model, c: dict, world: int = 1) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters: decaying them only hurts (as in the
    # official recipes' --norm-weight-decay 0).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": c["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    lr = effective_lr(c, world)
    if c["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(c["momentum"], 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=c["momentum"])


def effective_lr(c: dict, world: int) -> float:
    """LR is the rate for one process's BATCH_SIZE images; `world` processes step on world times as many,
    so the rate grows with them (the linear scaling rule; a warm-up helps at large batches)."""
    return c["lr"] * world


def make_scheduler(optimizer, c: dict, steps_per_epoch: int):
    """A factor on the learning rate, per optimizer step: linear warm-up, then cosine, step or constant."""
    total = c["epochs"] * steps_per_epoch
    warmup = round(c["warmup_epochs"] * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if c["schedule"] == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if c["schedule"] == "step":
            return c["step_gamma"] ** (step // (c["step_epochs"] * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def merge_resumed_config(stored: dict, given: dict, typed: set, log) -> dict:
    """The checkpoint's settings, so the run continues as it began, except:
    run-time settings (device, data folder, ...) which follow this invocation, and --epochs when typed.
    Each typed value that differs from the checkpoint is reported with the value that is used."""
    merged = dict(stored)
    for key, value in given.items():
        if key in RUNTIME_KEYS and (key != "epochs" or key in typed) or key not in stored:
            merged[key] = value
        if key in typed and key in stored and stored[key] != value:
            flag = "--" + key.replace("_", "-")
            used = "this value" if merged[key] == value else f"the checkpoint's {stored[key]!r}"
            log(f"resume: {flag} {value!r} differs from the checkpoint's {stored[key]!r}: using {used}")
    return merged


@torch.inference_mode()
def evaluate(model, data, batch_size: int, device, amp, rank: int = 0, world: int = 1) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split; each process takes every world-th sample."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # MPS has no float64
    correct = torch.zeros((), dtype=torch.long, device=device)
    indices = torch.arange(len(data))[rank::world]
    for x, y in data.batches(indices, batch_size):
        with devices.autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    loss_sum, correct = devices.sum_across([loss_sum.item(), correct.item()], device, world > 1)
    return loss_sum / len(data), correct / len(data)


def main() -> None:
    config, args = cli.parse_config(DEFAULTS, __file__, __doc__.splitlines()[0], extra=extra_options)
    cli.check_config(config)
    rank, world, local_rank = devices.setup_distributed()
    distributed, master = world > 1, rank == 0
    log = console if master else (lambda *a, **k: None)
    save_dir = Path(config["save_dir"])
    last_path = save_dir / "last.pth"
    if master:
        checkpoints.lock_save_dir(save_dir)

    # ---- resume or start: decided before anything is written
    ckpt = None
    if args.resume:
        ckpt = checkpoints.load(last_path)
        if "optimizer" not in ckpt:
            raise UserError(f"{last_path} has no training state to resume from")
        ckpt["config"].setdefault("val_fraction", 0.0)  # a run begun before validation splits used all images
        config = merge_resumed_config(ckpt["config"], config, args.explicit, log)
        cli.check_config(config)
    elif not args.overwrite and (found := checkpoints.previous_run_files(save_dir)):
        if last_path.exists():
            raise UserError(f"{last_path} already holds a run: continue it with --resume, start over with "
                            "--overwrite, or pick another --save-dir")
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"{save_dir} already holds a run ({names}) without a last.pth to continue it from: "
                        "start over with --overwrite, or pick another --save-dir")
    c = config
    if master:
        checkpoints.check_writable(save_dir)
        for stale in save_dir.glob(".*.tmp*"):  # left by a save that was killed; never renamed into place
            stale.unlink(missing_ok=True)
        if ckpt is not None:
            checkpoints.truncate_metrics(save_dir / "metrics.csv", ckpt["epoch"])
            if not checkpoints.restore_best(save_dir, ckpt, log):
                ckpt["best_acc"] = 0.0  # so that the next epoch writes best.pth again

    # ---- device, precision, processes
    device = devices.pick_device(c["device"], local_rank)
    if distributed:
        if ":" in c["device"]:
            raise UserError(f"--device {c['device']}: under torchrun each process takes the device of its "
                            "LOCAL_RANK; use --device cuda, npu or cpu (or auto)")
        if device.type == "mps":
            raise UserError("torchrun runs on CUDA, NPU or CPU devices (not Apple MPS): use --device cpu")
        if device.type in ("cuda", "npu"):
            count = torch.cuda.device_count() if device.type == "cuda" else torch.npu.device_count()
            if local_rank >= count:
                raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node "
                                f"but it has {count} {device.type.upper()} device(s): use --nproc_per_node={count}")
            getattr(torch, device.type).set_device(device)
        backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
        dist.init_process_group(backend)
    devices.use_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp, amp_reason = devices.amp_choice(device, c["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 needs loss scaling, bf16 not

    # ---- data
    train_data, val_data = imagedata.load_train_val(c, device)
    has_val = val_data is not None
    test_data = imagedata.load_split(c, False, device, classes=train_data.classes)
    classes = train_data.classes
    if len(classes) < 2:
        raise UserError(f"the training set has only {len(classes)} class ({', '.join(classes)}); "
                        "a classifier needs at least 2")
    if ckpt is not None and list(ckpt["classes"]) != list(classes):
        shown = lambda names: f"{list(names)[:10]}{' ...' if len(names) > 10 else ''}"  # noqa: E731
        raise UserError(f"{c['data_dir']} has classes {shown(classes)}, but {last_path} was trained on "
                        f"{shown(ckpt['classes'])}: resume with the data the run began with")
    augment = imagedata.augment_enabled(c)
    if len(train_data) < world:
        raise UserError(f"the training set has {len(train_data)} images, fewer than the {world} processes")
    steps_per_epoch = imagedata.steps_per_epoch(len(train_data), c["batch_size"], world)

    # ---- model and optimizer (same seed on every process: identical initial weights)
    torch.manual_seed(c["seed"])
    model = build_model(c, len(classes)).to(device)
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on both (measured on CPU)
    optimizer = make_optimizer(model, c, world)
    scheduler = make_scheduler(optimizer, c, steps_per_epoch)
    start_epoch, start_step, best_acc = 0, 0, 0.0
    partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of the epoch before a mid-epoch resume (rank 0: all processes')
    torch.manual_seed(c["seed"] + rank)  # dropout differs between processes
    aug_gen = torch.Generator(device=device if device.type != "mps" else "cpu")
    if ckpt is not None:
        checkpoints.load_model_state(model, ckpt["model"], last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when the run was not in fp16 (GradScaler refuses an empty state)
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step, best_acc = ckpt["epoch"], ckpt["step"], ckpt.get("best_acc", 0.0)
        if master:  # the checkpoint holds the epoch's sums over all processes
            partial = ckpt["partial"]
        ckpt_world = ckpt.get("world", 1)
        if world == ckpt_world:  # the random streams go on where they were (dropout, augmentation)
            moved = devices.restore_random_state(ckpt["rng"][rank], device, aug_gen)
            if moved:
                log(moved)
                if start_step and "augmentation" in moved:  # else the epoch's start seeds it
                    aug_gen.manual_seed(c["seed"] * 1_000_003 + start_epoch * 1_009 + rank)
        else:
            # Fewer or more processes mean more or fewer steps per epoch: go on from the same share of
            # the epoch, and put the schedule at the matching step.
            start_step = min(steps_per_epoch, start_step * ckpt_world // world)
            scheduler.last_epoch = start_epoch * steps_per_epoch + start_step
            # the rate of the new global batch
            scheduler.base_lrs = [effective_lr(c, world)] * len(optimizer.param_groups)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"] = base
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
            log(f"resume: the run had {ckpt_world} process(es) and now has {world}: the schedule is rescaled"
                f" (learning rate {effective_lr(c, world):g} for the global batch of "
                f"{c['batch_size'] * world})"
                f"{', the rest of the epoch re-sharded' if start_step else ''} and the random streams start afresh")
        log(f"resumed {last_path}: epoch {start_epoch + 1}, step {start_step}"
            f"{f', best validation accuracy {best_acc:.2%}' if has_val else ''}")
    ckpt_epoch = None if ckpt is None else ckpt["epoch"]
    del ckpt
    raw_model = model
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type in ("cuda", "npu") else None)
    train_model = torch.compile(model) if c["compile"] else model

    n_params = sum(p.numel() for p in raw_model.parameters())
    current_run.update(config=c, device=device, amp=amp, classes=len(classes))  # for out_of_memory_message
    lr_note = f" (LR {c['lr']:g} x {world} processes)" if distributed else ""
    log(f"VGG{c['depth']}{'_bn' if c['batch_norm'] else ''} width/{c['width_div']}: {n_params:,} parameters | "
        f"{c['dataset']} {len(train_data):,} train / {len(val_data) if has_val else 0:,} validation / "
        f"{len(test_data):,} test at {c['image_size']} px | "
        f"device {device}{f' x {world} processes' if distributed else ''}, "
        f"precision {str(amp).replace('torch.', '') if amp else 'fp32'} ({amp_reason}) | "
        f"lr {effective_lr(c, world):g}{lr_note}, "
        f"global batch {c['batch_size'] * world}")

    def checkpoint(epoch: int, step: int, partial: list[float]) -> dict:
        """The full training state. epoch/step: epochs completed, and steps done in the next one;
        partial: this process's loss sum, correct count and images so far in that epoch (summed here
        over all processes). Every process must call this: it gathers their random states."""
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise Diverged(f"epoch {epoch + 1 if step else epoch}, step {step} (the weights are no longer finite)")
        partial = devices.sum_across(partial, device, distributed)
        rng = devices.random_state(device, aug_gen)
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng)  # each process has its own dropout and augmentation streams
        else:
            rngs = [rng]
        return {"model": checkpoints.model_state(raw_model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                "best_acc": best_acc, "config": c, "classes": classes, "world": world, "rng": rngs,
                "partial": partial}

    # ---- Ctrl-C / SIGTERM: finish the step, write last.pth, exit; a second Ctrl-C stops at once
    stop = StopSignals(distributed)
    stop.install()

    # Every process must take the same decision at the same step, since saving gathers all of their
    # random states, and a process that stopped or raised alone would leave the others waiting in a
    # collective. A plain run decides at every step. Processes agree by one small all-reduce (each
    # one a device sync) at log steps, at the epoch's last step, and often enough in between that a
    # stop is taken within StopSignals.agree_seconds; the interval comes from the slowest process's
    # step time, reduced with the flags, so all processes compute the same one.
    agreement = {"since": 0, "every": 1, "time": time.monotonic()}

    def stop_or_save(step: int, first_bad: torch.Tensor) -> tuple[bool, bool]:
        save_due = c["save_every_minutes"] > 0 and time.monotonic() - last_save >= 60 * c["save_every_minutes"]
        if not distributed:
            return stop.signal is not None, save_due
        agreement["since"] += 1
        if agreement["since"] < agreement["every"] and step % c["log_every"] and step != steps_per_epoch:
            return False, False
        now = time.monotonic()
        bad = int(first_bad)
        # float32 (HCCL has no float64); a bad step is sent as steps_per_epoch - step, so MAX finds the first.
        step_seconds = (now - agreement["time"]) / agreement["since"]
        bad_flag = steps_per_epoch - bad if bad >= 0 else 0
        flags = torch.tensor([stop.signal or 0, save_due, bad_flag, step_seconds], dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, save, bad, step_seconds = flags.tolist()
        every = int(stop.agree_seconds / max(step_seconds, 1e-6))
        agreement.update(since=0, time=now, every=max(1, min(c["log_every"], every)))
        if bad:  # on every process at once, so none waits in a collective for one that stopped
            raise Diverged(f"epoch {epoch + 1}, step {steps_per_epoch - int(bad) + 1}")
        stop.signal = int(signum) or None
        return bool(signum), bool(save)

    # ---- training
    # --overwrite: the old run goes only at the new one's first save, so a new run that fails before it
    # (a bad file, a loss that diverges, a Ctrl-C) never costs the old one.
    replace_old = master and args.overwrite and ckpt_epoch is None

    def first_save(before: bool) -> None:
        nonlocal replace_old, replaced
        if not replace_old:
            return
        if before:
            replaced = checkpoints.set_aside_old_run(save_dir)
            return
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
            log(f"--overwrite: removed the previous run's files from {save_dir}")
        replace_old = False

    replaced = None
    last_save = time.monotonic()
    first_steps = []  # when the first two steps of this invocation ended
    for epoch in range(start_epoch, c["epochs"]):
        t0 = time.perf_counter()
        model.train()
        indices = imagedata.shard_indices(len(train_data), c["seed"], epoch, rank, world)
        if start_step == 0:
            aug_gen.manual_seed(c["seed"] * 1_000_003 + epoch * 1_009 + rank)
            partial = [0.0, 0.0, 0.0]
        batches = train_data.batches(indices[start_step * c["batch_size"]:], c["batch_size"], augment, aug_gen,
                                     steps=steps_per_epoch - start_step)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # MPS has no float64
        correct = torch.zeros((), dtype=torch.long, device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        seen = 0
        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{c['epochs']}",
                   disable=not master, dynamic_ncols=True, leave=False, file=cli.QuietStream(sys.stderr))
        t_log, seen_log = time.perf_counter(), 0
        step = start_step
        for x, y in batches:
            with devices.autocast(device, amp):
                logits = train_model(x)
                loss = F.cross_entropy(logits, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            # Running sums stay on the device: no host sync until a log step.
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            seen += len(y)
            step += 1
            bar.update()
            if master and epoch == start_epoch and step - start_step in (1, 2):  # step 1 includes warm-up
                first_steps.append(time.perf_counter())
                warning = len(first_steps) == 2 and devices.slow_epoch_warning(
                    device, first_steps[1] - first_steps[0], steps_per_epoch)
                if warning:
                    bar.write(warning, file=sys.stderr)
            stopping, save_now = stop_or_save(step, first_bad)
            if step % c["log_every"] == 0 or save_now or stopping:
                if int(first_bad) >= 0:
                    raise Diverged(f"epoch {epoch + 1}, step {int(first_bad) + 1}")
                now = time.perf_counter()
                done = seen + partial[2]
                bar.set_postfix(loss=f"{(float(loss_sum) + partial[0]) / done:.4f}",
                                acc=f"{(int(correct) + partial[1]) / done:.2%}",
                                img_s=f"{(seen - seen_log) * world / (now - t_log):.0f}")
                t_log, seen_log = now, seen
            if save_now or stopping:
                state = checkpoint(epoch, step, [partial[0] + float(loss_sum), partial[1] + int(correct),
                                                 partial[2] + seen])
                if master:
                    first_save(before=True)
                    checkpoints.save(state, last_path)
                    first_save(before=False)
                last_save = time.monotonic()
                if stopping and distributed:
                    dist.barrier()  # torchrun ends the group when one process exits: not before the save
                if stopping:
                    bar.close()
                    log(f"stopped by {signal.Signals(stop.signal).name} at epoch {epoch + 1}, step {step}; "
                        f"saved {last_path}; continue with: python train.py --resume", file=sys.stderr)
                    sys.exit(128 + stop.signal)
        bar.close()
        if int(first_bad) >= 0:
            raise Diverged(f"epoch {epoch + 1}, step {int(first_bad) + 1}")
        start_step = 0

        # ---- end of epoch: totals over the whole split, test accuracy, checkpoints
        train_loss, train_correct, train_seen = devices.sum_across(
            [partial[0] + float(loss_sum), partial[1] + int(correct), partial[2] + seen], device, distributed)
        if distributed:  # each process's BatchNorm statistics saw only its own batches: take rank 0's, as
            for buf in raw_model.buffers():  # DDP does before each forward, so all evaluate (and save) one model
                dist.broadcast(buf, 0)
        val_loss, val_acc = (evaluate(raw_model, val_data, 2 * c["batch_size"], device, amp, rank, world)
                             if has_val else (math.nan, math.nan))
        # The test split is only reported: choosing the epoch on it would make its accuracy a biased maximum.
        test_loss, test_acc = evaluate(raw_model, test_data, 2 * c["batch_size"], device, amp, rank, world)
        seconds = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        is_best = not has_val or epoch == 0 or val_acc > best_acc
        if has_val:
            best_acc = max(best_acc, val_acc) if epoch else val_acc
        state = checkpoint(epoch + 1, 0, [0.0, 0.0, 0.0])
        if master:
            # The epoch's weights first, so a full disk at the metrics write cannot cost them; last.pth
            # goes last: if the run dies before it, --resume redoes this epoch, and the metrics row
            # written here is dropped again (see truncate_metrics).
            first_save(before=True)
            weights = {k: state[k] for k in ("model", "config", "classes", "epoch", "best_acc")} | {
                "test_acc": test_acc, "val_acc": val_acc if has_val else None}
            checkpoints.save(weights, save_dir / f"epoch_{epoch + 1:03d}.pth")
            if is_best:
                checkpoints.save(weights, save_dir / "best.pth")
            checkpoints.append_metrics(save_dir / "metrics.csv", dict(zip(checkpoints.METRICS_FIELDS, [
                epoch + 1, f"{train_loss / train_seen:.6f}", f"{train_correct / train_seen:.6f}",
                f"{test_loss:.6f}", f"{test_acc:.6f}", f"{lr:.6g}", f"{seconds:.2f}",
                f"{train_seen / seconds:.1f}", f"{val_loss:.6f}" if has_val else "",
                f"{val_acc:.6f}" if has_val else ""])))
            plots.plot_curves(save_dir / "metrics.csv", save_dir / "curves.png")
            checkpoints.save(state, last_path)
            first_save(before=False)
            checkpoints.rotate(save_dir, c["keep"])
            last_save = time.monotonic()
        log(f"epoch {epoch + 1}/{c['epochs']}: train loss {train_loss / train_seen:.4f} acc "
            f"{train_correct / train_seen:.2%} | "
            f"{f'val loss {val_loss:.4f} acc {val_acc:.2%} | ' if has_val else ''}"
            f"test loss {test_loss:.4f} acc {test_acc:.2%} | lr {lr:.3g} | "
            f"{seconds:.1f} s, {train_seen / seconds:.0f} img/s{' | best' if is_best else ''}", flush=True)

    chosen = f"best.pth has the best validation accuracy, {best_acc:.2%}" if has_val else "best.pth is the last epoch"
    log(f"done: {chosen}; checkpoints in {save_dir}/ (python test.py for its test accuracy and predictions)")
    if distributed:
        dist.destroy_process_group()


current_run = {}  # what main() runs, once known: config, device, amp, classes


def run() -> None:
    try:
        cli.run_main(main)
    except Diverged as e:
        print(f"train.py: error: the loss became NaN or infinite at {e}; the last good checkpoint is kept "
              "(try a lower --lr, or --amp off)", file=sys.stderr)
        sys.exit(3)
    except Exception as e:
        if not devices.is_out_of_memory(e):
            raise
        print(f"train.py: error: {devices.out_of_memory_message(e, current_run)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the save the first one asked for
        print("train.py: stopped by a second Ctrl-C; last.pth holds the last save", file=sys.stderr)
        sys.exit(130)
    finally:
        checkpoints.unlock_save_dir()  # for callers that run main() again in the same process (the tests)


if __name__ == "__main__":
    run()
