"""The checkpoint format: every file names its version, an older file is upgraded in one place, a newer
one is refused with one line."""

import pytest
import torch

import checkpoints
import net
from conftest import make_mnist, run_train_in_process
from errors import UserError


def test_every_file_a_run_writes_names_the_format_and_a_newer_one_is_refused(tmp_path, monkeypatch,
                                                                               capsys):
    root = make_mnist(tmp_path / "d", n_train=64, n_test=16)
    args = ["--data-dir", root, "--image-size", "32", "--width-div", "16", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--workers", "0", "--save-dir", tmp_path / "s"]
    run_train_in_process(monkeypatch, *args)
    for name in ("last.pth", "best.pth", "epoch_001.pth"):
        raw = torch.load(tmp_path / "s" / name, weights_only=True)
        assert raw["format"] == checkpoints.FORMAT, name
    last = checkpoints.last_path(tmp_path / "s")
    raw = torch.load(last, weights_only=True)
    raw["format"] = checkpoints.FORMAT + 1
    torch.save(raw, last)
    before = last.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train_in_process(monkeypatch, *args[:-6], "--epochs", "2", "--resume",
                             "--save-dir", tmp_path / "s", "--device", "cpu")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format" in err[0] and "newer" in err[0]
    assert last.read_bytes() == before


def test_a_checkpoint_from_before_the_format_key_gets_its_run_s_values(tmp_path):
    """Format 1: what files from before each later setting lacked gets the value those runs had."""
    c = {"dataset": "mnist", "depth": 16, "batch_norm": True, "dropout": 0.5, "width_div": 16,
         "image_size": 32, "seed": 0}
    model = net.build_model(c, 10)
    checkpoints.save({"model": model.state_dict(), "config": dict(c), "classes": list("0123456789"),
                      "epoch": 1, "optimizer": {}, "step": 0}, tmp_path / "old.pth")
    ckpt = checkpoints.load(tmp_path / "old.pth")
    assert ckpt["format"] == checkpoints.FORMAT
    assert ckpt["config"] | c == ckpt["config"]  # nothing it had is changed
    assert (ckpt["config"]["val_fraction"], ckpt["config"]["tta"], ckpt["config"]["pretrained"],
            ckpt["config"]["label_smoothing"], ckpt["config"]["normalize"]) == (0.0, False, None,
                                                                                0.0, None)
    assert (ckpt["world"], ckpt["best_acc"]) == (1, 0.0) and "folder_in_memory" not in ckpt
    assert (ckpt["config"]["ema_decay"], ckpt["config"]["nesterov"], ckpt["ema"],
            ckpt["config"]["shift"]) == (0.0, False, None, 4)


@pytest.mark.parametrize("version", ["2", 99, None])
def test_a_format_this_code_cannot_read_is_one_line(tmp_path, version):
    checkpoints.save({"model": {}, "config": {}, "classes": [], "format": version},
                     tmp_path / "x.pth")
    with pytest.raises(UserError, match="format"):
        checkpoints.load(tmp_path / "x.pth")


def as_format_6(ckpt: dict, **config) -> dict:
    """A checkpoint of this code as the code of format 6 wrote it: its key for how a folder was
    read, and the settings that code had (CUTOUT, SMALL_MAP_LR, STEP_EPOCHS, STEP_GAMMA) at their
    defaults unless given."""
    old = dict(ckpt, format=6, config=dict(ckpt["config"], cutout=0.0, small_map_lr=False,
                                           step_epochs=30, step_gamma=0.1) | config)
    if "optimizer" in ckpt:
        old["folder_in_memory"] = None
    return old


@pytest.fixture(scope="module")
def format_6_run(tmp_path_factory):
    """A 1-epoch run rewritten in format 6: last.pth, best.pth and epoch_001.pth."""
    from conftest import TINY, run_script
    tmp = tmp_path_factory.mktemp("format6")
    data = make_mnist(tmp / "d", n_train=64, n_test=16)
    run_script("train.py", *TINY, "--data-dir", data, "--save-dir", tmp / "s", check=True)
    for name in ("last.pth", "best.pth", "epoch_001.pth"):
        path = tmp / "s" / name
        checkpoints.save(as_format_6(torch.load(path, weights_only=True)), path)
    return data, tmp / "s"


def test_a_format_6_run_tests_and_resumes(format_6_run, tmp_path):
    import shutil
    from conftest import run_script
    data, save = format_6_run
    shutil.copytree(save, tmp_path / "s")
    proc = run_script("test.py", "--checkpoint", tmp_path / "s" / "best.pth", "--device", "cpu",
                      check=True)
    assert "test accuracy: " in proc.stdout
    run_script("train.py", "--resume", "--epochs", "2", "--save-dir", tmp_path / "s", check=True)
    last = torch.load(tmp_path / "s" / "last.pth", weights_only=True)
    assert last["format"] == checkpoints.FORMAT and last["epoch"] == 2
    assert "folder_in_memory" not in last and "cutout" not in last["config"]


def test_a_run_that_used_a_removed_setting_tests_but_does_not_resume(format_6_run, tmp_path,
                                                                     capsys):
    """CUTOUT, SMALL_MAP_LR and the step schedule's STEP_EPOCHS, each stored with a value that
    changed the run: test.py still tests its best.pth; --resume is one line naming the setting,
    and last.pth is left as it was."""
    import shutil
    import train
    from conftest import run_script
    from runs import call, one_line
    data, save = format_6_run
    for setting, value in (("cutout", 0.5), ("small_map_lr", True), ("step_epochs", 1)):
        folder = tmp_path / setting
        shutil.copytree(save, folder)
        for name in ("last.pth", "best.pth"):
            ckpt = torch.load(folder / name, weights_only=True)
            checkpoints.save(dict(ckpt, config=dict(ckpt["config"], **{setting: value})),
                             folder / name)
        before = (folder / "last.pth").read_bytes()
        code, err = call(train.run, "train.py", ["--resume", "--epochs", "2", "--save-dir",
                                                 folder], capsys)
        line = one_line(err)
        assert code == 2 and setting.upper() in line and "no longer has" in line and "test" in line
        assert (folder / "last.pth").read_bytes() == before
    proc = run_script("test.py", "--checkpoint", folder / "best.pth", "--device", "cpu",
                      check=True)
    assert "test accuracy: " in proc.stdout
