"""Recipe files (recipes/*.py): NAME = value lines that replace train.py's settings block, checked by
its rules; options typed with them still win."""

import pytest

import cli
import train
from conftest import ROOT
from errors import UserError

pytestmark = pytest.mark.quick


def parse(*argv):
    return cli.parse(train.DEFAULTS, "x", argv=list(map(str, argv)), rules=train.RULES,
                     check=train.check_settings, extra=train.extra_options, recipes=True)


def write(tmp_path, text: str):
    path = tmp_path / "r.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_recipe_sets_only_train_py_settings_of_the_right_type(recipe):
    config, args = parse(recipe)
    values = cli.read_recipe(str(recipe), train.DEFAULTS)
    assert values and {k.lower(): v for k, v in values.items()}.items() <= config.items()
    assert args.given == {k.lower() for k in values}


def test_a_recipe_replaces_the_block_and_typed_options_win(tmp_path):
    path = write(tmp_path, '"""doc"""\n# a comment\nEPOCHS = 3\nLR = 1  # an int for a float\n'
                           'AUGMENT = "on"\nBATCH_NORM = False\n')
    config, args = parse(path, "--epochs", "5", "--batch-norm")
    assert (config["epochs"], config["lr"], config["augment"], config["batch_norm"]) == \
        (5, 1.0, "on", True)
    assert isinstance(config["lr"], float)
    assert config["image_size"] == train.DEFAULTS["IMAGE_SIZE"]  # not in the recipe: the block's
    assert {"epochs", "lr", "augment", "batch_norm"} <= args.given
    assert "image_size" not in args.given


@pytest.mark.parametrize("text,words", [
    ("EPOCH = 3\n", ["EPOCH", "no setting of train.py", "EPOCHS"]),
    ("LR = 0.02,\n", ["LR", "number", "tuple"]),
    ("EPOCHS = 2 * 3\n", ["line 1", "EPOCHS", "plain value"]),
    ("import os\n", ["line 1", "NAME = value"]),
    ("AUGMENT = 'always'\n", ["augment", "auto, on, off"]),
    ("SMALL_MAP_LR = True\n", ["SMALL_MAP_LR", "no setting of train.py"]),
    ("EPOCHS = 0\n", ["--epochs", "from 1", "r.py"]),
    ("EPOCHS = \n", ["not a Python file"]),
])
def test_a_bad_recipe_is_one_line_naming_the_problem(tmp_path, text, words):
    with pytest.raises(UserError) as e:
        parse(write(tmp_path, text))
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_missing_recipe_is_one_line(tmp_path):
    with pytest.raises(UserError, match="recipe .*nope.py"):
        parse(tmp_path / "nope.py")
