"""Settings edited in the source get the same checks as settings typed on the command line.

Each script's block of constants becomes its command line (cli.parse_config); these tests hand it an
edited block, as a user's edit of train.py / test.py / bench.py would, and check that every mistake is
one line naming the setting, before anything runs.
"""

import shutil
import subprocess
import sys

import pytest

import cli
from conftest import ROOT, load_script

pytestmark = pytest.mark.quick


def script_module(name: str):
    return load_script(name, f"block_of_{name[:-3]}")


@pytest.fixture(scope="module")
def scripts():
    return {name: script_module(name) for name in ("train.py", "test.py", "bench.py")}


def parse(scripts, script: str, edits: dict, argv=()):
    module = scripts[script]
    defaults = {k: v for k, v in module.DEFAULTS.items() if k not in edits or edits[k] is not DELETE}
    defaults |= {k: v for k, v in edits.items() if v is not DELETE}
    return cli.parse_config(defaults, module.__file__, "x", argv=list(argv),
                            flags=getattr(module, "FLAGS", None))


DELETE = object()


def refused(scripts, script, edits, argv=()) -> str:
    with pytest.raises(cli.UserError) as e:
        parse(scripts, script, edits, argv)
    return str(e.value)


@pytest.mark.parametrize("script,edits,words", [
    ("test.py", {"TTA": True}, ["--tta", "auto, on, off", "True"]),
    ("test.py", {"INVERT": "always"}, ["--invert", "always"]),
    ("test.py", {"AMP": "fp32"}, ["--amp", "fp32"]),
    ("train.py", {"AMP": "fp32"}, ["amp", "fp32"]),
    ("train.py", {"OPTIMIZER": "Adam"}, ["optimizer", "Adam"]),
    ("train.py", {"CUTOUT": 1.0}, ["--cutout", "[0, 1)"]),
    ("train.py", {"SHIFT": 17}, ["--shift", "from 0 to 16", "17"]),
    ("train.py", {"SHIFT": 2.5}, ["SHIFT", "int", "2.5"]),
    ("bench.py", {"DATASET": "cifar10"}, ["--dataset", "cifar10"]),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_a_choice_set_in_the_source_is_checked(scripts, script, edits, words):
    message = refused(scripts, script, edits)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("script,edits,words", [
    ("train.py", {"EPOCH": 2}, ["EPOCH", "EPOCHS"]),
    ("train.py", {"LEARNING_RATE": 0.1}, ["LEARNING_RATE"]),
    ("test.py", {"GRID_SEEDS": 3}, ["GRID_SEEDS", "GRID_SEED"]),
    ("bench.py", {"STEP": 3}, ["STEP", "STEPS"]),
])
def test_a_stray_constant_in_the_block_names_the_closest_setting(scripts, script, edits, words):
    message = refused(scripts, script, edits)
    assert all(w in message for w in words), message


def test_a_renamed_setting_is_one_line(scripts):
    message = refused(scripts, "train.py", {"EPOCHS": DELETE, "N_EPOCHS": 3})
    assert "N_EPOCHS" in message
    message = refused(scripts, "train.py", {"EPOCHS": DELETE})
    assert "EPOCHS" in message


@pytest.mark.parametrize("script,edits,words", [
    ("train.py", {"SEED": None}, ["SEED", "None"]),
    ("train.py", {"DATA_DIR": None}, ["DATA_DIR", "None"]),
    ("test.py", {"BATCH_SIZE": None}, ["BATCH_SIZE", "None"]),
    ("train.py", {"LR": (0.02,)}, ["LR", "tuple", "comma"]),
    ("train.py", {"EPOCHS": "10"}, ["EPOCHS", "int", "'10'"]),
    ("train.py", {"EPOCHS": 2.5}, ["EPOCHS", "int"]),
    ("train.py", {"BATCH_NORM": 1}, ["BATCH_NORM", "bool"]),
    ("train.py", {"CUTOUT": "0.25"}, ["CUTOUT", "float"]),
    ("test.py", {"IMAGE": 3}, ["IMAGE"]),
])
def test_a_value_of_the_wrong_type_in_the_source_is_one_line(scripts, script, edits, words):
    message = refused(scripts, script, edits)
    assert all(w in message for w in words), message


def test_none_stays_a_value_where_it_is_documented(scripts):
    config, args = parse(scripts, "test.py", {"OUT": None, "GRID_SEED": None, "AMP": None})
    assert args.out is None and args.grid_seed is None and args.amp is None


def test_the_type_of_a_setting_is_its_meaning_not_its_literal(scripts):
    """DROPOUT = 0 is the float 0.0: --dropout 0.3 still works, and the value is a float."""
    config, _ = parse(scripts, "train.py", {"DROPOUT": 0}, ["--dropout", "0.3"])
    assert config["dropout"] == 0.3
    config, _ = parse(scripts, "train.py", {"DROPOUT": 0, "LR": 1})
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
