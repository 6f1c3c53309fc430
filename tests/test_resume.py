"""Never lose a training run: exact resume after Ctrl-C, SIGTERM, SIGHUP, SIGUSR1 and kill -9, and
the stop on a loss that is no longer finite. The runs use a 1,024-image MNIST and a 1/16-width VGG16 at
32 px (32 steps an epoch), so each takes seconds."""

import signal
from pathlib import Path

import pytest
import torch

import checkpoints
from conftest import TINY, csv_rows, load, make_folder, run_script, weight_differences
from runs import popen, wait_for


# Two epochs at a constant rate: a run of 1 epoch extended by --resume --epochs 2 follows the same
# learning rates as a straight 2-epoch run (a cosine schedule's shape depends on the number of epochs).
RUN = [*TINY, "--epochs", "2", "--schedule", "constant"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The reference: 2 epochs without interruption."""
    save = tmp_path_factory.mktemp("straight")
    run_script("train.py", *RUN, "--data-dir", data, "--save-dir", save, check=True)
    return load(save / "last.pth")


# ------------------------------------------------------------------------------------ exact resume

def test_one_epoch_then_resume_equals_two_straight_and_reports_changed_settings(data, straight, tmp_path):
    run_script("train.py", *RUN, "--epochs", "1", "--data-dir", data, "--save-dir", tmp_path, check=True)
    proc = run_script("train.py", "--resume", "--epochs", "2", "--lr", "0.5", "--keep", "1", "--data-dir", data,
                      "--save-dir", tmp_path, check=True)
    # A changed hyperparameter is named, with the value that is used: the stored one, so the run goes on as it began.
    assert "resume: --lr 0.5 differs from the checkpoint's 0.05: using the checkpoint's 0.05" in proc.stdout
    # A run-time setting follows the command line.
    assert "resume: --keep 1 differs from the checkpoint's 3: using this value" in proc.stdout
    assert "epoch 2/2: train loss" in proc.stdout and "epoch 1/2: train loss" not in proc.stdout
    resumed = load(tmp_path / "last.pth")
    assert resumed["epoch"] == 2 and resumed["config"]["lr"] == 0.05
    assert not weight_differences(resumed["model"], straight["model"])  # bitwise
    assert resumed["optimizer"]["state"].keys() == straight["optimizer"]["state"].keys()
    for i, s in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
    assert resumed["scheduler"] == straight["scheduler"]
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pth")) == ["epoch_002.pth"]  # --keep 1 was used


def test_sigterm_mid_epoch_saves_and_resume_is_exact(data, straight, tmp_path):
    proc = popen(*RUN, "--data-dir", data, "--save-dir", tmp_path)
    wait_for(lambda: (tmp_path / "epoch_001.pth").exists(), proc)
    proc.send_signal(signal.SIGTERM)  # epoch 2 has just begun
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at epoch 2, step" in err and "python train.py --resume" in err
    assert "Traceback" not in err
    stopped = load(tmp_path / "last.pth")
    assert stopped["epoch"] == 1 and 0 < stopped["step"] < 32  # inside epoch 2, not at its start or end

    proc = run_script("train.py", "--resume", "--data-dir", data, "--save-dir", tmp_path, check=True)
    assert f"resumed {tmp_path / 'last.pth'}: epoch 2, step {stopped['step']}" in proc.stdout
    assert not weight_differences(load(tmp_path / "last.pth")["model"], straight["model"])
    # the epoch's loss and accuracy are summed over the whole split, across the interruption
    rows = csv_rows(tmp_path / "metrics.csv")
    assert [r[0] for r in rows[1:]] == ["1", "2"]


def test_own_image_folders_with_augmentation_resume_exactly(tmp_path):
    """The folder dataset: DataLoader workers and random crops/flips (on by default for folders).
    SIGTERM inside epoch 2, then --resume, gives the weights of an uninterrupted run."""
    folder = make_folder(tmp_path / "data", n_train=192, n_test=30)
    run = [*RUN, "--dataset", "folder", "--batch-size", "16", "--workers", "2", "--data-dir", folder]
    run_script("train.py", *run, "--save-dir", tmp_path / "straight", check=True)
    save = tmp_path / "stopped"
    proc = popen(*run, "--save-dir", save)
    wait_for(lambda: (save / "epoch_001.pth").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 0 < load(save / "last.pth")["step"] < 12
    run_script("train.py", "--resume", "--data-dir", folder, "--save-dir", save, check=True)
    assert not weight_differences(load(save / "last.pth")["model"], load(tmp_path / "straight" / "last.pth")["model"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGUSR1],
                         ids=["ctrl-c", "hangup", "usr1"])
def test_ctrl_c_hangup_and_usr1_are_handled_like_sigterm(signum, data, tmp_path):
    """Ctrl-C, a closed terminal (SIGHUP) and a scheduler's warning (SIGUSR1) save and stop; the line
    names the command that continues this run, its --save-dir included."""
    proc = popen(*RUN, "--data-dir", data, "--save-dir", tmp_path)
    wait_for(lambda: (tmp_path / "epoch_001.pth").exists(), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert f"python train.py --resume --save-dir {tmp_path}" in err
    assert load(tmp_path / "last.pth")["step"] > 0


def test_kill_9_at_several_moments_then_resume_is_exact(data, straight, tmp_path):
    """SIGKILL during a save inside epoch 1, right when epoch 1's files are being written, and at an
    arbitrary moment of epoch 2; after each, last.pth loads and --resume continues from it."""
    often = ["--save-every-minutes", "0.0001"]  # last.pth after (nearly) every step
    during_save = lambda: (tmp_path / "last.pth").exists() and any(tmp_path.glob(".last.pth.tmp*"))  # noqa: E731
    end_of_epoch_1 = lambda: (tmp_path / "epoch_001.pth").exists()  # noqa: E731
    inside_epoch_2 = lambda: end_of_epoch_1() and load_ok(tmp_path)["epoch"] == 1 and load_ok(tmp_path)["step"] >= 5  # noqa: E731
    caught_in_save = False
    started = False
    for name, moment in [("during a save", during_save)] * 5 + [("end of epoch 1", end_of_epoch_1),
                                                                  ("inside epoch 2", inside_epoch_2)]:
        if name == "during a save" and caught_in_save:
            continue  # the signal can land just after the rename: try again until it lands inside a save
        proc = popen(*(["--resume", *often] if started else [*RUN, *often]), "--data-dir", data,
                     "--save-dir", tmp_path)
        wait_for(moment, proc)
        proc.kill()
        proc.communicate()
        started = True
        assert proc.returncode == -signal.SIGKILL, name
        if name == "during a save":
            caught_in_save = any(tmp_path.glob(".last.pth.tmp*"))  # a temporary file that never became last.pth
        ckpt = checkpoints.load(tmp_path / "last.pth")  # never half-written
        assert "optimizer" in ckpt, name
    assert caught_in_save, "no kill landed during a save in 5 tries"

    proc = run_script("train.py", "--resume", "--data-dir", data, "--save-dir", tmp_path, check=True)
    assert "done: best.pth has the best validation accuracy" in proc.stdout
    assert not list(tmp_path.glob(".*.tmp*"))  # leftovers of killed saves are cleaned up
    assert not weight_differences(load(tmp_path / "last.pth")["model"], straight["model"])
    rows = csv_rows(tmp_path / "metrics.csv")
    assert [r[0] for r in rows[1:]] == ["1", "2"]  # no epoch counted twice


def load_ok(folder: Path) -> dict:
    try:
        return load(folder / "last.pth")
    except Exception:  # being replaced right now: look again at the next poll
        return {"epoch": -1, "step": -1}


# --------------------------------------------------------------------------------------- divergence

def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(data, tmp_path):
    # Epoch 1 trains normally; its last.pth is given a rate of 1e30 for the epochs to come (as a
    # schedule gone wrong would), so the loss of epoch 2 leaves the finite numbers.
    run_script("train.py", *TINY, "--schedule", "constant", "--data-dir", data, "--save-dir",
               tmp_path, check=True)
    ckpt = load(tmp_path / "last.pth")
    ckpt["scheduler"]["base_lrs"] = [1e30 for _ in ckpt["scheduler"]["base_lrs"]]
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = 1e30
    checkpoints.save(ckpt, tmp_path / "last.pth")
    proc = run_script("train.py", "--resume", "--epochs", "3", "--data-dir", data, "--save-dir",
                      tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]  # stderr also has the progress bar
    assert len(errors) == 1 and "the loss became NaN or infinite at epoch 2, step" in errors[0]
    assert "the last good checkpoint is kept" in errors[0]
    last = load(tmp_path / "last.pth")
    assert last["epoch"] == 1 and last["step"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not weight_differences(last["model"], load(tmp_path / "epoch_001.pth")["model"])
    assert not (tmp_path / "epoch_002.pth").exists()



def test_a_resume_inside_the_first_epoch_names_no_best_accuracy(data, tmp_path):
    """Stopped inside epoch 1 (saved every few steps, then SIGTERM): no validation has chosen a best
    epoch yet, so the resume line names none (it said "best validation accuracy 0.00%")."""
    proc = popen(*RUN, "--save-every-minutes", "0.0001", "--data-dir", data, "--save-dir", tmp_path)
    wait_for(lambda: (tmp_path / "last.pth").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stopped = load(tmp_path / "last.pth")
    assert stopped["epoch"] == 0 and stopped["step"] > 0
    proc = run_script("train.py", "--resume", "--epochs", "1", "--data-dir", data, "--save-dir", tmp_path,
                      check=True)
    line, = [l for l in proc.stdout.splitlines() if l.startswith("resumed")]
    assert line.endswith(f"epoch 1, step {stopped['step']}") and "best" not in line
