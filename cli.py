"""The command line and console output that train.py, test.py and bench.py share.

Each script declares its settings as a block of UPPERCASE constants with a comment on each line,
then freezes it: `DEFAULTS = cli.frozen(globals())`. `parse_config` turns that block into the command
line (--name for NAME, the setting's type, the comment as help), reads a recipe file when the script
takes one (`python train.py recipes/mnist_cpu.py`), and `check_config` rejects values that cannot
work; the network's and the datasets' own rules live beside their tables (net.py, imagedata.py).
Errors a user can cause are raised as errors.UserError, which `run_main` turns into one line on
stderr and exit code 2. This module only parses and prints: it imports no data or training code.
"""

import argparse
import ast
import difflib
import math
import os
import sys
import tokenize
from pathlib import Path
from types import MappingProxyType

import net
from errors import UserError  # noqa: F401 (the scripts import it from here too)


def run_main(main):
    """Call main() and return what it returns; a UserError becomes `prog: error: message` on stderr
    and exit code 2. Characters the terminal's encoding lacks (a class named "café" under
    PYTHONIOENCODING=ascii) are printed as escapes, never an error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text file (a test's capture)
            pass
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
            elif (tok.type == tokenize.COMMENT and at_line_start and last
                  and tok.start[1] == last[1]):
                comments[last[0]] += " " + tok.string.lstrip("# ").strip()
            elif tok.type == tokenize.COMMENT or tok.type == tokenize.NL and at_line_start:
                last = None  # another comment, or a blank line: the constant's comment has ended
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
            at_line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT,
                                         tokenize.DEDENT, tokenize.ENCODING)
    return comments


def block_names(source_file: str) -> list[str]:
    """The UPPERCASE names assigned at the top level of a script above its `DEFAULTS = ...` line:
    its settings block, whatever values they hold."""
    tree = ast.parse(Path(source_file).read_bytes())
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        ids = [t.id for t in targets if isinstance(t, ast.Name)]
        if "DEFAULTS" in ids:
            break
        names += [n for n in ids if n.isupper() and n not in names]
    return names


def frozen(namespace: dict) -> MappingProxyType:
    """A script's settings: every UPPERCASE constant of its block (the top-level assignments above
    `DEFAULTS = cli.frozen(globals())`), in order, as they are when this is called. Called right
    after the block, so a constant defined further down never becomes a flag. Their values are
    checked by parse_config (a block with a typo must be one line, not a traceback at import)."""
    return MappingProxyType({k: namespace[k] for k in block_names(namespace["__file__"])
                             if k in namespace})


def read_recipe(path: str, script: str, defaults: dict, flags: dict) -> dict:
    """The settings a recipe file sets (recipes/*.py): `NAME = value` lines in the form of the
    script's settings block (Python literals; comments and a docstring allowed), checked by the
    same rules. Returns NAME -> value."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except OSError as e:
        raise UserError(f"recipe {path}: {e.strerror or e}") from None
    except (SyntaxError, ValueError) as e:
        raise UserError(f"recipe {path} is not a Python file of NAME = value lines "
                        f"({getattr(e, 'msg', e)}, line {getattr(e, 'lineno', '?')})") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"recipe {path}, line {node.lineno}: a recipe holds only "
                            "NAME = value lines")
        name = node.targets[0].id
        try:
            values[name] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"recipe {path}, line {node.lineno}: {name} must be a plain value "
                            "(a number, string, True, False, None or a list of them)") from None
        if name not in defaults:
            raise no_such_setting(name, [n.lower() for n in defaults], f"recipe {path}", script)
    if SCRIPT_SETTINGS.get(script) is None:
        return values
    return checked_values(values, f"recipe {path}", script, flags)


def parse_config(defaults: dict, source_file: str, description: str, argv=None,
                 extra=lambda parser: None, flags=None,
                 checks=(), recipes: bool = False) -> tuple[dict, argparse.Namespace]:
    """Build the command line from the UPPERCASE constants of a script, and check the values.

    Each constant NAME becomes --name (underscores as dashes) with the constant's type and the
    comment on its line as help, so the block at the top of the script stays the single source.
    A bool gives --name / --no-name. `flags` adds argparse options for a setting by its lowercase
    name (choices, nargs, a metavar). `extra(parser)` adds options that are no setting. With
    `recipes`, a file named first (`python train.py recipes/mnist_cpu.py`) replaces the block's
    values with its own, and options typed with it win over both. `checks` are the script's own
    rules (each called with the config).
    Returns (config with lowercase keys, namespace with every option); args.explicit holds the
    settings typed on the command line.
    """
    script = Path(source_file).name
    defaults = check_block(defaults, script, flags or {})
    comments = _constant_comments(source_file)
    parser = OneLineParser(description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in defaults.items():
        key = name.lower()
        options = {"default": value, "help": comments.get(name, "")}
        kind = setting_kind(key, flags or {})
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:  # the setting's type, not its literal's: DROPOUT = 0 still takes --dropout 0.3
            options |= {"type": kind, "metavar": kind.__name__.upper()}
        more = (flags or {}).get(key, {})
        if "choices" in more:  # argparse then lists them in place of the metavar
            options.pop("metavar", None)
        parser.add_argument("--" + key.replace("_", "-"), **(options | more))
    extra(parser)
    if recipes:
        parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                            help="a file of settings (recipes/*.py) that replace those above; "
                                 "options typed with it win")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    from_recipe = {}
    if recipes and args.recipe is not None:
        from_recipe = read_recipe(args.recipe, script, defaults, flags or {})
        parser.set_defaults(**{name.lower(): value for name, value in from_recipe.items()})
        args = parser.parse_args(argv)
    config = {name.lower(): getattr(args, name.lower()) for name in defaults}
    # Which settings were typed, or set by the recipe (--resume reports only those when they
    # differ; bench.py's --quick gives way to them).
    typed = {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
             for a in argv if a.startswith("--")}
    args.explicit = (typed | {name.lower() for name in from_recipe}) & config.keys()
    for key, more in (flags or {}).items():  # a value from the source gets argparse's checks too
        if "choices" in more and config[key] is not None and config[key] not in more["choices"]:
            raise UserError(f"--{key.replace('_', '-')} must be one of "
                            f"{', '.join(map(str, more['choices']))}, got {config[key]!r}")
    # those with choices are checked above (bench.py's --dataset synthetic is no dataset of
    # train.py's)
    check_config({k: v for k, v in config.items() if "choices" not in (flags or {}).get(k, {})})
    for check in checks:  # the script's own rules (imagedata.check_settings)
        check(config)
    return config, args


# The settings each script reads, and those of them whose documented value None means "decided
# later". A constant of a script's block not listed here is a typo; one listed but missing was
# renamed or deleted: both are one line naming the setting before anything runs.
SCRIPT_SETTINGS = {
    "train.py": ("dataset data_dir image_size augment shift cutout workers skip_bad_images "
                 "val_fraction tta tta_shift test_every_epoch depth width_div batch_norm dropout "
                 "pretrained freeze_epochs backbone_lr_mult epochs batch_size optimizer lr "
                 "momentum nesterov weight_decay small_map_lr label_smoothing schedule "
                 "warmup_epochs step_epochs step_gamma ema_decay device amp compile seed "
                 "save_dir keep save_every_minutes log_every").split(),
    "test.py": ("checkpoint show show_all grid grid_seed cam mistakes out image invert top_k "
                "batch_size device amp tta tta_shift skip_bad_images data_dir").split(),
    "bench.py": ("dataset data_dir image_size batch_size width_div batch_norm steps warmup workers "
                 "device amp compile quick json").split(),
}
NONE_ALLOWED = {"train.py": {"pretrained"},
                "test.py": {"grid_seed", "out", "image", "amp", "data_dir", "tta_shift"},
                "bench.py": {"workers", "json"}}


def setting_kind(key: str, flags: dict) -> type:
    """The type a setting's values have: from the tables below, whatever the literal in the
    source; a setting with a fixed set of choices is a string."""
    if "type" in flags.get(key, {}) or "choices" in flags.get(key, {}):
        return flags[key].get("type", str)
    return (int if key in INT_SETTINGS else float if key in FLOAT_SETTINGS
            else bool if key in BOOL_SETTINGS else str)


def check_block(defaults: dict, script: str, flags: dict) -> dict:
    """The settings block of `script` as the source holds it, checked like a typed value: every
    setting present, no stray constant (a misspelt name would become a flag nothing reads), each
    value of its setting's type (an int literal for a float setting becomes a float), None only
    where documented. A string where a list of paths is expected (test.py's IMAGE) is that one
    path. Returns the values to use."""
    known = SCRIPT_SETTINGS.get(script)
    if known is None:  # a script of someone's own: its literals are its types
        return dict(defaults)
    names = [n.lower() for n in defaults]
    for name in defaults:
        if name.lower() not in known:
            raise no_such_setting(name, known, f"{script}'s settings", script)
    missing = [k for k in known if k not in names]
    if missing:
        raise UserError(f"{script}'s settings block has no {missing[0].upper()} (the setting "
                        f"--{missing[0].replace('_', '-')}): put it back above DEFAULTS")
    return checked_values(defaults, script, script, flags)


def no_such_setting(name: str, known: list[str], where: str, script: str) -> UserError:
    """The error for a constant NAME in `where` that is none of the settings `known` (lowercase),
    with the closest one as a hint: a misspelt name would otherwise become a flag nothing reads."""
    close = difflib.get_close_matches(name.lower(), known, n=1)
    hint = f"; did you mean {close[0].upper()}?" if close else ""
    return UserError(f"{name} in {where} is no setting of {script}{hint}")


def checked_values(values: dict, where: str, script: str, flags: dict) -> dict:
    """`values` (NAME -> value, from a settings block or a recipe file) checked by their settings'
    rules: each of its setting's type (an int literal for a float setting becomes a float), None
    only where documented, a choice among the choices. Returns the values to use."""
    out = {}
    for name, value in values.items():
        key = name.lower()
        kind = setting_kind(key, flags)
        if key == "image" and isinstance(value, str):
            value = [value]
        choices = flags.get(key, {}).get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{name} = {value!r} in {where}: --{key.replace('_', '-')} must be "
                            f"one of {', '.join(map(str, choices))}")
        if value is None:
            if key not in NONE_ALLOWED.get(script, ()):
                raise UserError(f"{name} = None in {where}: {name} takes a {kind.__name__} "
                                "(None is not one of its values)")
        elif key == "image":
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise UserError(f"{name} in {where} must be a path or a list of paths, got "
                                f"{value!r}")
            value = list(value)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            comma = " (a trailing comma makes a tuple)" if isinstance(value, tuple) else ""
            raise UserError(f"{name} in {where} must be of type {kind.__name__}, got "
                            f"{value!r}{comma}")
        out[name] = value
    return out


OPTIMIZERS = ("sgd", "adamw")


SCHEDULES = ("cosine", "linear", "step", "constant")


AMP_MODES = ("auto", "bf16", "fp16", "off")


# Seeds derived from the run's seed (seed * 1_000_003 + epoch, ...) must stay within the 64 bits
# torch's generators take; 2**32 - 1 leaves room, and is the range most tools use.
SEED_MAX = 2**32 - 1


# A VGG at 2048 px keeps about 13 GB of activations per training image (counted from its layer
# sizes): beyond that not even one image fits on a device.
MAX_IMAGE_SIZE = 2048


INT_SETTINGS = ("image_size", "shift", "workers", "depth", "width_div", "epochs", "batch_size",
                "step_epochs", "seed", "keep", "log_every", "show", "grid", "grid_seed", "top_k",
                "steps", "warmup", "freeze_epochs", "cam", "mistakes", "tta_shift")


FLOAT_SETTINGS = ("dropout", "lr", "momentum", "weight_decay", "warmup_epochs", "step_gamma",
                  "save_every_minutes", "label_smoothing", "val_fraction", "backbone_lr_mult",
                  "ema_decay", "cutout")


BOOL_SETTINGS = ("batch_norm", "compile", "skip_bad_images", "show_all", "quick",
                 "tta", "nesterov", "test_every_epoch", "small_map_lr")


PATH_SETTINGS = {"data_dir": "--data-dir (or DATA_DIR)", "save_dir": "--save-dir",
                 "checkpoint": "--checkpoint", "out": "--out", "json": "--json",
                 "pretrained": "--pretrained"}


def check_seed(name: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{name} must be an integer from 0 to {SEED_MAX}, got {seed!r}")


def check_path(name: str, value) -> None:
    """An empty string would silently mean the current folder."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} is empty: give a path (. for the current folder)")


def check_config(c: dict) -> None:
    """Reject values that cannot work, before any data is read or any file is written. Every
    setting of the three scripts is checked here, each where `c` has it: train.py's config (also
    as a checkpoint stores it), test.py's and bench.py's. None means "decided later": unchecked."""
    given = {k: v for k, v in c.items() if v is not None}

    def need(key, ok, message):
        if key in given and not ok(given[key]):
            raise UserError(message.format(given[key]))

    # Types first: a checkpoint's stored config is checked too, and may have been edited.
    for key in INT_SETTINGS:
        need(key, lambda v: isinstance(v, int) and not isinstance(v, bool),
             f"--{key.replace('_', '-')} must be an integer, got {{!r}}")
    for key in FLOAT_SETTINGS:
        flag = "--" + key.replace("_", "-")
        need(key, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             f"{flag} must be a number, got {{!r}}")
        need(key, math.isfinite, f"{flag} must be a finite number, got {{}}")
    for key in BOOL_SETTINGS:
        need(key, lambda v: isinstance(v, bool),
             f"--{key.replace('_', '-')} must be true or false, got {{!r}}")
    for key, name in PATH_SETTINGS.items():
        if key in given:
            check_path(name, given[key])
    for key in ("seed", "grid_seed"):
        if key in given:
            check_seed("--" + key.replace("_", "-"), given[key])
    # the network's own rules (net.py) and the datasets' (imagedata.check_settings)
    need("depth", lambda v: v in net.CFGS,
         f"unknown VGG depth {{}}; choose one of {', '.join(map(str, net.CFGS))}")
    need("width_div", lambda v: v in net.WIDTH_DIVS,
         f"--width-div must divide 64 ({', '.join(map(str, net.WIDTH_DIVS))}), got {{}}")
    need("image_size", lambda v: v >= net.MIN_IMAGE_SIZE,
         f"--image-size must be at least {net.MIN_IMAGE_SIZE} (five 2x2 pools), got {{}}")
    need("image_size", lambda v: v <= MAX_IMAGE_SIZE,
         f"--image-size must be at most {MAX_IMAGE_SIZE} (a VGG's activations at {{0}} px do not "
         "fit in any device's memory), got {0}")
    # Upper bounds: beyond them a value fails deep inside torch (64-bit overflows) or the OS.
    need("batch_size", lambda v: v >= 1, "--batch-size must be at least 1, got {}")
    need("batch_size", lambda v: v <= 2**31 - 1,
         f"--batch-size must be at most {2**31 - 1}, got {{}}")
    need("epochs", lambda v: v >= 1, "--epochs must be at least 1, got {}")
    # epoch shuffles are seeded by seed * 1_000_003 + epoch
    need("epochs", lambda v: v <= 1_000_000, "--epochs must be at most 1000000, got {}")
    need("workers", lambda v: v >= 0, "--workers must be >= 0, got {}")
    need("workers", lambda v: v <= 256, "--workers must be at most 256, got {}")
    need("log_every", lambda v: v >= 1, "--log-every must be at least 1, got {}")
    need("lr", lambda v: v > 0, "--lr must be positive, got {}")
    need("momentum", lambda v: 0 <= v < 1, "--momentum must be in [0, 1), got {}")
    need("weight_decay", lambda v: v >= 0, "--weight-decay must be >= 0, got {}")
    need("dropout", lambda v: 0 <= v < 1, "--dropout must be in [0, 1), got {}")
    need("label_smoothing", lambda v: 0 <= v < 1, "--label-smoothing must be in [0, 1), got {}")
    need("ema_decay", lambda v: 0 <= v < 1, "--ema-decay must be in [0, 1) (0: off), got {}")
    need("cutout", lambda v: 0 <= v < 1, "--cutout must be in [0, 1) (0: off), got {}")
    if given.get("nesterov") and given.get("optimizer", "sgd") != "sgd":
        raise UserError(f"--nesterov is a momentum of SGD; --optimizer is {given['optimizer']}")
    if given.get("nesterov") and given.get("momentum", 1) == 0:
        raise UserError("--nesterov needs a momentum above 0 (--momentum is 0)")
    need("val_fraction", lambda v: 0 <= v < 1, "--val-fraction must be in [0, 1), got {}")
    need("optimizer", lambda v: v in OPTIMIZERS,
         f"unknown optimizer {{!r}}; choose one of {', '.join(OPTIMIZERS)}")
    need("schedule", lambda v: v in SCHEDULES,
         f"unknown schedule {{!r}}; choose one of {', '.join(SCHEDULES)}")
    need("amp", lambda v: v in AMP_MODES,
         f"unknown amp mode {{!r}}; choose one of {', '.join(AMP_MODES)}")
    need("augment", lambda v: v in ("auto", "on", "off"),
         "--augment must be auto, on or off, got {!r}")
    need("shift", lambda v: 0 <= v <= 16, "--shift must be from 0 to 16 pixels (0: flips only), got {}")
    need("tta_shift", lambda v: 0 <= v <= 8,
         "--tta-shift must be from 0 to 8 32nds of the side (0: mirror images only), got {}")
    need("keep", lambda v: v >= 0, "--keep must be >= 0 (0 keeps all), got {}")
    need("warmup_epochs", lambda v: v >= 0, "--warmup-epochs must be >= 0, got {}")
    need("save_every_minutes", lambda v: v >= 0, "--save-every-minutes must be >= 0, got {}")
    need("step_epochs", lambda v: v >= 1, "--step-epochs must be at least 1, got {}")
    need("step_gamma", lambda v: v > 0, "--step-gamma must be positive, got {}")
    need("freeze_epochs", lambda v: v >= 0, "--freeze-epochs must be >= 0, got {}")
    need("backbone_lr_mult", lambda v: v >= 0, "--backbone-lr-mult must be >= 0, got {}")
    # test.py
    need("show", lambda v: v >= 0, "--show must be >= 0, got {}")
    need("grid", lambda v: v >= 0, "--grid must be >= 0, got {}")
    need("cam", lambda v: v >= 0, "--cam must be >= 0, got {}")
    need("mistakes", lambda v: v >= 0, "--mistakes must be >= 0, got {}")
    need("top_k", lambda v: v >= 1, "--top-k must be at least 1, got {}")
    need("invert", lambda v: v in ("auto", "on", "off"),
         "--invert must be auto, on or off, got {!r}")
    # bench.py
    need("steps", lambda v: v >= 1, "--steps must be at least 1, got {}")
    need("warmup", lambda v: v >= 0, "--warmup must be >= 0, got {}")


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
