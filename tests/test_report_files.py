"""The files test.py writes, whatever the names, folders and pictures it is given: CSV cells that a
spreadsheet would run, folders where its pictures may not go, a folder that cannot be written, long
and non-ASCII class names, pictures of tens of megapixels, and the columns of predictions.csv
against values known without the repo's code."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import net
import train
from conftest import ROOT, csv_rows, load_script, run_script

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def folder_config(**more) -> dict:
    return {k.lower(): v for k, v in train.DEFAULTS.items()} | {
        "dataset": "folder", "image_size": 32, "width_div": 16, "device": "cpu"} | more


def checkpoint(path: Path, c: dict, classes: list[str], head_bias=None) -> Path:
    """An untrained checkpoint as train.py writes its epoch files; with head_bias, the last layer's
    weight is zero and its bias these logits, so every image gets exactly them."""
    torch.manual_seed(0)
    model = net.build_model(c, len(classes))
    if head_bias is not None:
        with torch.no_grad():
            model.classifier[6].weight.zero_()
            model.classifier[6].bias.copy_(torch.tensor(head_bias))
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.save({"format": checkpoints.FORMAT, "model": model.state_dict(), "config": c,
                      "classes": classes, "epoch": 1}, path)
    return path


def image_folder(root: Path, classes, per_class: int = 3, names=None, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                file = (names or (lambda k, i: f"{i}.png"))(k, i)
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    folder / file)
    return root


# ------------------------------------------------------------------------------ CSV injection

@pytest.mark.quick
def test_csv_cell_neutralizes_what_a_spreadsheet_would_run_and_keeps_numbers():
    for text in ("=1+1", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx", "=HYPERLINK(\"http://x\")"):
        assert checkpoints.csv_cell(text) == "'" + text
    for number in ("0.5", "-0.25", "+3", "1e-05", "-2.5E+3", "12", ".5"):
        assert checkpoints.csv_cell(number) == number
    assert checkpoints.csv_cell("'=x") == "'=x"  # written again (metrics.csv is rewritten): unchanged
    assert checkpoints.csv_cell("cat") == "cat"


def test_names_a_spreadsheet_would_run_are_quoted_in_mistakes_and_predictions_csv(tmp_path):
    """Class folders and files named like formulas: every cell of mistakes.csv and predictions.csv
    is quoted, and those that start like a formula carry a leading single quote."""
    classes = ["+cmd", "-2+3", "=HYPERLINK(1)", "@SUM(1)"]  # sorted, as the folder lists them
    root = image_folder(tmp_path / "d", classes, names=lambda k, i: f"={k}+{i}.png")
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), classes)
    proc = run_script("test.py", "--checkpoint", ckpt, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = csv_rows(tmp_path / "out" / "mistakes.csv")
    assert len(rows) > 1  # an untrained model on 4 classes gets some wrong
    for row in rows[1:]:
        assert row[1] in ["'" + c for c in classes] and row[2] in ["'" + c for c in classes], row
    raw = (tmp_path / "out" / "mistakes.csv").read_text(encoding="utf-8")
    assert all(line.startswith('"') for line in raw.splitlines())  # every cell quoted

    # predictions.csv names each file as it was given: run from inside a class folder
    folder = root / "test" / "+cmd"
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), "--checkpoint", str(ckpt),
                           "--image", "=0+0.png", "=0+1.png", "--out", str(tmp_path / "own"),
                           "--device", "cpu"], cwd=folder, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = csv_rows(tmp_path / "own" / "predictions.csv")
    assert [r[0] for r in rows[1:]] == ["'=0+0.png", "'=0+1.png"]
    for row in rows[1:]:
        assert not row[1].startswith(TRIGGERS) and row[1].startswith("'")
        assert not any(cell.startswith(TRIGGERS) for cell in row)


# ------------------------------------------------------------- where the pictures may go, or not

def test_pictures_never_go_into_a_split_or_an_image_folder(tmp_path):
    """--out inside the data's test/CLASS/, an --image folder as its own --out, and a checkpoint kept
    in test/CLASS/ without --out: one line each, exit 2, nothing written there, and the next run
    still sees the same test images."""
    root = image_folder(tmp_path / "d", ["cat", "dog"])
    before = sorted(p.name for p in (root / "test").rglob("*"))
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), ["cat", "dog"])
    inside = checkpoint(root / "test" / "cat" / "m.pth", folder_config(data_dir=str(root)),
                        ["cat", "dog"])
    cases = [(["--checkpoint", ckpt, "--out", root / "test" / "cat"], "test/"),
             (["--checkpoint", ckpt, "--image", root / "test" / "dog", "--out", root / "test" / "dog"],
              "--image"),
             (["--checkpoint", ckpt, "--image", root / "test" / "dog" / "0.png", "--out",
               root / "test" / "dog"], "--image"),
             (["--checkpoint", inside], "test/")]
    for args, words in cases:
        proc = run_script("test.py", *args, "--device", "cpu")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    inside.unlink()
    assert sorted(p.name for p in (root / "test").rglob("*")) == before


def test_out_naming_the_checkpoint_file_or_a_dangling_link_says_so(tmp_path):
    root = image_folder(tmp_path / "d", ["cat", "dog"])
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), ["cat", "dog"])
    proc = run_script("test.py", "--checkpoint", ckpt, "--out", ckpt, "--device", "cpu")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "--out" in line and str(ckpt) in line and "is a file" in line and "data" not in line
    (tmp_path / "pictures").symlink_to(tmp_path / "nowhere")
    proc = run_script("test.py", "--checkpoint", ckpt, "--out", tmp_path / "pictures", "--device",
                      "cpu")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "pictures" in line and "nowhere" in line and "does not exist" in line


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for whoever runs the test: chmod for a user, the immutable flag for
    root (whom chmod does not stop); skipped, visibly, where neither can be set."""
    made = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
        made.append(folder)
        return folder
    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_a_read_only_output_folder_still_prints_the_report(tmp_path, read_only):
    """The default output folder (the checkpoint's) and --out, each read-only: the report is
    printed, one line says where the pictures could not go, exit 2, and nothing is left there."""
    root = image_folder(tmp_path / "d", ["cat", "dog"])
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), ["cat", "dog"])
    out = tmp_path / "out"
    out.mkdir()
    read_only(out)
    read_only(ckpt.parent)
    for args, folder in (([], ckpt.parent), (["--out", out], out),
                         (["--image", root / "test" / "cat", "--out", out], out)):
        proc = run_script("test.py", "--checkpoint", ckpt, *args, "--device", "cpu")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert ("test accuracy: " in proc.stdout) or ("Predicted:" in proc.stdout)
        line, = proc.stderr.strip().splitlines()
        assert str(folder) in line and "cannot write" in line
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["m.pth"]
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- names and pictures

def test_class_names_the_terminal_cannot_encode_are_escaped(tmp_path):
    root = image_folder(tmp_path / "d", ["café", "thé"])
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), ["café", "thé"])
    for args in ([], ["--image", root / "test" / "café"]):
        proc = run_script("test.py", "--checkpoint", ckpt, *args, "--device", "cpu", "--show-all",
                          env={"PYTHONIOENCODING": "ascii"})
        assert proc.returncode == 0, proc.stderr
        assert "caf\\xe9" in proc.stdout and "Traceback" not in proc.stderr


def test_long_class_names_give_pictures_of_a_usual_size_and_no_warnings(tmp_path):
    """250-character folder names (the most most file systems take): the tables keep them whole,
    the pictures cut them, so neither is wider than a screen and matplotlib says nothing."""
    classes = ["a" * 250, "b" * 250]
    root = image_folder(tmp_path / "d", classes, per_class=6)
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), classes)
    proc = run_script("test.py", "--checkpoint", ckpt, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert not [l for l in proc.stderr.splitlines() if "arning" in l], proc.stderr
    assert "a" * 250 in proc.stdout
    for name in ("confusion.png", "predictions.png", "mistakes.png", "cam.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.width <= 2000 and im.height <= 2000, (name, im.size)


@pytest.mark.quick
def test_the_pictures_show_every_class_and_the_same_images_each_time():
    """A folder's test split is sorted by class: the sample of predictions.png and cam.png takes
    the classes in turn, drawn from the seed, so it is the same on every run."""
    script = load_script("test.py", "test_script_sample")
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    chosen = script.sample_indices(labels, 9, seed=0)
    assert chosen == script.sample_indices(labels, 9, seed=0) == sorted(chosen)
    assert sorted(labels[chosen].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(chosen)) == 9
    assert script.sample_indices(labels, 9, seed=1) != chosen
    assert len(script.sample_indices(labels, 200, seed=0)) == 85


def peak_rss_of(args: list) -> int:
    """Bytes: the peak resident memory of `python test.py ARGS` in a process of its own."""
    code = ("import resource, subprocess, sys\n"
            "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, str(ROOT / "test.py"),
                          *map(str, args)], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout) * 1024


def test_memory_does_not_grow_with_the_pictures_size_beyond_decoding_one(tmp_path):
    """Three 6000 x 6000 pictures (36 megapixels each) against three of 60 x 60, for a folder model
    (cam.png shows the pictures themselves): the peak grows by less than three copies of one
    decoded picture (108 MB in RGB). cam.png used to be drawn from the full-size pictures: 2.5 GB
    more."""
    ckpt = checkpoint(tmp_path / "m.pth", folder_config(), ["cat", "dog"])
    peaks = {}
    for side in (60, 6000):
        folder = tmp_path / f"pictures{side}"
        folder.mkdir()
        for i in range(3):
            picture = Image.new("RGB", (side, side), (30 * i, 200, 90))
            picture.paste((250, 250, 250), (side // 4, side // 4, side // 2, 3 * side // 4))
            picture.save(folder / f"{i}.png")
        peaks[side] = peak_rss_of(["--checkpoint", ckpt, "--image", folder, "--out", tmp_path,
                                   "--device", "cpu"])
    decoded = 6000 * 6000 * 3
    assert peaks[6000] - peaks[60] < 3 * decoded, (peaks, decoded)


def test_predictions_csv_holds_the_probabilities_of_the_classes_it_names(tmp_path):
    """A model whose last layer ignores the image (weight 0, bias = the logits): every image's
    probabilities are softmax(bias), computed here by hand, in the order of the classes."""
    classes = ["ant", "bee", "cow", "dog"]
    logits = [0.5, 2.0, -1.0, 1.25]
    root = image_folder(tmp_path / "d", classes)
    ckpt = checkpoint(tmp_path / "run" / "m.pth", folder_config(data_dir=str(root)), classes,
                      head_bias=logits)
    proc = run_script("test.py", "--checkpoint", ckpt, "--image", root / "test" / "ant",
                      "--top-k", "3", "--out", tmp_path / "out", "--device", "cpu", "--amp", "off")
    assert proc.returncode == 0, proc.stderr
    total = sum(math.exp(v) for v in logits)
    p = {name: math.exp(v) / total for name, v in zip(classes, logits)}
    ranked = sorted(classes, key=lambda name: -p[name])  # bee, dog, ant
    rows = csv_rows(tmp_path / "out" / "predictions.csv")
    assert rows[0] == ["file", "predicted", "probability", "top_3"]
    assert len(rows) == 4
    for row in rows[1:]:
        assert row[1] == "bee" and float(row[2]) == pytest.approx(p["bee"], abs=1e-6)
        top = [re.match(r"(\S+) ([0-9.]+)", part).groups() for part in row[3].split("; ")]
        assert [name for name, _ in top] == ranked[:3]
        assert [float(v) for _, v in top] == pytest.approx([p[n] for n in ranked[:3]], abs=1e-6)


# ------------------------------------------------------------------------------------ 16-bit scans

def test_16_bit_scans_are_scaled_by_their_declared_depth_not_their_content(tmp_path):
    """Two dim 16-bit scans that differ in one pixel (its maximum 300 against 255): both read as the
    file's depth says (v / 257, so nearly black), in training's decoder and in test.py --image, and
    a digit model inverts neither (by their content one read as mean 175 and was inverted)."""
    import folders
    script = load_script("test.py", "test_script_16bit")
    rng = np.random.default_rng(0)
    dim = rng.integers(100, 250, (28, 28)).astype(np.uint16)
    a, b = dim.copy(), dim.copy()
    a[0, 0], b[0, 0] = 300, 255
    for name, scan in (("a.png", a), ("b.png", b), ("a.tif", a)):
        Image.fromarray(scan).save(tmp_path / name)
    expected = np.round(dim / 257)
    for name in ("a.png", "b.png", "a.tif"):
        decoded, why = folders.decode(str(tmp_path / name), (28, 28))  # training's decoder
        assert why is None and np.abs(decoded[..., 0].astype(float) - expected).max() <= 1, name
        x, inverted, _ = script.read_image(tmp_path / name, "mnist", "auto")
        assert not inverted, name
        assert np.abs(x[0].numpy().astype(float) - expected).max() <= 1, name
