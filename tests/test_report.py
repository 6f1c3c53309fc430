"""test.py's report as a user meets it: class names as the checkpoint orders them, names that are no
UTF-8, Ctrl-C, and pictures that are whole or absent."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import net
import plots
import train
from conftest import ROOT, TINY, load_script, make_mnist, run_script


def script():
    return load_script("test.py", "test_script_report")


def config(**more) -> dict:
    return {k.lower(): v for k, v in train.DEFAULTS.items()} | {
        "image_size": 32, "width_div": 16, "device": "cpu"} | more


def untrained_checkpoint(path: Path, c: dict, classes: list[str]) -> Path:
    torch.manual_seed(0)
    model = net.build_model(c, len(classes))
    checkpoints.save({"model": model.state_dict(), "config": c, "classes": classes, "epoch": 1},
                     path)
    return path


def test_class_names_keep_the_checkpoints_order(tmp_path):
    """Fashion-MNIST's classes are not in alphabetical order: each printed actual label is checked
    against the label in the IDX file, named by torchvision's own list."""
    from torchvision.datasets import FashionMNIST
    root = make_mnist(tmp_path / "d", n_train=16, n_test=30, folder="FashionMNIST")
    names = list(FashionMNIST.classes)
    assert names != sorted(names)
    ckpt = untrained_checkpoint(tmp_path / "m.pth", config(dataset="fashion-mnist"), names)
    proc = run_script("test.py", "--checkpoint", ckpt, "--data-dir", root, "--device", "cpu",
                      "--show-all", "--grid", "0", check=True)
    raw = (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()[8:]
    actual = re.findall(r'Actual: "([^"]+)"', proc.stdout)
    assert actual == [names[k] for k in raw]


def test_a_class_folder_name_that_is_not_utf8(tmp_path):
    """caf\\xe9/: the report prints it escaped, and confusion.png and predictions.png are drawn."""
    from PIL import Image
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in (b"caf\xe9", b"tea"):
            folder = os.path.join(os.fsencode(root / split), name)
            os.makedirs(folder)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    os.path.join(folder, b"%d.png" % i))
    save = tmp_path / "s"
    run_script("train.py", *TINY, "--dataset", "folder", "--data-dir", root, "--save-dir", save,
               "--workers", "0", "--val-fraction", "0", check=True)
    proc = run_script("test.py", "--checkpoint", save / "best.pth", "--device", "cpu",
                      env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert "caf\\xe9" in proc.stdout and "Traceback" not in proc.stderr
    assert (save / "confusion.png").stat().st_size and (save / "predictions.png").stat().st_size


@pytest.mark.quick
def test_a_picture_cut_short_leaves_no_file(tmp_path):
    from matplotlib.figure import Figure
    fig = Figure()
    fig.subplots().plot([1, 2])

    def interrupted(path, *a, **k):
        Path(path).write_bytes(b"half a png")
        raise KeyboardInterrupt
    fig.savefig = interrupted
    with pytest.raises(KeyboardInterrupt):
        plots.save_figure(fig, tmp_path / "cam.png")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_test_script_is_one_line(tmp_path):
    """A slow evaluation (a 1/4-width VGG16 at 224 px), interrupted once its header is printed."""
    root = make_mnist(tmp_path / "d", n_train=16, n_test=2000)
    c = config(image_size=224, width_div=4)
    ckpt = untrained_checkpoint(tmp_path / "m.pth", c, [str(k) for k in range(10)])
    proc = subprocess.Popen([sys.executable, str(ROOT / "test.py"), "--checkpoint", str(ckpt),
                             "--data-dir", str(root), "--device", "cpu", "--batch-size", "8"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    header = proc.stdout.readline()
    assert "VGG16" in header, proc.stderr.read()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "Ctrl-C" in err
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png" or ".tmp" in p.name]


def test_ctrl_c_that_lands_in_a_callback_still_stops_test_script(tmp_path):
    """Python cannot raise from a weakref callback or __del__: a Ctrl-C that arrives while one runs
    is printed as "Exception ignored" and lost, and the script went on to exit 0 (a real Ctrl-C in
    test.py's report did, at random). Here the callback raises it as the first picture is drawn."""
    root = make_mnist(tmp_path / "d", n_train=16, n_test=16)
    ckpt = untrained_checkpoint(tmp_path / "m.pth", config(), [str(k) for k in range(10)])
    lands_in_a_callback = f"""
import runpy, sys, weakref
sys.path.insert(0, {str(ROOT)!r})
import plots
def draw_confusion(*args, **kwargs):
    class Thing:
        pass
    def callback(ref):
        raise KeyboardInterrupt
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing  # the callback runs here, and Python ignores what it raises
    plots.draw_confusion_unpatched(*args, **kwargs)
plots.draw_confusion_unpatched, plots.draw_confusion = plots.draw_confusion, draw_confusion
sys.argv = ["test.py", "--checkpoint", {str(ckpt)!r}, "--data-dir", {str(root)!r}, "--device", "cpu"]
runpy.run_path({str(ROOT / "test.py")!r}, run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", lands_in_a_callback], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "test.py: stopped by Ctrl-C\n"
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png" or ".tmp" in p.name]
