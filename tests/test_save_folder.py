"""The save folder: a full disk or a file-size limit while saving, --overwrite, a busy or damaged
folder, metrics.csv, output that nobody reads."""

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

import checkpoints
import cli
import train
from conftest import ROOT, TINY, csv_rows, load, make_folder
from runs import digests, popen, call, one_line, error_lines


# ----------------------------------------------------------------------------------------- disk full

def test_full_disk_while_saving_keeps_the_previous_checkpoint(saved, monkeypatch):
    """ENOSPC in the middle of writing: a clear message, the old file intact, no temporary file left."""
    path = saved / "last.pth"
    before = path.read_bytes()

    def half_then_full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(cli.UserError, match="the disk is full; the previous checkpoint is unchanged"):
        checkpoints.save({"model": {}}, path)
    assert path.read_bytes() == before
    assert not list(saved.glob(".*tmp*"))


def test_file_size_limit_reached_while_training_saves(saved, data):
    """A real train.py whose writes fail part-way (RLIMIT_FSIZE, as on a nearly full disk):
    it stops with one line, exit 2, and last.pth is the previous one, byte for byte."""
    last = saved / "last.pth"
    before = last.read_bytes()
    limit = len(before) // 2

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "--epochs", "2", "--data-dir",
                           str(data), "--save-dir", str(saved)], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limit_writes, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "could not write" in error[0] and "the previous checkpoint is unchanged" in error[0]
    assert last.read_bytes() == before
    assert not list(saved.glob(".*tmp*"))


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved(saved, small, capsys):
    """--overwrite with a run that fails after every start-up check (here: it diverges in its first epoch)
    leaves the old run whole; a run that gets to its first save then replaces every old file."""
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, "--data-dir", small, *TINY,
                                             "--lr", "1e30"], capsys)
    assert code == 3 and "the loss became NaN or infinite" in one_line(error_lines(err)[0])
    assert digests(saved) == before
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, "--data-dir", small, *TINY,
                                             "--seed", "7"], capsys)
    assert code == 0, err
    assert load(saved / "last.pth")["config"]["seed"] == 7
    assert load(saved / "best.pth")["config"]["seed"] == 7
    assert len(csv_rows(saved / "metrics.csv")) == 2  # the header and the new run's epoch 1
    assert sorted(p.name for p in saved.iterdir() if p.name != ".lock") == [
        "best.pth", "curves.png", "epoch_001.pth", "last.pth", "metrics.csv"]


@pytest.mark.parametrize("kept", ["best.pth", "epoch_001.pth", "metrics.csv"])
def test_any_file_of_a_previous_run_blocks_a_fresh_run(kept, saved, data, capsys):
    for p in saved.iterdir():
        if p.name != kept:
            p.unlink()
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--save-dir", saved, "--data-dir", data, *TINY], capsys)
    assert code == 2 and f"already holds a run ({kept})" in one_line(err) and "--overwrite" in err
    assert digests(saved) == before


def test_a_second_run_on_a_busy_save_folder_is_refused_and_harms_nothing(small, tmp_path, capsys):
    """Two runs on one folder: the second, whatever it asks for, gets one line naming the first's pid,
    and the first finishes as if alone."""
    first = popen(*TINY, "--epochs", "2", "--data-dir", small, "--save-dir", tmp_path)
    assert first.stdout.readline().startswith("VGG16")  # data and model ready: well past taking the folder
    for args in ([*TINY, "--data-dir", small], ["--resume", "--epochs", "5"], [*TINY, "--overwrite"]):
        code, err = call(train.run, "train.py", ["--save-dir", tmp_path, *args], capsys)
        assert code == 2 and f"is in use by another train.py (pid {first.pid})" in one_line(err), args
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = csv_rows(tmp_path / "metrics.csv")
    assert [r[0] for r in rows[1:]] == ["1", "2"]


def test_resume_with_other_class_names_is_refused(tmp_path, capsys):
    first = make_folder(tmp_path / "a", n_train=6, n_test=3)
    other = make_folder(tmp_path / "b", n_train=6, n_test=3, classes=("ant", "bee", "fly"))
    save = tmp_path / "save"
    run = [*TINY, "--dataset", "folder", "--workers", "0", "--batch-size", "4"]
    code, err = call(train.run, "train.py", [*run, "--data-dir", first, "--save-dir", save], capsys)
    assert code == 0, err
    before = digests(save)
    code, err = call(train.run, "train.py", ["--resume", "--epochs", "2", "--data-dir", other,
                                             "--save-dir", save], capsys)
    assert code == 2 and "has classes ['ant', 'bee', 'fly'], but" in one_line(err) and "'cat'" in err
    assert digests(save) == before


DAMAGED_METRICS = {
    "garbage-line": b"epoch,train_loss\n1,0.5\n\x00\x00garbage,,,\n",
    "not-utf8": b"epoch,train_loss\n1,0.5\n\xff\xfe\xfa\n",
    "extra-column": None,  # the real header with one more column
}


@pytest.mark.parametrize("kind", DAMAGED_METRICS)
def test_damaged_metrics_is_set_aside_and_resume_goes_on(kind, saved, data, capsys):
    path = saved / "metrics.csv"
    good = path.read_text()
    header, row = good.splitlines()[:2]
    damaged = DAMAGED_METRICS[kind] or f"{header},note\n{row},x\n".encode()
    path.write_bytes(damaged)
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 0, err
    warning = one_line(err)
    assert warning.startswith("warning: ") and "metrics.csv.damaged" in warning
    assert (saved / "metrics.csv.damaged").read_bytes() == damaged
    # New rows are written under the right header, never appended to the damaged file.
    checkpoints.append_metrics(path, {"epoch": 2, "test_acc": "0.5"})
    assert csv_rows(path) == [["epoch", "test_acc"], ["2", "0.5"]]


@pytest.mark.quick
def test_metrics_with_another_header_is_set_aside_when_appending(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,test_acc,note\n1,0.4,x\n")
    checkpoints.append_metrics(path, {"epoch": 2, "test_acc": "0.5"})
    assert csv_rows(path) == [["epoch", "test_acc"], ["2", "0.5"]]
    assert (tmp_path / "metrics.csv.damaged").read_text() == "epoch,test_acc,note\n1,0.4,x\n"
    assert "metrics.csv.damaged" in one_line(capsys.readouterr().err)


def test_full_disk_at_the_metrics_write_keeps_the_epoch_and_leaves_nothing_half_written(
        saved, small, monkeypatch, capsys):
    """ENOSPC when metrics.csv is written at the end of an epoch: the epoch's checkpoints are already on
    disk, the error is one line, and no empty or half-written metrics.csv remains."""
    import builtins
    real_open = builtins.open
    metrics = saved / "metrics.csv"
    metrics.unlink()  # as after a crash that lost it; the run itself is resumed

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if "metrics.csv" in str(file) and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(builtins, "open", open_full)
    code, err = call(train.run, "train.py", ["--resume", "--epochs", "2", "--save-dir", saved,
                                             "--data-dir", small], capsys)  # same classes, 2 steps
    monkeypatch.undo()
    assert code == 2 and "the disk is full" in one_line(error_lines(err)[0]) and "metrics.csv" in err
    assert load(saved / "epoch_002.pth")["epoch"] == 2  # the epoch's weights were written first
    assert not metrics.exists() and not list(saved.glob(".*tmp*"))


def test_a_checkpoint_that_cannot_be_written_whole_is_one_line_and_leaves_nothing_behind(
        saved, small):
    """The file system refuses to let the checkpoint grow (a size limit on the process, as a full
    disk does once it fills): at 8 KB torch's zip writer fails with a RuntimeError of its own
    ("unexpected pos"), which used to leave a traceback and the temporary file. One line, exit 2,
    no temporary file left, the earlier files intact, and --resume then goes on."""
    def limit():  # for the child only: files of at most 8 KB, and the signal for more ignored
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    before = digests(saved)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "--epochs", "2",
                           "--save-dir", str(saved), "--data-dir", str(small)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = one_line(error_lines(proc.stderr)[0])
    assert "could not write" in line and "epoch_002.pth" in line and "unchanged" in line
    assert not list(saved.glob(".*tmp*"))
    assert digests(saved) == before
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "--epochs", "2",
                           "--save-dir", str(saved), "--data-dir", str(small)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load(saved / "last.pth")["epoch"] == 2


def test_a_save_folder_that_is_a_dangling_link_or_a_file_is_one_line(small, tmp_path, capsys):
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "nowhere")
    code, err = call(train.run, "train.py", [*TINY, "--data-dir", small, "--save-dir", link], capsys)
    line = one_line(error_lines(err)[0])
    assert code == 2 and str(link) in line and "nowhere" in line and "File exists" not in line
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "notes.txt").write_text("mine")
    code, err = call(train.run, "train.py", [*TINY, "--data-dir", small, "--save-dir",
                                             tmp_path / "notes.txt"], capsys)
    line = one_line(error_lines(err)[0])
    assert code == 2 and "notes.txt" in line and "not a folder" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("sink", ["closed-pipe", "dev-full"])
def test_training_survives_output_nobody_reads(sink, small, tmp_path):
    """python train.py | head -1 (stdout), or > /dev/full 2>&1 (stdout and the progress bar on stderr):
    the run still finishes, with no traceback."""
    full = open("/dev/full", "w")
    out, err = (subprocess.PIPE, subprocess.PIPE) if sink == "closed-pipe" else (full, full)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--epochs", "2", "--data-dir",
                             small, "--save-dir", tmp_path], cwd=ROOT, stdout=out, stderr=err, text=True)
    full.close()
    if sink == "closed-pipe":
        proc.stdout.close()  # the reader has gone before the first line
    err = proc.communicate(timeout=300)[1] or ""
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert load(tmp_path / "last.pth")["epoch"] == 2


