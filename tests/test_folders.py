"""What a folder dataset is made of: which names are classes and images, and what is never one.

Each test builds a small folder of real PNG/GIF files and loads it through imagedata's real code.
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import folders
import imagedata
from conftest import make_folder

pytestmark = pytest.mark.quick
CPU = torch.device("cpu")


def config(root: Path, **more) -> dict:
    return {"dataset": "folder", "data_dir": str(root), "image_size": 32, "workers": 0,
            "skip_bad_images": False, "val_fraction": 0.0, "seed": 0} | more


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO that is opened blocks until someone writes to it)."""
    def timeout(*_):
        raise AssertionError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def root(tmp_path) -> Path:
    return make_folder(tmp_path / "data", n_train=12, n_test=6, classes=("cat", "dog"))


def png(path: Path, fmt: str = "PNG") -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(path, format=fmt)


def test_hidden_folders_and_files_are_neither_classes_nor_images(root):
    for split in ("train", "test"):
        png(root / split / ".ipynb_checkpoints" / "cat-checkpoint.png")
        png(root / split / "cat" / ".ipynb_checkpoints" / "x.png")
        png(root / split / "cat" / ".hidden.png")
    train = imagedata.load_split(config(root), True, CPU)
    test = imagedata.load_split(config(root), False, CPU, classes=train.classes)
    assert train.classes == ["cat", "dog"] and len(train) == 12 and len(test) == 6


def test_gif_files_are_images(root):
    png(root / "train" / "cat" / "moving.gif", "GIF")
    assert len(imagedata.load_split(config(root), True, CPU)) == 13


def test_a_fifo_in_a_class_folder_is_one_line_not_a_hang(root):
    os.mkfifo(root / "train" / "cat" / "x.png")
    with deadline(60), pytest.raises(cli.UserError) as e:
        imagedata.load_split(config(root), True, CPU)
    assert "x.png" in str(e.value) and "not a regular file" in str(e.value)
    with deadline(60):  # or left out, as any unreadable image
        assert len(imagedata.load_split(config(root, skip_bad_images=True), True, CPU)) == 12


def test_a_link_back_up_is_not_followed_twice(root):
    (root / "train" / "cat" / "up").symlink_to("..")
    (root / "train" / "dog" / "loop").symlink_to(".")
    data = imagedata.load_split(config(root), True, CPU)
    assert len(data) == 12 and data.classes == ["cat", "dog"]


def test_links_to_other_folders_are_followed(root, tmp_path):
    png(tmp_path / "elsewhere" / "far.png")
    (root / "train" / "cat" / "more").symlink_to(tmp_path / "elsewhere")
    assert len(imagedata.load_split(config(root), True, CPU)) == 13


def test_the_streamed_path_lists_the_same_files(root, monkeypatch):
    png(root / "train" / ".ipynb_checkpoints" / "a.png")
    png(root / "train" / "cat" / "moving.gif", "GIF")
    (root / "train" / "cat" / "up").symlink_to("..")
    memory = imagedata.load_split(config(root), True, CPU)
    monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.0)
    data = imagedata.load_split(config(root), True, CPU)
    assert type(data) is imagedata.StreamedImages
    assert data.classes == ["cat", "dog"] and len(data) == 13 and data.paths == memory.paths


def test_own_images_skip_hidden_names_and_report_a_fifo(tmp_path):
    from conftest import load_script
    module = load_script("test.py", "test_script_folders")
    png(tmp_path / "photos" / "a.png")
    png(tmp_path / "photos" / ".ipynb_checkpoints" / "a-checkpoint.png")
    png(tmp_path / "photos" / "._a.png")
    os.mkfifo(tmp_path / "photos" / "pipe.png")
    reported = []
    with deadline(60):
        found = module.find_images([str(tmp_path / "photos")], reported.append)
    assert found == [tmp_path / "photos" / "a.png"]
    assert len(reported) == 1 and "pipe.png" in reported[0]


def test_one_image_per_class_with_a_validation_split_warns(tmp_path, capsys):
    for k in ("a", "b", "c"):
        png(tmp_path / "d" / "train" / k / "1.png")
        png(tmp_path / "d" / "test" / k / "1.png")
    imagedata.load_train_val(config(tmp_path / "d", val_fraction=0.5), CPU)
    err = capsys.readouterr().err
    assert "warning" in err and "no training images" in err, err


@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_a_folder_run_survives_output_nobody_reads(script, root, tmp_path):
    """python train.py ... | head -1 on a folder dataset: the decode's line on stdout used to raise
    BrokenPipeError, reported as an unreadable image. The run goes on, and test.py still writes its
    pictures."""
    import subprocess
    from conftest import ROOT, TINY, run_script
    save = tmp_path / "save"
    if script == "test.py":
        run_script("train.py", *TINY, "--dataset", "folder", "--data-dir", root, "--save-dir", save,
                   "--workers", "0", check=True)
        args = ["--checkpoint", save / "best.pth", "--device", "cpu", "--show-all"]
    else:
        args = [*TINY, "--dataset", "folder", "--data-dir", root, "--save-dir", save, "--workers", "0"]
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader has gone before the first line
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err, err
    if script == "train.py":
        assert torch.load(save / "last.pth", weights_only=True)["epoch"] == 1
    else:
        assert (save / "confusion.png").stat().st_size > 0
        assert (save / "predictions.png").stat().st_size > 0


def test_a_save_folder_inside_the_data_is_refused_before_it_is_created(root, tmp_path, capsys,
                                                                         monkeypatch):
    from conftest import TINY, run_train_in_process
    for inside in ("train/runs", "test/x/y"):
        with pytest.raises(SystemExit) as e:
            run_train_in_process(monkeypatch, *TINY, "--dataset", "folder", "--data-dir", root,
                                 "--save-dir", root / inside)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "--save-dir" in err, err
        assert not (root / inside.split("/")[0] / inside.split("/")[1]).exists()
    # and a later run on the same data is not broken by it
    assert imagedata.load_split(config(root), True, CPU).classes == ["cat", "dog"]


def test_in_memory_or_streamed_a_folder_trains_the_same_and_resumes_across_the_two(tmp_path,
                                                                                  monkeypatch):
    """Decoded into memory at the start, or streamed by DataLoader workers on a machine with less
    free memory: one augmentation code, one random stream, so the same weights come out. Two epochs
    streamed equal two in memory, and one epoch in memory resumed streamed equals both."""
    from conftest import TINY, load, run_train_in_process, weight_differences
    root = make_folder(tmp_path / "data", n_train=24, n_test=6, classes=("cat", "dog"))
    run = [*TINY, "--dataset", "folder", "--data-dir", root, "--workers", "1", "--batch-size", "8",
           "--schedule", "constant", "--val-fraction", "0"]
    run_train_in_process(monkeypatch, *run, "--epochs", "2", "--save-dir", tmp_path / "memory")
    run_train_in_process(monkeypatch, *run, "--epochs", "1", "--save-dir", tmp_path / "split")
    monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.0)  # now it is streamed
    run_train_in_process(monkeypatch, *run, "--epochs", "2", "--save-dir", tmp_path / "streamed")
    run_train_in_process(monkeypatch, *run, "--resume", "--epochs", "2",
                         "--save-dir", tmp_path / "split")
    memory = load(tmp_path / "memory" / "last.pth")["model"]
    assert not weight_differences(load(tmp_path / "streamed" / "last.pth")["model"], memory)
    assert not weight_differences(load(tmp_path / "split" / "last.pth")["model"], memory)


def test_listing_many_classes_resolves_each_folder_a_few_times_not_once_per_class(tmp_path, monkeypatch):
    """A split of 1,000 class folders (ImageNet's count) is listed in time linear in the classes:
    each class folder's real path is looked up a few times, not once for every other class too
    (that was a million lookups: 50 s of a 1,000-class test.py run on a 2-core CPU)."""
    classes = [f"c{i:03d}" for i in range(1000)]
    for name in classes:
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").touch()
    calls = 0
    real_resolve = Path.resolve

    def counted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return real_resolve(self, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", counted)
    names, samples = folders.list_images(tmp_path)
    assert names == classes and [k for _, k in samples] == list(range(1000))
    assert calls <= 5 * len(classes), calls


def test_an_image_is_never_in_two_splits_whatever_links_lead_there(root, capsys):
    """A link inside train/ that leads up and into test/ (`ln -s ../.. train/cat/up`), a link to one
    test image, and a file linked twice inside train/: training leaves out every file test/ holds,
    and takes each file once; a warning counts what was left out."""
    (root / "train" / "cat" / "up").symlink_to("../..")
    test_file = next((root / "test" / "dog").iterdir())
    (root / "train" / "dog" / "copy.png").symlink_to(test_file)
    first = sorted((root / "train" / "cat").glob("*.png"))[0]
    (root / "train" / "cat" / "twice.png").symlink_to(first)
    train, _ = imagedata.load_train_val(config(root), CPU)
    test = imagedata.load_split(config(root), False, CPU, classes=train.classes)
    real = lambda data: [os.path.realpath(data.name(i)) for i in range(len(data))]  # noqa: E731
    assert not set(real(train)) & set(real(test))
    assert len(real(train)) == len(set(real(train))) == 12  # the 12 images of train/, once each
    err = capsys.readouterr().err
    line, = [l for l in err.splitlines() if l.startswith("warning")]
    assert "left out" in line and "7 that another split holds" in line and "1 linked twice" in line


def test_a_validation_folder_may_lack_a_class_and_keeps_the_training_numbers(root, capsys):
    """val/ and test/ without "cat": their "dog" images keep label 1 of the training list, and a
    class that training has not got is one line."""
    for split in ("val", "test"):
        for i in range(3):
            png(root / split / "dog" / f"{i}.png")
    import shutil
    shutil.rmtree(root / "test" / "cat")
    train, val = imagedata.load_train_val(config(root), CPU)
    test = imagedata.load_split(config(root), False, CPU, classes=train.classes)
    assert train.classes == ["cat", "dog"]
    assert val.labels.tolist() == [1, 1, 1] and test.labels.tolist() == [1, 1, 1, 1, 1, 1]
    png(root / "val" / "emu" / "0.png")
    with pytest.raises(cli.UserError, match="emu"):
        imagedata.load_train_val(config(root), CPU)


def test_a_run_begun_under_utf8_goes_on_under_another_file_system_encoding(tmp_path):
    """Class folders named in UTF-8 ("café", "naïve"), a run of one epoch, then --resume and test.py
    under the C locale without UTF-8 (Python's file-system encoding is then ASCII, and each
    non-ASCII byte comes back as a lone surrogate): the classes are the same names, not two
    spellings of them."""
    from conftest import TINY, load, run_script
    root = make_folder(tmp_path / "d", n_train=8, n_test=4, classes=("café", "naïve"))
    save = tmp_path / "save"
    run_script("train.py", *TINY, "--dataset", "folder", "--data-dir", root, "--workers", "0",
               "--val-fraction", "0", "--save-dir", save, check=True)
    ascii_env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                 "PYTHONIOENCODING": "ascii:backslashreplace"}
    proc = run_script("train.py", "--resume", "--epochs", "2", "--save-dir", save,
                      env=ascii_env)
    assert proc.returncode == 0, proc.stderr
    assert load(save / "last.pth")["classes"] == ["café", "naïve"]
    proc = run_script("test.py", "--checkpoint", save / "best.pth", "--device", "cpu",
                      env=ascii_env)
    assert proc.returncode == 0 and "test accuracy: " in proc.stdout, proc.stderr
