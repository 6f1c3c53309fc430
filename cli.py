"""The command line and the console that the scripts share (train.py, test.py, bench.py, export.py).

A script declares each of its settings once, in a block of UPPERCASE constants at its top, each
with a comment, and ends the block with `DEFAULTS = cli.settings(globals())`:

    LR = 0.02                              # peak learning rate (for BATCH_SIZE 128 on one process)
    AMP: Literal["auto", "bf16", "off"] = "auto"  # mixed precision ...
    PRETRAINED: str | None = None          # None: random weights | imagenet | a path

A setting's type is its default's; where the literal cannot say, an annotation says it: a set of
choices (Literal[...]), None allowed (X | None), a list of paths (list[str]). parse() turns the
block into the command line (--name, the comment as help, the default shown), reads a recipe file
(NAME = value lines, read with ast, never run) and checks every value, also those of the block
itself and of a checkpoint's stored settings: its type, then the script's RULES (what each value
must be) and its own check function (how settings relate). Errors a user can cause are
errors.UserError, which run_main turns into one line on stderr and exit code 2. This module names
no setting of any script, and imports no data or training code.
"""

import _thread
import argparse
import ast
import difflib
import math
import os
import sys
import threading
import tokenize
import types
import typing
from pathlib import Path

from errors import UserError


def run_main(main):
    """Call main() and return what it returns; a UserError becomes `prog: error: message` on stderr
    and exit code 2. Characters the terminal's encoding lacks (a class named "café" under
    PYTHONIOENCODING=ascii) are printed as escapes, never an error. A Ctrl-C that Python could not
    raise where it landed still stops main() (_ctrl_c_reaches_main)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text file (a test's capture)
            pass
    hook, sys.unraisablehook = sys.unraisablehook, _ctrl_c_reaches_main
    try:
        return main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.unraisablehook = hook


def _ctrl_c_reaches_main(unraisable) -> None:
    """sys.unraisablehook: Python cannot raise from a weakref callback or __del__, so a Ctrl-C that
    arrives while one runs would be printed as "Exception ignored" and lost. It is raised again in
    the main thread instead, quietly, a moment later from another thread: raised in this hook, it
    would be lost as well (and if it lands in a callback again, this hook sends it once more).
    Anything else is reported as Python does."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        again = threading.Timer(0.01, _thread.interrupt_main)
        again.daemon = True
        again.start()
    else:
        sys.__unraisablehook__(unraisable)


# ---------------------------------------------------------------------------------- the block

def choices(kind) -> tuple | None:
    """The values of a Literal["a", "b"] annotation (None among them: the setting may also be None,
    decided later), or None for any other type."""
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


class Block(dict):
    """A script's settings block: NAME -> default, in the block's order, with each setting's type
    (`kinds`) and comment (`help`), both by NAME."""

    def __init__(self, defaults: dict, kinds: dict, help: dict, source: str):
        super().__init__(defaults)
        self.kinds, self.help, self.source = kinds, help, source

    def lower(self) -> dict:
        """The defaults as a config: lowercase names."""
        return {name.lower(): value for name, value in self.items()}


def settings(namespace: dict) -> Block:
    """The settings block of the script whose globals are `namespace`: every UPPERCASE name
    assigned at its top level above the line that calls this, as it is now, with its annotation
    and its comment. Checked by parse(): a block with a typo must be one line, not a traceback."""
    source = namespace["__file__"]
    names = block_names(source)
    annotations = namespace.get("__annotations__", {})
    comments = constant_comments(source)
    return Block({n: namespace[n] for n in names if n in namespace},
                 {n: annotations.get(n, type(namespace.get(n))) for n in names},
                 {n: comments.get(n, "") for n in names}, source)


def block_names(source_file: str) -> list[str]:
    """The UPPERCASE names assigned at the top level of a script above its `DEFAULTS = ...` line."""
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


def constant_comments(source_file: str) -> dict[str, str]:
    """NAME -> its trailing comment, for top-level lines `NAME = value  # comment`. Comment lines
    right below, starting in the same column, continue it (lines fit an editor)."""
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


# -------------------------------------------------------------------------------------- types

def describe(kind) -> str:
    """A setting's type in words, for messages."""
    if choices(kind):
        return "one of " + ", ".join(map(str, [v for v in choices(kind) if v is not None]))
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return f"{describe(args[0])} or None"
    if typing.get_origin(kind) is list:
        return "a list of paths"
    return {int: "an integer", float: "a number", bool: "true or false",
            str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def typed(name: str, value, kind, where: str):
    """`value` as setting `name` of type `kind` takes it (an int where a float is expected becomes
    a float; one path where a list of paths is expected, a list of one); a value of another type
    is one line naming the setting, the value and `where` it came from."""
    flag = "--" + name.lower().replace("_", "-")
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        return typed(name, value, kind, where)
    if value is None and None not in (choices(kind) or ()):
        raise UserError(f"{name} = None in {where}: {flag} takes {describe(kind)} "
                        "(None is not one of its values)")
    if choices(kind):
        if value is None:
            return None
        if value not in choices(kind) or type(value) is bool and True in choices(kind):
            raise UserError(f"{flag} must be {describe(kind)}, got {value!r}"
                            f"{'' if where == 'the command line' else f' (in {where})'}")
        return value
    if origin is list:
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, (list, tuple)) and value
                and all(isinstance(v, str) for v in value)):
            raise UserError(f"{name} in {where} must be a path or a list of paths, got {value!r}")
        return list(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        comma = " (a trailing comma makes a tuple)" if isinstance(value, tuple) else ""
        raise UserError(f"{name} in {where} must be {describe(kind)}, got {value!r}{comma}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    if kind is str and not value:  # an empty path would silently mean the current folder
        raise UserError(f"{flag} is empty{f' (in {where})' if where != 'the command line' else ''}"
                        ": give a value (. for the current folder)")
    return value


# ------------------------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; one line is easier to read."""

    def __init__(self, *args, **kwargs):
        # --lr must not silently mean --lr-something
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class MissingSetting(UserError, AttributeError):
    """A setting the script reads that its block no longer has (renamed or deleted in the source):
    one line (a UserError), and to hasattr() simply missing (an AttributeError)."""

    def __init__(self, key: str):
        super().__init__(f"the settings block has no {key.upper()} (the setting "
                         f"--{key.replace('_', '-')}): put it back above DEFAULTS")


class Config(dict):
    """A script's settings by lowercase name; one its block no longer has is one line."""

    def __missing__(self, key):
        raise MissingSetting(key)


class Args(argparse.Namespace):
    """The parsed command line; like Config, a missing setting is one line."""

    def __getattr__(self, key):
        raise MissingSetting(key)


def argument(parser, name: str, block: Block, default) -> None:
    """--name for the setting NAME of `block`, from its type and comment."""
    kind = block.kinds[name]
    options = {"default": default, "help": block.help[name]}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        kind = next(a for a in args if a is not type(None))
        origin = typing.get_origin(kind)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif choices(kind):
        values = [v for v in choices(kind) if v is not None]
        options |= {"choices": values, "type": type(values[0])}
    elif origin is list:
        options |= {"nargs": "+", "metavar": "PATH"}
    else:  # the setting's type, not its literal's: DROPOUT = 0 still takes --dropout 0.3
        options |= {"type": kind, "metavar": kind.__name__.upper()}
    parser.add_argument("--" + name.lower().replace("_", "-"), **options)


def parse(block: Block, description: str, argv=None, rules=(), check=None, extra=None,
          recipes: bool = False) -> tuple[Config, Args]:
    """The settings of a run: the block's values, those of a recipe file named first (`recipes`:
    python train.py recipes/mnist_cpu.py), and the options typed, which win over both. Every value
    is checked (`check_config`). `extra(parser)` adds options that are no setting.
    Returns (config by lowercase name, the namespace of every option); args.given holds the
    settings typed on the command line or set by the recipe."""
    script = Path(block.source).name
    for name, kind in block.kinds.items():  # a literal's type must be one a setting can have
        if kind not in (bool, int, float, str) and typing.get_origin(kind) not in (
                list, types.UnionType, typing.Union, typing.Literal):
            comma = " (a trailing comma makes a tuple)" if kind is tuple else ""
            raise UserError(f"{name} = {block[name]!r} in {script}'s settings: a setting is a "
                            f"number, a string, True or False{comma}; None only where the "
                            "block's annotation allows it (NAME: str | None = None)")
    defaults = {name: typed(name, value, block.kinds[name], f"{script}'s settings")
                for name, value in block.items()}
    parser = OneLineParser(description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in defaults.items():
        argument(parser, name, block, value)
    if extra:
        extra(parser)
    if recipes:
        parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                            help="a file of settings (recipes/*.py) that replace those above; "
                                 "options typed with it win")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv, namespace=Args())
    from_recipe = {}
    if recipes and args.recipe is not None:
        from_recipe = read_recipe(args.recipe, block)
        parser.set_defaults(**{name.lower(): value for name, value in from_recipe.items()})
        args = parser.parse_args(argv, namespace=Args())
    config = Config({name.lower(): getattr(args, name.lower()) for name in defaults})
    typed_flags = {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
                   for a in argv if a.startswith("--")}
    args.given = (typed_flags | {name.lower() for name in from_recipe}) & config.keys()
    origin = {name.lower(): f"recipe {args.recipe}" for name in from_recipe
              if name.lower() not in typed_flags}
    check_config(config, block, rules, check, where="the command line", origin=origin)
    return config, args


def read_recipe(path: str, block: Block) -> dict:
    """The settings a recipe file sets (recipes/*.py): `NAME = value` lines in the form of the
    script's block (Python literals; comments and a docstring allowed), each of its setting's
    type. Returns NAME -> value."""
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
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"recipe {path}, line {node.lineno}: {name} must be a plain value "
                            "(a number, string, True, False, None or a list of them)") from None
        if name not in block:
            raise no_such_setting(name, list(block), f"recipe {path}", Path(block.source).name)
        values[name] = typed(name, value, block.kinds[name], f"recipe {path}")
    return values


def no_such_setting(name: str, known: list[str], where: str, script: str) -> UserError:
    """The error for NAME in `where` that is none of the settings `known`, with the closest one as
    a hint: a misspelt name would otherwise be a setting nothing reads."""
    close = difflib.get_close_matches(name.upper(), [k.upper() for k in known], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UserError(f"{name} in {where} is no setting of {script}{hint}")


def check_config(config: dict, block: Block, rules=(), check=None,
                 where: str = "the command line", origin: dict | None = None) -> None:
    """Every value of its setting's type (the block's), then each rule (setting, what its values
    must be, the test) and the script's `check` of how settings relate: one line for the first that
    fails, naming where a value came from when it was not typed (`origin`: setting -> a recipe).
    Settings that are None (decided later) skip their rule."""
    origin = origin or {}
    for name, kind in block.kinds.items():
        key = name.lower()
        if key in config:
            config[key] = typed(name, config[key], kind, origin.get(key, where))
    for key, must, ok in rules:
        if config.get(key) is not None and not ok(config[key]):
            source = origin.get(key, where)
            raise UserError(f"--{key.replace('_', '-')} must be {must}, got {config[key]!r}"
                            f"{'' if source == 'the command line' else f' (in {source})'}")
    if check:
        check(config)


def merge_stored(block: Block, stored: dict, removed: dict) -> tuple[Config, list[str]]:
    """A checkpoint's stored settings (and what the run derived, such as the statistics its inputs
    are normalized with) over today's defaults: a setting added since the run began takes its
    default; one this code no longer has (in `removed`: name -> the value that meant off) is
    dropped. Returns (config, those dropped that changed the run: stored with another value)."""
    config = Config(block.lower())
    changed = []
    for key, value in stored.items():
        if key not in removed:
            config[key] = value
        elif value != removed[key]:
            changed.append(f"{key.upper()} = {value!r}")
    return config, changed


# ------------------------------------------------------------------------------------- console

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
