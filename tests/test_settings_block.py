"""Settings edited in the source get the same checks as settings typed on the command line.

Each script's block of constants becomes its command line (cli.parse); these tests hand it an
edited block, as a user's edit of train.py / test.py / bench.py would, and check that every mistake is
one line naming the setting, before anything runs. cli.py itself names no setting of any script: the
types come from the block (its literals and annotations), the ranges from each script's RULES.
"""

import re
import shutil
import subprocess
import sys

import pytest

import cli
from conftest import ROOT, load_script

pytestmark = pytest.mark.quick

SCRIPTS = ("train.py", "test.py", "bench.py")


def script_module(name: str):
    return load_script(name, f"block_of_{name[:-3]}")


@pytest.fixture(scope="module")
def scripts():
    return {name: script_module(name) for name in SCRIPTS}


DELETE = object()


def parse(scripts, script: str, edits: dict, argv=()):
    module = scripts[script]
    block = module.DEFAULTS
    values = {k: v for k, v in block.items() if edits.get(k) is not DELETE}
    values |= {k: v for k, v in edits.items() if v is not DELETE}
    kinds = {k: block.kinds.get(k, type(v)) for k, v in values.items()}
    edited = cli.Block(values, kinds, {k: block.help.get(k, "") for k in values}, block.source)
    return cli.parse(edited, "x", argv=list(argv), rules=getattr(module, "RULES", ()),
                     check=getattr(module, "check_settings", None))


def refused(scripts, script, edits, argv=()) -> str:
    with pytest.raises(cli.UserError) as e:
        config, args = parse(scripts, script, edits, argv)
        for name in scripts[script].DEFAULTS:  # what the script would read
            getattr(args, name.lower())
    return str(e.value)


@pytest.mark.parametrize("script,edits,words", [
    ("test.py", {"TTA": True}, ["--tta", "auto, on, off", "True"]),
    ("test.py", {"INVERT": "always"}, ["--invert", "always"]),
    ("test.py", {"AMP": "fp32"}, ["--amp", "fp32"]),
    ("train.py", {"AMP": "fp32"}, ["--amp", "fp32"]),
    ("train.py", {"OPTIMIZER": "Adam"}, ["--optimizer", "Adam"]),
    ("train.py", {"SCHEDULE": "step"}, ["--schedule", "step", "cosine"]),
    ("train.py", {"SHIFT": 17}, ["--shift", "from 0 to 16", "17"]),
    ("train.py", {"SHIFT": 2.5}, ["SHIFT", "integer", "2.5"]),
    ("bench.py", {"DATASET": "cifar10"}, ["--dataset", "cifar10"]),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_a_choice_or_range_set_in_the_source_is_checked(scripts, script, edits, words):
    message = refused(scripts, script, edits)
    assert all(w in message for w in words), message


def test_a_renamed_or_deleted_setting_is_one_line_where_it_is_read(scripts):
    message = refused(scripts, "train.py", {"EPOCHS": DELETE, "N_EPOCHS": 3})
    assert "EPOCHS" in message and "--epochs" in message
    message = refused(scripts, "test.py", {"GRID_SEED": DELETE})
    assert "GRID_SEED" in message


@pytest.mark.parametrize("script,edits,words", [
    ("train.py", {"SEED": None}, ["SEED", "None"]),
    ("train.py", {"DATA_DIR": None}, ["DATA_DIR", "None"]),
    ("test.py", {"BATCH_SIZE": None}, ["BATCH_SIZE", "None"]),
    ("train.py", {"LR": (0.02,)}, ["LR", "tuple", "comma"]),
    ("train.py", {"EPOCHS": "10"}, ["EPOCHS", "integer", "'10'"]),
    ("train.py", {"EPOCHS": 2.5}, ["EPOCHS", "integer"]),
    ("train.py", {"BATCH_NORM": 1}, ["BATCH_NORM", "true or false"]),
    ("train.py", {"LR": "0.25"}, ["LR", "number"]),
    ("train.py", {"LR": float("inf")}, ["--lr", "finite"]),
    ("train.py", {"SAVE_DIR": ""}, ["--save-dir", "empty"]),
    ("test.py", {"IMAGE": 3}, ["IMAGE"]),
])
def test_a_value_of_the_wrong_type_in_the_source_is_one_line(scripts, script, edits, words):
    message = refused(scripts, script, edits)
    assert all(w in message for w in words), message


def test_none_stays_a_value_where_it_is_documented(scripts):
    config, args = parse(scripts, "test.py", {"OUT": None, "AMP": None, "TTA_SHIFT": None})
    assert args.out is None and args.amp is None and args.tta_shift is None


def test_the_type_of_a_setting_is_its_meaning_not_its_literal(scripts):
    """DROPOUT = 0 is the float 0.0: --dropout 0.3 still works, and the value is a float."""
    block = scripts["train.py"].DEFAULTS
    edited = cli.Block({**block, "DROPOUT": 0, "LR": 1}, block.kinds, block.help, block.source)
    config, _ = cli.parse(edited, "x", argv=["--dropout", "0.3"])
    assert config["dropout"] == 0.3
    config, _ = cli.parse(edited, "x", argv=[])
    assert config["dropout"] == 0.0 and isinstance(config["dropout"], float)
    assert isinstance(config["lr"], float)


def test_a_single_image_path_in_the_source_is_one_path(scripts):
    _, args = parse(scripts, "test.py", {"IMAGE": "photo.png"})
    assert args.image == ["photo.png"]
    _, args = parse(scripts, "test.py", {"IMAGE": ("a.png", "b.png")})
    assert args.image == ["a.png", "b.png"]


def test_the_shipped_blocks_pass(scripts):
    for name in scripts:
        parse(scripts, name, {})


def test_cli_names_no_setting_of_any_script(scripts):
    """cli.py parses and checks generically: no setting of a script appears in it as a string."""
    source = (ROOT / "cli.py").read_text()
    strings = set(re.findall(r"[\"']([a-z_]+)[\"']", source))
    for name, module in scripts.items():
        named = {k.lower() for k in module.DEFAULTS} & strings
        assert not named, (name, named)


def test_each_setting_is_declared_once_in_its_script(scripts):
    """A setting's name, default and comment are its block's line; --help shows them all."""
    for name, module in scripts.items():
        text = (ROOT / name).read_text()
        for setting in module.DEFAULTS:
            assert len(re.findall(rf"^{setting}\b\s*(:[^=]*)?=", text, re.M)) == 1, setting
            assert module.DEFAULTS.help[setting], f"{name}: {setting} has no comment"


def test_an_edited_train_py_with_a_trailing_comma_is_one_line(tmp_path):
    """The whole path, as a user meets it: LR = 0.02, in a copy of the repo is one line and exit 2,
    before any data is read or the save folder is created."""
    for f in ROOT.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    source = (tmp_path / "train.py").read_text()
    assert "\nLR = 0.02 " in source
    (tmp_path / "train.py").write_text(source.replace("\nLR = 0.02 ", "\nLR = 0.02, ", 1))
    proc = subprocess.run([sys.executable, "train.py", "--save-dir", "runs/x"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LR" in lines[0] and "tuple" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
