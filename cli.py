"""The command line and console output that train.py, test.py and bench.py share.

Each script declares its settings as a block of UPPERCASE constants with a comment on each line,
then freezes it: `DEFAULTS = cli.frozen(globals())`. `parse` turns that block into the command line
(--name for NAME, the constant's type, the comment as help) and `check_config` rejects values that
cannot work. Errors a user can cause are raised as UserError, which `run_main` turns into one line
on stderr and exit code 2.
"""

import argparse
import math
import os
import sys
import tokenize
from pathlib import Path
from types import MappingProxyType

from net import CFGS

class UserError(Exception):
    """A mistake the user can fix (bad option, missing file, ...): reported in one line, exit code
    2."""


def run_main(main):
    """Call main() and return what it returns; a UserError becomes `prog: error: message` on stderr
    and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------ command line

class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; one line is easier to read."""

    def __init__(self, *args, **kwargs):
        # --lr must not silently mean --lr-something
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _constant_comments(source_file: str) -> dict[str, str]:
    """Map NAME -> its trailing comment, for top-level lines of the form `NAME = value  # comment`.
    Comment lines right below, starting in the same column, continue it (lines fit an editor)."""
    comments, name, at_line_start = {}, None, True
    last = None  # (NAME, column) of the comment that a comment line below may continue
    with open(source_file, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.NAME and at_line_start and tok.start[1] == 0:
                name, last = tok.string, None
            elif tok.type == tokenize.COMMENT and name and name.isupper():
                comments[name] = tok.string.lstrip("# ").strip()
                last = (name, tok.start[1])
            elif tok.type == tokenize.COMMENT and at_line_start and last and tok.start[1] == last[1]:
                comments[last[0]] += " " + tok.string.lstrip("# ").strip()
            elif tok.type == tokenize.COMMENT or tok.type == tokenize.NL and at_line_start:
                last = None  # another comment, or a blank line: the constant's comment has ended
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
            at_line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT,
                                         tokenize.DEDENT, tokenize.ENCODING)
    return comments


def frozen(namespace: dict) -> MappingProxyType:
    """A script's settings: the UPPERCASE names of `namespace` (its globals()) that hold plain
    values, in order, as they are when this is called. Called right after the constant block, so a
    constant defined further down never becomes a flag."""
    return MappingProxyType({k: v for k, v in namespace.items()
                             if k.isupper() and isinstance(v, (bool, int, float, str))})


def parse_config(defaults: dict, source_file: str, description: str, argv=None,
                 extra=lambda parser: None) -> tuple[dict, argparse.Namespace]:
    """Build the command line from the UPPERCASE constants of a script.

    Each constant NAME becomes --name (underscores as dashes) with the constant's type and the
    comment on its line as help, so the block at the top of the script stays the single source.
    Returns (config with lowercase keys, namespace with any extra options).
    """
    comments = _constant_comments(source_file)
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, default=value, action=argparse.BooleanOptionalAction, help=comments.get(name, ""))
        else:
            kind = float if isinstance(value, float) else type(value)
            parser.add_argument(flag, default=value, type=kind, metavar=kind.__name__.upper(),
                                help=comments.get(name, ""))
    extra(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    config = {name.lower(): getattr(args, name.lower()) for name in defaults}
    # Which settings were typed on the command line (--resume reports only those when they differ).
    typed = {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_") for a in argv if a.startswith("--")}
    args.explicit = typed & config.keys()
    return config, args


OPTIMIZERS = ("sgd", "adamw")


SCHEDULES = ("cosine", "step", "constant")


AMP_MODES = ("auto", "bf16", "fp16", "off")


# Seeds derived from the run's seed (seed * 1_000_003 + epoch, ...) must stay within the 64 bits
# torch's generators take; 2**32 - 1 leaves room, and is the range most tools use.
SEED_MAX = 2**32 - 1


# A VGG at 2048 px keeps about 13 GB of activations per training image (counted from its layer
# sizes): beyond that not even one image fits on a device.
MAX_IMAGE_SIZE = 2048


INT_SETTINGS = ("image_size", "workers", "depth", "width_div", "epochs", "batch_size", "step_epochs", "seed",
                "keep", "log_every")


FLOAT_SETTINGS = ("dropout", "lr", "momentum", "weight_decay", "warmup_epochs", "step_gamma",
                  "save_every_minutes", "label_smoothing")


def check_seed(name: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{name} must be an integer from 0 to {SEED_MAX}, got {seed!r}")


def check_path(name: str, value) -> None:
    """An empty string would silently mean the current folder."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} is empty: give a path (. for the current folder)")


def check_config(c: dict) -> None:
    """Reject values that cannot work, before any data is read or any file is written."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    # Types first: a checkpoint's stored config is checked too, and may have been edited.
    for key in INT_SETTINGS:
        need(isinstance(c[key], int) and not isinstance(c[key], bool),
             f"--{key.replace('_', '-')} must be an integer, got {c[key]!r}")
    for key in FLOAT_SETTINGS:
        flag = "--" + key.replace("_", "-")
        need(isinstance(c[key], (int, float)) and not isinstance(c[key], bool),
             f"{flag} must be a number, got {c[key]!r}")
        need(math.isfinite(c[key]), f"{flag} must be a finite number, got {c[key]}")
    for key in ("batch_norm", "compile"):
        need(isinstance(c[key], bool), f"--{key.replace('_', '-')} must be true or false, got {c[key]!r}")
    check_path("--data-dir (or DATA_DIR)", c["data_dir"])
    check_path("--save-dir", c["save_dir"])
    check_seed("--seed", c["seed"])
    need(c["image_size"] <= MAX_IMAGE_SIZE, f"--image-size must be at most {MAX_IMAGE_SIZE} (a VGG's "
         f"activations at {c['image_size']} px do not fit in any device's memory), got {c['image_size']}")
    need(c["log_every"] >= 1, f"--log-every must be at least 1, got {c['log_every']}")
    # Upper bounds: beyond them a value fails deep inside torch (64-bit overflows) or the OS.
    need(c["batch_size"] <= 2**31 - 1, f"--batch-size must be at most {2**31 - 1}, got {c['batch_size']}")
    need(c["epochs"] <= 1_000_000,  # epoch shuffles are seeded by seed * 1_000_003 + epoch
         f"--epochs must be at most 1000000, got {c['epochs']}")
    need(c["workers"] <= 256, f"--workers must be at most 256, got {c['workers']}")
    need(c["step_gamma"] > 0, f"--step-gamma must be positive, got {c['step_gamma']}")
    from imagedata import DATASETS  # imagedata imports UserError from here
    need(c["dataset"] in DATASETS, f"unknown dataset {c['dataset']!r}; choose one of {', '.join(DATASETS)}")
    need(c["depth"] in CFGS, f"unknown VGG depth {c['depth']}; choose one of {', '.join(map(str, CFGS))}")
    need(c["width_div"] >= 1 and 64 % c["width_div"] == 0,
         f"--width-div must divide 64 (1, 2, 4, 8, 16, 32, 64), got {c['width_div']}")
    need(c["image_size"] >= 32, f"--image-size must be at least 32 (five 2x2 pools), got {c['image_size']}")
    need(c["batch_size"] >= 1, f"--batch-size must be at least 1, got {c['batch_size']}")
    need(c["epochs"] >= 1, f"--epochs must be at least 1, got {c['epochs']}")
    need(c["lr"] > 0, f"--lr must be positive, got {c['lr']}")
    need(0 <= c["momentum"] < 1, f"--momentum must be in [0, 1), got {c['momentum']}")
    need(c["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {c['weight_decay']}")
    need(0 <= c["dropout"] < 1, f"--dropout must be in [0, 1), got {c['dropout']}")
    need(c["optimizer"] in OPTIMIZERS, f"unknown optimizer {c['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}")
    need(c["schedule"] in SCHEDULES, f"unknown schedule {c['schedule']!r}; choose one of {', '.join(SCHEDULES)}")
    need(c["amp"] in AMP_MODES, f"unknown amp mode {c['amp']!r}; choose one of {', '.join(AMP_MODES)}")
    need(c["augment"] in ("auto", "on", "off"), f"--augment must be auto, on or off, got {c['augment']!r}")
    need(c["workers"] >= 0, f"--workers must be >= 0, got {c['workers']}")
    need(c["keep"] >= 0, f"--keep must be >= 0 (0 keeps all), got {c['keep']}")
    need(0 <= c["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1), got {c['label_smoothing']}")
    if "val_fraction" in c:
        need(0 <= c["val_fraction"] < 1, f"--val-fraction must be in [0, 1), got {c['val_fraction']}")
    need(c["warmup_epochs"] >= 0 and c["step_epochs"] >= 1 and c["save_every_minutes"] >= 0,
         "--warmup-epochs and --save-every-minutes must be >= 0, --step-epochs >= 1")


# ----------------------------------------------------------------------------------------- console

class QuietStream:
    """A text stream whose write errors are swallowed: a reader that has gone (`| head -1`) or a
    full disk behind stdout or stderr (`> /dev/full`) must never end a training run. After the first
    failure the stream's file descriptor points at /dev/null, so later lines and the flush at exit
    go nowhere, quietly."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self._silence()

    def _silence(self) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):  # isatty, fileno, encoding: what tqdm asks of its stream
        return getattr(self.stream, name)


def console(*args, file=None, **kwargs) -> None:
    """print for progress lines (see QuietStream); flushed, so a failure surfaces here, not at
    exit."""
    print(*args, file=QuietStream(file or sys.stdout), **{**kwargs, "flush": True})
