"""What the model learned, shown: train.py's curves.png, test.py's tables, confusion.png and predictions.png,
and test.py --image on files written the way a user would write them."""

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

import imagedata
import plots
from conftest import TINY, load_script, make_cifar, make_mnist, run_script

N_TEST = 64
PRED_LINE = re.compile(r'^Predicted: "(.*)", Actual: "(.*)"$', re.M)
IMAGE_LINE = re.compile(r'^(.*): Predicted: "(.*)" \| top-3: (.*)$', re.M)


def is_png(path) -> bool:
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
        return im.format == "PNG"


@pytest.fixture(scope="module")
def script():
    """test.py imported as a module (by path: `import test` could find the standard library's package)."""
    return load_script("test.py", "test_script")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 1-epoch run on a small MNIST in the IDX format, shared by every test of this file.

    TINY's network barely leaves chance in one epoch and then predicts one class for everything, which
    would let a preprocessing slip go unseen. At 1/8 width with AdamW it reaches 78-100% (seeds 0-2;
    seed 2: 94%, so the confusion matrix has mistakes in it) in about 10 s."""
    tmp = tmp_path_factory.mktemp("visual")
    data = make_mnist(tmp / "data", n_train=1024, n_test=N_TEST)
    save = tmp / "save"
    run_script("train.py", *TINY, "--width-div", "8", "--optimizer", "adamw", "--lr", "0.002", "--dropout", "0",
               "--seed", "2", "--data-dir", data, "--save-dir", save, check=True)
    return data, save


@pytest.fixture(scope="module")
def split_run(trained):
    """test.py on the test split. --amp off: bf16 rounds logits to 3 digits, and a near tie could then
    be broken differently in a batch of another size (the --image run below); fp32 leaves no such doubt."""
    data, save = trained
    proc = run_script("test.py", "--checkpoint", save / "best.pth", "--data-dir", data, "--show-all",
                      "--amp", "off", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def split_data(trained):
    data, save = trained
    c = dict(torch.load(save / "best.pth", weights_only=True)["config"], data_dir=str(data))
    return imagedata.load_split(c, False, torch.device("cpu"))


def matrix_from(stdout: str, n: int = 10) -> list[list[int]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix")) + 2  # title, header
    return [[int(v) for v in line.split()[-n:]] for line in lines[start:start + n]]


# ----------------------------------------------------------------------------------------- train.py

def test_train_draws_curves_png(trained):
    _, save = trained
    with open(save / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]
    assert is_png(save / "curves.png")
    assert not list(save.glob(".*tmp*"))


@pytest.mark.quick
def test_plot_curves_redraws_and_only_warns_on_failure(tmp_path, capsys):
    rows = "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds,images_per_s\n" + "".join(
        f"{e},{1 / e:.3f},{0.8 + e / 100},{1.2 / e:.3f},{0.7 + e / 100},0.01,10.0,100.0\n" for e in (1, 2, 3))
    (tmp_path / "metrics.csv").write_text(rows)
    plots.plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert is_png(tmp_path / "curves.png")
    plots.plot_curves(tmp_path / "missing.csv", tmp_path / "other.png")  # must not end a training run
    assert "warning: could not draw" in capsys.readouterr().err
    assert not (tmp_path / "other.png").exists()


@pytest.mark.quick
def test_plot_curves_draws_runs_that_tested_only_some_epochs(tmp_path, capsys):
    """TEST_EVERY_EPOCH off leaves the test columns empty (in some rows only, after a --resume that
    changed it): the curves are drawn all the same, the test curve at the epochs that have it."""
    head = "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds,images_per_s,val_loss,val_acc\n"
    for tested in ((), (1, 2)):
        rows = "".join(f"{e},{1 / e:.3f},{0.8 + e / 100},"
                       + (f"{1.2 / e:.3f},{0.7 + e / 100}" if e in tested else ",")
                       + f",0.01,10.0,100.0,{1.1 / e:.3f},{0.75 + e / 100}\n" for e in (1, 2, 3))
        (tmp_path / "metrics.csv").write_text(head + rows)
        out = tmp_path / f"curves{len(tested)}.png"
        plots.plot_curves(tmp_path / "metrics.csv", out)
        assert is_png(out) and "warning" not in capsys.readouterr().err, tested


# ----------------------------------------------------------------------------------- test.py, test split

def test_pictures_are_written_next_to_the_checkpoint(trained, split_run):
    _, save = trained
    for name in ("confusion.png", "predictions.png"):
        assert f"wrote {save / name}" in split_run.stdout
        assert is_png(save / name)


def test_confusion_matrix_matches_the_accuracy_and_the_predictions(split_run):
    out = split_run.stdout
    correct, total, percent = re.search(r"^test accuracy: (\d+)/(\d+) = ([\d.]+)%$", out, re.M).groups()
    cm = np.array(matrix_from(out))
    assert cm.sum() == int(total) == N_TEST
    assert np.trace(cm) == int(correct)
    assert f"{np.trace(cm) / cm.sum():.2%}" == f"{percent}%"
    # The matrix is exactly the one of the --show-all lines: rows actual, columns predicted.
    pairs = PRED_LINE.findall(out)
    assert len(pairs) == N_TEST
    expected = np.zeros((10, 10), dtype=int)
    for p, y in pairs:
        expected[int(y), int(p)] += 1
    assert (cm == expected).all()
    # The per-class table says the same.
    table = re.findall(r"^(\d)\s+(\d+)\s+(\d+)\s+([\d.]+|nan)%\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out,
                       re.M)
    assert [(int(k), int(n), int(c)) for k, n, c, _ in table] == [
        (k, int(cm[k].sum()), int(cm[k, k])) for k in range(10)]


def test_grid_options_and_out_folder(trained, split_run, tmp_path):
    data, save = trained  # save/predictions.png: split_run's default grid, to compare with
    out = tmp_path / "figs"
    proc = run_script("test.py", "--checkpoint", save / "best.pth", "--data-dir", data, "--show", "0",
                      "--grid", "5", "--grid-seed", "3", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Predicted:" not in proc.stdout
    assert is_png(out / "confusion.png") and is_png(out / "predictions.png")
    with Image.open(out / "predictions.png") as small, Image.open(save / "predictions.png") as full:
        assert small.width < full.width and small.height < full.height  # 5 images in one row, not 8x8


# ---------------------------------------------------------------------------------- test.py --image

@pytest.fixture(scope="module")
def own_images(trained, split_data, tmp_path_factory, split_run):
    """Test samples written as a user's files in several forms, plus two files that are not images;
    and test.py --image run on them."""
    _, save = trained
    folder = tmp_path_factory.mktemp("own")
    expected = {}  # file -> index of the test sample it shows
    for i in range(8):
        img = split_data.raw(i)
        img.save(folder / f"sample_{i}.png")
        expected[f"sample_{i}.png"] = i
    img = np.asarray(split_data.raw(0))
    Image.fromarray(255 - img).save(folder / "dark_on_light_0.png")  # a pen drawing on paper
    expected["dark_on_light_0.png"] = 0
    ink = np.zeros((*img.shape, 4), dtype=np.uint8)  # black ink whose opacity is the stroke, on transparency
    ink[..., 3] = np.asarray(split_data.raw(1))
    Image.fromarray(ink, "RGBA").save(folder / "rgba_ink_1.png")
    expected["rgba_ink_1.png"] = 1
    big = split_data.raw(2).convert("RGB").resize((560, 560), Image.Resampling.NEAREST)
    big.save(folder / "large_rgb_2.jpg", quality=95)
    expected["large_rgb_2.jpg"] = 2
    (folder / "notes.txt").write_text("not an image, and not named like one: skipped in a folder")
    bad = tmp_path_factory.mktemp("bad") / "not_an_image.png"
    bad.write_text("hello")
    proc = run_script("test.py", "--checkpoint", save / "best.pth", "--image", folder, bad, "--amp", "off",
                      "--device", "cpu")
    return proc, expected, bad


def test_a_file_that_is_not_an_image_gives_one_line_and_the_others_still_run(own_images):
    proc, expected, bad = own_images
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("test.py: error: ") and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(m[0].rsplit("/", 1)[-1] for m in IMAGE_LINE.findall(proc.stdout)) == sorted(expected)


def test_image_predictions_equal_those_of_the_same_samples_in_the_dataset(own_images, split_run):
    proc, expected, _ = own_images
    split_preds = [p for p, _ in PRED_LINE.findall(split_run.stdout)]
    for path, pred, top in IMAGE_LINE.findall(proc.stdout):
        name = path.rsplit("/", 1)[-1]
        assert pred == split_preds[expected[name]], name
        probs = [float(p) for p in re.findall(r'"\d" ([\d.]+)%', top)]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.01
        assert top.startswith(f'"{pred}" ')
        assert top.endswith("(inverted)") == (name.startswith(("dark_on_light", "rgba_ink")))
    # Inverted back, the pen drawing is the very same tensor as the sample: the same probabilities.
    tops = {path.rsplit("/", 1)[-1]: top for path, _, top in IMAGE_LINE.findall(proc.stdout)}
    assert tops["dark_on_light_0.png"] == tops["sample_0.png"] + " (inverted)"


def test_read_image_gives_the_stored_sample_back(script, split_data, tmp_path):
    """A sample saved as PNG, inverted, as black ink on transparency, or in 16 bits reads back as the dataset
    stores it."""
    stored = split_data.images[3]  # (1, 28, 28) uint8
    split_data.raw(3).save(tmp_path / "a.png")
    x, inverted, _ = script.read_image(tmp_path / "a.png", "mnist", "auto")
    assert x.dtype == torch.uint8 and torch.equal(x, stored) and not inverted
    Image.fromarray(255 - stored[0].numpy()).save(tmp_path / "b.png")
    x, inverted, _ = script.read_image(tmp_path / "b.png", "mnist", "auto")
    assert torch.equal(x, stored) and inverted
    x, _, _ = script.read_image(tmp_path / "b.png", "mnist", "off")
    assert torch.equal(x, 255 - stored)
    ink = np.zeros((28, 28, 4), dtype=np.uint8)
    ink[..., 3] = stored[0].numpy()
    Image.fromarray(ink, "RGBA").save(tmp_path / "c.png")
    x, inverted, _ = script.read_image(tmp_path / "c.png", "mnist", "auto")
    assert inverted and (x.int() - stored.int()).abs().max() <= 1  # alpha blending rounds
    Image.fromarray(stored[0].numpy().astype(np.uint16) * 257).save(tmp_path / "d.png")  # 16-bit grey
    x, _, _ = script.read_image(tmp_path / "d.png", "mnist", "auto")
    assert Image.open(tmp_path / "d.png").mode.startswith("I") and torch.equal(x, stored)


def test_read_image_for_cifar10(script, tmp_path, cifar_ok):
    """Any size and mode becomes (3, 32, 32) uint8 RGB; transparency becomes white; a CIFAR-10 sample reads back exactly."""
    rgba = np.zeros((50, 70, 4), dtype=np.uint8)
    rgba[:, :35] = (255, 0, 0, 255)  # opaque red on the left, fully transparent on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    x, inverted, _ = script.read_image(tmp_path / "half.png", "cifar10", "auto")
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and not inverted
    assert x[:, :, 0].tolist() == [[255] * 32, [0] * 32, [0] * 32]
    assert x[:, :, -1].tolist() == [[255] * 32] * 3
    Image.new("L", (300, 200), 90).save(tmp_path / "grey.jpg")
    x, _, _ = script.read_image(tmp_path / "grey.jpg", "cifar10", "auto")
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    root = make_cifar(tmp_path / "data")
    c = {"dataset": "cifar10", "data_dir": str(root), "image_size": 32}
    data = imagedata.load_split(c, False, torch.device("cpu"))
    data.raw(5).save(tmp_path / "sample.png")
    x, _, _ = script.read_image(tmp_path / "sample.png", "cifar10", "auto")
    assert torch.equal(x, data.images[5])


def test_own_images_of_a_folder_model_are_read_as_training_reads_its_files(script, tmp_path):
    """Pictures of mixed sizes (stored at the input size, 48 px, as training stores such a folder):
    test.py --image reads each one into the very pixels the test split holds."""
    rng = np.random.default_rng(0)
    for k, (name, size) in enumerate((("cat", (90, 60)), ("dog", (40, 120)))):
        (tmp_path / "test" / name).mkdir(parents=True)
        pixels = rng.integers(0, 256, (*size, 4), dtype=np.uint8)
        Image.fromarray(pixels, "RGBA").save(tmp_path / "test" / name / f"{k}.png")
    c = {"dataset": "folder", "data_dir": str(tmp_path), "image_size": 48, "workers": 0}
    data = imagedata.load_split(c, False, torch.device("cpu"))
    for i, path in enumerate(data.paths):
        x, _, _ = script.read_image(path, "folder", "auto", 48)
        assert torch.equal(x, data.images[i])
