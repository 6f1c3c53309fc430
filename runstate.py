"""How a training run survives: its state, the files of each epoch, a save and a stop on a signal,
and --resume, also on another number of processes.

train.py holds the recipe and the loop, and calls this module a few times a run:

    c, ckpt = runstate.start_or_resume(config, args, ...)  # before SAVE_DIR is written
    runstate.restore(state, ckpt, run, lr)                  # --resume: where last.pth left the run
    with runstate.Keeper(run, old_run, ...) as keeper:      # Ctrl-C, SIGTERM are caught inside
        for each epoch:
            progress = keeper.epoch(state, epoch)   # sums, progress bar, signals, timed saves
            ... progress.step_done(loss, logits, labels) after every optimizer step ...
            keeper.end_epoch(state, epoch, progress.done(), val, test, seconds)  # files and line

Every process of a torchrun run takes the same decisions at the same step: saving gathers all of
their random states, and a process that stopped or raised alone would leave the others waiting.
"""

import copy
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import checkpoints
import cli
import devices
import imagedata
import plots
from cli import console
from errors import UserError


class Diverged(Exception):
    """The loss or the weights are no longer finite: train.run() says where in one line, exit 3."""


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
    pretrained: str | None = None  # what the weights started from, for the header

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


# ------------------------------------------------------------------------------ start and resume

def start_or_resume(config: cli.Config, args, log, block: cli.Block, runtime: tuple,
                    removed: dict, rules=(), check=None) -> tuple[cli.Config, dict | None]:
    """(the run's settings, last.pth or None), decided before anything in SAVE_DIR is written. On
    --resume the settings are last.pth's, merged over today's defaults (cli.merge_stored), except
    the run-time ones (runtime = (names, names only when typed): device, data folder, ...), which
    follow this invocation; a typed value that differs from the checkpoint's is said with the value
    used. A run that used a setting this code no longer has (`removed`) cannot go on as it began:
    one line."""
    runtime, when_typed = runtime
    last_path = checkpoints.last_path(config["save_dir"])
    args.data_from = imagedata.choose_data_dir(
        config["data_dir"] if "data_dir" in args.given else None, None, config["data_dir"])[1]
    if not args.resume:
        if not args.overwrite and (found := checkpoints.previous_run_files(last_path.parent)):
            if last_path.exists():
                raise UserError(f"{last_path} already holds a run: continue it with --resume, "
                                "start over with --overwrite, or pick another --save-dir")
            names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise UserError(f"{last_path.parent} already holds a run ({names}) without a last.pth "
                            "to continue it from: start over with --overwrite, or pick another "
                            "--save-dir")
        return config, None
    ckpt = checkpoints.load(last_path)
    if "optimizer" not in ckpt:
        raise UserError(f"{last_path} has no training state to resume from")
    stored, changed = cli.merge_stored(block, ckpt["config"], removed)
    if changed:
        raise UserError(f"{last_path} was trained with {changed[0]}, a setting this code no "
                        "longer has, so its run cannot go on as it began: test its best.pth "
                        "(python test.py), or start a new run")
    typed = config["data_dir"] if "data_dir" in args.given else None
    data_dir, args.data_from = imagedata.choose_data_dir(typed, stored.get("data_dir"),
                                                         config["data_dir"])
    merged = cli.Config(stored)
    for key, value in (config | {"data_dir": data_dir}).items():
        if key in runtime and (key not in when_typed or key in args.given):
            merged[key] = value
        if key in args.given and stored[key] != value:
            used = "this value" if merged[key] == value else f"the checkpoint's {stored[key]!r}"
            log(f"resume: --{key.replace('_', '-')} {value!r} differs from the checkpoint's "
                f"{stored[key]!r}: using {used}")
    cli.check_config(merged, block, rules, check, where=str(last_path))
    # a typed --epochs below where the run stands would silently do nothing
    done, step = ckpt["epoch"], ckpt["step"]
    if "epochs" in args.given and merged["epochs"] < done + (1 if step else 0):
        where = f"is in epoch {done + 1} (step {step})" if step else f"has finished {done} epoch(s)"
        raise UserError(f"--epochs {merged['epochs']}: {last_path} {where}; give --epochs "
                        f"{done + 1} or more to train on (python test.py tests its best.pth)")
    return merged, ckpt


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


def restore(state: TrainingState, ckpt: dict, run: Run, lr: float) -> None:
    """Put `state`, freshly built for the run, where last.pth left it: weights, their average,
    optimizer, schedule, loss scaler, the position in the epoch and the random streams. On another
    number of processes (`lr`: the rate for the new global batch) the epoch goes on from the same
    share of it and the schedule follows."""
    checkpoints.load_model_state(state.model, ckpt["model"], run.last_path)
    if state.average is not None:
        if not ckpt["ema"]:
            raise UserError(f"{run.last_path} was trained with --ema-decay "
                            f"{run.config['ema_decay']} but holds no average of the weights (ema) "
                            "to continue it")
        checkpoints.load_model_state(state.average, ckpt["ema"], run.last_path)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    for group in state.optimizer.param_groups:  # the saved groups name the device they were for
        group["fused"] = devices.fused_step(run.device)
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when the run was not in fp16 (GradScaler refuses an empty state)
        state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step, state.best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_acc"]
    if run.master:  # the checkpoint holds the epoch's sums over all processes
        state.partial = EpochTotals(*ckpt["partial"])
    if run.world == ckpt["world"]:  # the random streams go on where they were
        moved = devices.restore_random_state(ckpt["rng"][run.rank], run.device, state.aug_gen)
        if moved:
            run.log(moved)
            if state.step and "augmentation" in moved:  # else the epoch's start seeds it
                state.aug_gen.manual_seed(imagedata.augmentation_seed(run.config["seed"],
                                                                      state.epoch, run.rank))
    else:
        rescale(state, ckpt["world"], run, lr)


def rescale(state: TrainingState, old_world: int, run: Run, lr: float) -> None:
    """Fewer or more processes mean more or fewer steps per epoch: go on from the same share of the
    epoch, with the schedule at the matching step and the rate of the new global batch."""
    scheduler = state.scheduler
    state.step = min(run.steps_per_epoch, state.step * old_world // run.world)
    scheduler.last_epoch = state.epoch * run.steps_per_epoch + state.step
    scheduler.base_lrs = [lr * g.get("lr_mult", 1.0) for g in state.optimizer.param_groups]
    for group, base, factor in zip(state.optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    run.log(f"resume: the run had {old_world} process(es) and now has {run.world}: the schedule "
            f"is rescaled (learning rate {lr:g} for the global batch of "
            f"{run.config['batch_size'] * run.world})"
            f"{', the rest of the epoch re-sharded' if state.step else ''} "
            "and the random streams start afresh")


# ------------------------------------------------------------------------- signals in an epoch

class Preemption:
    """When the loop stops or saves inside an epoch: SIGINT/SIGTERM ask it to finish its step, write
    last.pth and exit; SAVE_EVERY_MINUTES asks it to write last.pth and go on.

    The handler stays installed for repeated signals: torchrun forwards SIGTERM (and SIGINT) to
    each process group while SLURM or a terminal's Ctrl-C also reach every process directly, so a
    second signal comes at once and must not kill the save. Only a second Ctrl-C in a plain run
    stops at once (KeyboardInterrupt, which train.run() reports in one line).

    A plain run decides at every step. Processes agree by one small all-reduce (each one a device
    sync) at log steps, at the epoch's last step, and often enough in between that a stop is taken
    within agree_seconds; the interval comes from the slowest process's step time, reduced with the
    flags, so all processes compute the same one."""

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
        self.found = {signum: signal.getsignal(signum) for signum in devices.STOP_SIGNALS}
        for signum in devices.STOP_SIGNALS:
            signal.signal(signum, self)

    def uninstall(self) -> None:
        """The handlers install() found (None, one set outside Python, cannot be set again)."""
        for signum, handler in self.found.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

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


class EpochProgress:
    """One epoch's bookkeeping around the training step: the sums of loss and accuracy (kept on
    the device: no host sync until a log step), the first step whose loss is not finite, the
    progress bar and its images/s, and after every step the decision to go on, save last.pth, or
    save it and stop (Preemption)."""

    def __init__(self, keeper: "Keeper", state: TrainingState, epoch: int, warn_slow: bool):
        run = keeper.run
        self.keeper, self.run, self.state, self.epoch = keeper, run, state, epoch
        self.step = self.start = state.step
        if self.start == 0:
            state.partial = EpochTotals()
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)  # MPS: no float64
        self.correct = torch.zeros((), dtype=torch.long, device=run.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
        self.seen = self.seen_logged = 0
        self.loss_logged = 0.0  # loss_sum at the last log step
        self.t_log, self.first_steps, self.warn_slow = time.perf_counter(), [], warn_slow
        self.bar = tqdm(total=run.steps_per_epoch, initial=self.start,
                        desc=f"epoch {epoch + 1}/{run.config['epochs']}", disable=not run.master,
                        dynamic_ncols=True, leave=False, file=cli.QuietStream(sys.stderr))

    def so_far(self) -> EpochTotals:
        return self.state.partial + EpochTotals(float(self.loss_sum), int(self.correct), self.seen)

    def step_done(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """After an optimizer step: count it, and save or stop when a signal or the clock asks."""
        run, c = self.run, self.run.config
        self.loss_sum += loss.detach().float() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()),
                                     self.step, self.first_bad)
        self.seen += len(labels)
        self.step += 1
        self.bar.update()
        if self.warn_slow and self.step - self.start in (1, 2):  # step 1 includes warm-up
            self.first_steps.append(time.perf_counter())
            warning = len(self.first_steps) == 2 and devices.slow_epoch_warning(
                run.device, self.first_steps[1] - self.first_steps[0], run.steps_per_epoch)
            if warning:
                self.bar.write(warning, file=sys.stderr)
        stopping, save_now = self.keeper.preemption.poll(self.epoch, self.step,
                                                         run.steps_per_epoch, self.first_bad)
        if self.step % c["log_every"] == 0 or save_now or stopping:
            self.log()
        if save_now or stopping:
            self.keeper.save_last(self.state.checkpoint(run, self.epoch, self.step, self.so_far()))
            if stopping:
                self.stop()

    def log(self) -> None:
        """A log step: the device's sums are read (a sync), the bar shows them."""
        if int(self.first_bad) >= 0:
            raise Diverged(f"epoch {self.epoch + 1}, step {int(self.first_bad) + 1}")
        now, so_far, loss_sum = time.perf_counter(), self.so_far(), float(self.loss_sum)
        rate = (self.seen - self.seen_logged) * self.run.world / (now - self.t_log)
        self.bar.set_postfix(loss=f"{so_far.loss / so_far.images:.4f}",
                             acc=f"{so_far.correct / so_far.images:.2%}", img_s=f"{rate:.0f}")
        if self.keeper.board is not None and self.seen > self.seen_logged:
            # the mean loss of this process's batches since the last log step
            self.keeper.board.train_steps(self.epoch * self.run.steps_per_epoch + self.step,
                                          (loss_sum - self.loss_logged) / (self.seen - self.seen_logged))
        self.t_log, self.seen_logged, self.loss_logged = now, self.seen, loss_sum

    def stop(self) -> None:
        """last.pth is saved: say how to go on, and exit 128 + the signal."""
        run, preemption = self.run, self.keeper.preemption
        if run.distributed:  # torchrun ends the group when one process exits: not before the save
            dist.barrier()
        self.bar.close()
        run.log(f"stopped by {signal.Signals(preemption.signal).name} at epoch {self.epoch + 1}, "
                f"step {self.step}; saved {run.last_path}; continue with: "
                f"{self.keeper.continue_command()}", file=sys.stderr)
        sys.exit(128 + preemption.signal)

    def done(self) -> EpochTotals:
        """The epoch's totals over all processes (those before a mid-epoch resume included)."""
        self.bar.close()
        if int(self.first_bad) >= 0:
            raise Diverged(f"epoch {self.epoch + 1}, step {int(self.first_bad) + 1}")
        self.state.step = 0
        return self.so_far().summed(self.run.device, self.run.distributed)


# ------------------------------------------------------------------------------ the epoch's files

class Keeper:
    """Keeps the run: catches the stop signals, counts each epoch (EpochProgress), writes last.pth
    inside an epoch and all the files at its end, and says how to continue. `old_run`: an
    --overwrite's previous files, set aside at the first save. `board`: a TensorBoard writer, or
    None."""

    def __init__(self, run: Run, old_run: checkpoints.OldRun, default_save_dir: str,
                 board=None):
        self.run, self.old_run, self.default_save_dir, self.board = (run, old_run,
                                                                     default_save_dir, board)
        c = run.config
        self.preemption = Preemption(run.distributed, c["save_every_minutes"], c["log_every"],
                                     run.device)
        self.first_epoch = True  # of this invocation: its second step is timed (slow CPUs)

    def __enter__(self) -> "Keeper":
        """Ctrl-C and SIGTERM save and stop from here on; after the block, they do again what they
        did before it (for a caller that runs train.py's main() in its own process)."""
        self.preemption.install()
        return self

    def __exit__(self, *exc) -> None:
        self.preemption.uninstall()

    def epoch(self, state: TrainingState, epoch: int) -> EpochProgress:
        """The bookkeeping of epoch `epoch` (from 0), from state.step on."""
        progress = EpochProgress(self, state, epoch, warn_slow=self.first_epoch and self.run.master)
        self.first_epoch = False
        return progress

    def continue_command(self) -> str:
        """The command that continues this run (its data folder is in last.pth)."""
        run = self.run
        start = (f"torchrun --nproc_per_node={run.world} train.py" if run.distributed
                 else "python train.py")
        save = ("" if Path(run.config["save_dir"]) == Path(self.default_save_dir)
                else f" --save-dir {shlex.quote(str(run.config['save_dir']))}")
        return f"{start} --resume{save}"

    def save_last(self, ckpt: dict) -> None:
        """last.pth, from rank 0 (--overwrite: the previous run goes at this first save)."""
        if self.run.master:
            self.old_run.before_save()
            if self.board is not None:  # the events this checkpoint covers, on disk first
                self.board.commit()
            checkpoints.save(ckpt, self.run.last_path)
            self.old_run.after_save(self.run.log)
        self.preemption.saved()

    def end_epoch(self, state: TrainingState, epoch: int, totals: EpochTotals,
                  val: tuple | None, test: tuple | None, seconds: float) -> dict:
        """After the epoch's training and scoring (val, test: (loss, accuracy, balanced accuracy)
        or None): the epoch files, best.pth when validation improved (accuracy, or with BALANCE
        balanced accuracy; a tie is no improvement), metrics.csv, curves.png and last.pth, each
        atomically, last.pth last; then the epoch's line. Returns the results."""
        run, c = self.run, self.run.config
        if not all(math.isfinite(split[0]) for split in (val, test) if split is not None):
            raise Diverged(f"epoch {epoch + 1}, end (the evaluated loss is no longer finite)")
        lr = state.optimizer.param_groups[-1]["lr"]  # the head's, when a fine-tune has two rates
        chosen = val[chosen_score(c)] if val is not None else None
        is_best = val is None or epoch == 0 or chosen > state.best_acc
        if val is not None:
            state.best_acc = max(state.best_acc, chosen) if epoch else chosen
        state.epoch = epoch + 1
        ckpt = state.checkpoint(run, epoch + 1, 0, EpochTotals())
        train = (totals.loss / totals.images, totals.correct / totals.images)
        if run.master:
            self.write_epoch(ckpt, epoch, train, val, test, lr, seconds, totals.images, is_best)
        self.preemption.saved()
        balanced = shows_balanced(c)
        scored = "".join(f"{name} loss {split[0]:.4f} acc {split[1]:.2%}"
                         f"{f' bal {split[2]:.2%}' if balanced else ''} | "
                         for name, split in (("val", val), ("test", test)) if split is not None)
        run.log(f"epoch {epoch + 1}/{c['epochs']}: train loss {train[0]:.4f} acc {train[1]:.2%} | "
                f"{scored}lr {lr:.3g} | {seconds:.1f} s, {totals.images / seconds:.0f} img/s"
                f"{' | best' if is_best else ''}", flush=True)
        return {"train": train, "val": val, "test": test}

    def write_epoch(self, ckpt, epoch, train, val, test, lr, seconds, images, is_best) -> None:
        """The epoch's files, from rank 0. The weights first, so a full disk at the metrics write
        cannot cost them; last.pth last: if the run dies before it, --resume redoes this epoch, and
        the metrics row written here is dropped again (checkpoints.truncate_metrics)."""
        save_dir, c = self.run.save_dir, self.run.config
        self.old_run.before_save()
        weights = checkpoints.weights(ckpt, test[1] if test else None, val[1] if val else None,
                                      val[2] if val else None)
        checkpoints.save(weights, checkpoints.epoch_path(save_dir, epoch + 1))
        if is_best:
            checkpoints.save(weights, checkpoints.best_path(save_dir))
        balanced = shows_balanced(c)
        cell = lambda split, i: f"{split[i]:.6f}" if split and (i < 2 or balanced) else ""  # noqa
        row = [epoch + 1, f"{train[0]:.6f}", f"{train[1]:.6f}", cell(test, 0), cell(test, 1),
               f"{lr:.6g}", f"{seconds:.2f}", f"{images / seconds:.1f}", cell(val, 0), cell(val, 1),
               cell(val, 2), cell(test, 2)]
        checkpoints.append_metrics(save_dir / "metrics.csv",
                                   dict(zip(checkpoints.METRICS_FIELDS, row)))
        plots.plot_curves(save_dir / "metrics.csv", save_dir / "curves.png",
                          chosen=checkpoints.chosen_column(c))
        if self.board is not None:  # the events this checkpoint covers, on disk first
            self.board.epoch(epoch + 1, train, val, test, lr, images / seconds, balanced)
            self.board.commit()
        checkpoints.save(ckpt, self.run.last_path)
        self.old_run.after_save(self.run.log)
        checkpoints.rotate(save_dir, self.run.config["keep"])

    def test_best(self, state: TrainingState, test_data, score) -> tuple[float, float] | None:
        """Without TEST_EVERY_EPOCH: the test split scored once (score(model, data) -> (loss,
        accuracy)) on best.pth's weights, by rank 0 alone (the save folder may be its own); said,
        and stored in best.pth. None where there is no best.pth, or it cannot be read (a warning;
        the file is left as it is)."""
        run = self.run
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
        loss, acc = score(model, test_data)[:2]
        del model
        best["test_acc"] = acc
        checkpoints.save(best, path)
        run.log(f"best.pth (epoch {best['epoch']}): test loss {loss:.4f} acc {acc:.2%}")
        return loss, acc

    def diverged(self, error: Diverged) -> Diverged:
        """The error of a run whose loss or weights left the finite numbers, saying whether a good
        checkpoint of this run is there to go back to."""
        if self.run.last_path.exists() and not self.old_run.pending:
            kept = "the last good checkpoint is kept"
        else:
            kept = "no checkpoint of this run was written" + (
                "; the previous run's files are as they were" if self.old_run.pending else "")
        return Diverged(f"{error}; {kept}")


def chosen_score(c: dict) -> int:
    """Which score of a validation split chooses best.pth (checkpoints.chosen_column), as an index
    of train.Score: accuracy, or balanced accuracy."""
    return 2 if checkpoints.chosen_column(c) == "val_balanced_acc" else 1


def shows_balanced(c: dict) -> bool:
    """Balanced accuracy is shown (epoch line, metrics.csv, curves.png) for folder datasets, whose
    classes may differ in size, and wherever BALANCE is on."""
    return c["dataset"] == "folder" or bool(c.get("balance"))


def share_batchnorm_statistics(run: Run, state: TrainingState) -> None:
    """Under torchrun each process's BatchNorm statistics saw only its own batches: take rank 0's,
    as DDP does before each forward, so all evaluate (and save) one model. Every process must
    broadcast the same tensors in the same order."""
    if run.distributed:
        for module in dict.fromkeys([state.model, state.evaluated]):
            for buf in module.buffers():
                dist.broadcast(buf, 0)
