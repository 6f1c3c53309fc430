"""Never lose a training run: Ctrl-C/SIGTERM, kill -9, exact resume, divergence, and bad input.

The training runs here use a 1,024-image MNIST in the real IDX format and a 1/16-width VGG16 at 32 px
(32 steps an epoch), so each run takes seconds. Bad input is tried in-process where the script stops
before training starts (same code path, no second torch import), and in a real process otherwise.
"""

import errno
import hashlib
import importlib.util
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import cli
import devices
import imagedata
import net
import train
from conftest import ROOT, TINY, load, make_folder, make_mnist, run_script, weight_differences

# Two epochs with a step schedule: a run of 1 epoch extended by --resume --epochs 2 follows the same
# learning rates as a straight 2-epoch run (a cosine schedule's shape depends on the number of epochs).
RUN = [*TINY, "--epochs", "2", "--schedule", "step", "--step-epochs", "1", "--step-gamma", "0.5"]


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def popen(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.001) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (exit {proc.returncode}) before the moment to stop it:\n"
                                 f"{proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to stop train.py")
        time.sleep(poll)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"), n_train=1024, n_test=128)


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
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


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
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # no epoch counted twice


def load_ok(folder: Path) -> dict:
    try:
        return load(folder / "last.pth")
    except Exception:  # being replaced right now: look again at the next poll
        return {"epoch": -1, "step": -1}


# --------------------------------------------------------------------------------------- divergence

def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(data, tmp_path):
    # Epoch 1 trains normally; epoch 2 multiplies the rate by 1e30, so the loss leaves the finite numbers.
    proc = run_script("train.py", *TINY, "--epochs", "3", "--schedule", "step", "--step-epochs", "1",
                      "--step-gamma", "1e30", "--data-dir", data, "--save-dir", tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]  # stderr also has the progress bar
    assert len(errors) == 1 and "the loss became NaN or infinite at epoch 2, step" in errors[0]
    last = load(tmp_path / "last.pth")
    assert last["epoch"] == 1 and last["step"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not weight_differences(last["model"], load(tmp_path / "epoch_001.pth")["model"])
    assert not (tmp_path / "epoch_002.pth").exists()


# -------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A finished 1-epoch run, copied for each test that needs one."""
    save = tmp_path_factory.mktemp("run")
    run_script("train.py", *TINY, "--data-dir", data, "--save-dir", save, check=True)
    return save


@pytest.fixture
def saved(run_dir, tmp_path):
    copy = tmp_path / "save"
    shutil.copytree(run_dir, copy)
    return copy


def call(main, prog: str, args, capsys) -> tuple[int, str]:
    """Run a script's main() in this process as `prog args`; (exit code, stderr)."""
    old = sys.argv
    sys.argv = [prog, *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def test_script():
    spec = importlib.util.spec_from_file_location("test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda: cli.run_main(module.main)


def crafted_pickle(path: Path, marker: Path, torch_format: bool) -> None:
    """A checkpoint whose unpickling would create `marker`, in PyTorch's zip format or as a bare pickle."""
    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    obj = {"model": Payload(), "config": {}, "classes": []}
    if torch_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))


BAD_OPTIONS = [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--ep", "3"], "unrecognized arguments: --ep"),                      # no silent abbreviations
    (["--batch-size", "ten"], "argument --batch-size: invalid int value: 'ten'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    (["--image-size", "28"], "--image-size must be at least 32"),
    (["--depth", "12"], "unknown VGG depth 12"),
    (["--width-div", "3"], "--width-div must divide 64"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cpu:1"], "--device cpu:1: this machine has 1 CPU device(s)"),
    (["--amp", "fp8"], "unknown amp mode 'fp8'"),
    (["--tta"], "--tta averages each image with its mirror image, which does not suit mnist"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_even_overwrite_keeps_the_old_run(args, message, saved, capsys):
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, *args], capsys)
    assert code == 2
    assert message in one_line(err)
    assert digests(saved) == before


def test_unavailable_device_is_one_line(saved, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: no CUDA device is available" in one_line(err)
    assert digests(saved) == before


def test_missing_dataset_names_folder_and_files(saved, tmp_path, capsys):
    before = digests(saved)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, "--data-dir", empty, *TINY[:4]],
                     capsys)
    line = one_line(err)
    assert code == 2 and str(empty) in line and "MNIST/raw/" in line
    assert digests(saved) == before


def test_existing_run_is_not_replaced_without_resume_or_overwrite(saved, data, capsys):
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--save-dir", saved, "--data-dir", data, *TINY], capsys)
    assert code == 2 and "already holds a run: continue it with --resume" in one_line(err)
    assert digests(saved) == before


def test_save_folder_that_is_not_writable(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # A path under a regular file can never be created, whoever runs the test (chmod does not stop root).
    code, err = call(train.run, "train.py", ["--save-dir", blocker / "save", "--data-dir", data, *TINY], capsys)
    assert code == 2 and f"cannot write to the save folder {blocker / 'save'}" in one_line(err)
    assert blocker.read_text() == "not a folder"


# What a user may put where last.pth (train.py --resume) or a checkpoint (test.py) should be.
def _truncated(path: Path, good: Path, tmp: Path):
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _folder(path: Path, good: Path, tmp: Path):
    path.mkdir()


def _text(path: Path, good: Path, tmp: Path):
    path.write_text("epoch,loss\n1,0.5\n")


def _foreign_torch_file(path: Path, good: Path, tmp: Path):
    torch.save({"weights": torch.zeros(3)}, path)


def _other_architecture(path: Path, good: Path, tmp: Path):
    ckpt = load(good)  # the config says width/16, the weights are those of a width/8 network
    ckpt["model"] = net.build_model(dict(ckpt["config"], width_div=8), 10).state_dict()
    torch.save(ckpt, path)


def _other_class_count(path: Path, good: Path, tmp: Path):
    ckpt = load(good)  # e.g. a 5-class folder-dataset run, resumed or tested on 10 classes
    ckpt["model"] = net.build_model(ckpt["config"], 5).state_dict()
    torch.save(ckpt, path)


BAD_CHECKPOINTS = [
    (_truncated, "is truncated or not a PyTorch checkpoint"),
    (_folder, "is not a file"),
    (_text, "is truncated or not a PyTorch checkpoint"),
    (_foreign_torch_file, "is not a checkpoint written by train.py"),
    (_other_architecture, "holds a different architecture: features.0.weight has shape (8, 3, 3, 3), "
                          "expected (4, 3, 3, 3)"),
    (_other_class_count, "was trained for 5 classes, but 10 are expected"),
]


@pytest.mark.parametrize("make,message", BAD_CHECKPOINTS, ids=[m.__name__[1:] for m, _ in BAD_CHECKPOINTS])
def test_bad_checkpoint_for_resume(make, message, saved, data, tmp_path, capsys):
    good = tmp_path / "good.pth"
    shutil.move(saved / "last.pth", good)
    make(saved / "last.pth", good, tmp_path)
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 2 and message in one_line(err)
    assert digests(saved) == before


def test_resume_from_a_weights_only_file(saved, data, capsys):
    shutil.copy(saved / "epoch_001.pth", saved / "last.pth")
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 2 and "has no training state to resume from" in one_line(err)
    assert digests(saved) == before


@pytest.mark.parametrize("make,message", BAD_CHECKPOINTS, ids=[m.__name__[1:] for m, _ in BAD_CHECKPOINTS])
def test_bad_checkpoint_for_test_script(make, message, saved, data, tmp_path, test_script, capsys):
    path = tmp_path / "model.pth"
    make(path, saved / "best.pth", tmp_path)
    code, err = call(test_script, "test.py", ["--checkpoint", path, "--data-dir", data, "--device", "cpu"], capsys)
    assert code == 2 and message in one_line(err)


def test_missing_checkpoint_for_test_script(tmp_path, test_script, capsys):
    code, err = call(test_script, "test.py", ["--checkpoint", tmp_path / "nope.pth"], capsys)
    assert code == 2 and "does not exist (train first: python train.py)" in one_line(err)


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "bare-pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the bare pickle; it is refused anyway
def test_crafted_pickle_never_runs(torch_format, saved, data, tmp_path, test_script, capsys):
    marker = tmp_path / "payload-ran"
    crafted_pickle(saved / "last.pth", marker, torch_format)
    with pytest.raises(FileExistsError):  # the payload is real: an unrestricted unpickler runs it
        crafted_pickle(tmp_path / "probe.pth", tmp_path, torch_format=False)
        pickle.loads((tmp_path / "probe.pth").read_bytes())
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 2 and "refusing to load it (weights_only=True)" in one_line(err)
    code, err = call(test_script, "test.py", ["--checkpoint", saved / "last.pth"], capsys)
    assert code == 2 and "refusing to load it" in one_line(err)
    assert not marker.exists()
    assert digests(saved) == before


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    """The in-process checks above, confirmed once end to end for each script."""
    proc = run_script("train.py", "--batch-size", "0", "--save-dir", tmp_path)
    assert proc.returncode == 2 and proc.stderr == "train.py: error: --batch-size must be at least 1, got 0\n"
    proc = run_script("test.py", "--checkpoint", tmp_path)
    assert proc.returncode == 2 and proc.stderr == f"test.py: error: checkpoint {tmp_path} is not a file\n"


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


# ------------------------------------------------------------------ round two: what adversarial inputs broke

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """64 training images: 2 steps an epoch at TINY's batch size, for tests that only need a run to happen."""
    return make_mnist(tmp_path_factory.mktemp("small"), n_train=64, n_test=32)


@pytest.fixture
def handlers():
    """train.main installs its own SIGINT/SIGTERM handlers: put pytest's back after an in-process run."""
    old = {s: signal.getsignal(s) for s in devices.STOP_SIGNALS}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]  # stderr also holds the progress bar


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved(saved, small, capsys, handlers):
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
    assert len((saved / "metrics.csv").read_text().splitlines()) == 2  # the header and the new run's epoch 1
    assert sorted(p.name for p in saved.iterdir() if p.name != ".lock") == [
        "best.pth", "curves.png", "epoch_001.pth", "last.pth", "metrics.csv"]


@pytest.mark.parametrize("kept", ["best.pth", "epoch_001.pth", "metrics.csv"])
def test_any_file_of_a_previous_run_blocks_a_fresh_run(kept, saved, data, capsys, handlers):
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
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_resume_with_other_class_names_is_refused(tmp_path, capsys, handlers):
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
def test_damaged_metrics_is_set_aside_and_resume_goes_on(kind, saved, data, capsys, handlers):
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
    assert path.read_text().splitlines() == ["epoch,test_acc", "2,0.5"]


@pytest.mark.quick
def test_metrics_with_another_header_is_set_aside_when_appending(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,test_acc,note\n1,0.4,x\n")
    checkpoints.append_metrics(path, {"epoch": 2, "test_acc": "0.5"})
    assert path.read_text().splitlines() == ["epoch,test_acc", "2,0.5"]
    assert (tmp_path / "metrics.csv.damaged").read_text() == "epoch,test_acc,note\n1,0.4,x\n"
    assert "metrics.csv.damaged" in one_line(capsys.readouterr().err)


def test_full_disk_at_the_metrics_write_keeps_the_epoch_and_leaves_nothing_half_written(
        saved, small, monkeypatch, capsys, handlers):
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


def test_many_classes_print_the_most_confused_pairs_and_draw_a_picture_that_fits(tmp_path, test_script,
                                                                                 monkeypatch, capsys):
    """A 1,000-class model: no million-cell matrix on stdout, and a confusion picture of bounded size."""
    from matplotlib.figure import Figure
    from PIL import Image
    classes = [f"c{i:03d}" for i in range(1000)]
    for i, name in enumerate(classes):
        (tmp_path / "data" / "test" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (i % 256, i // 4 % 256, 0)).save(tmp_path / "data" / "test" / name / "0.png")
    config = {k.lower(): v for k, v in train.DEFAULTS.items()}
    config.update(dataset="folder", image_size=32, width_div=16, workers=0, data_dir=str(tmp_path / "data"))
    torch.manual_seed(0)
    model = net.build_model(config, len(classes))
    torch.save({"model": model.state_dict(), "config": config, "classes": classes, "epoch": 1,
                "best_acc": 0.0}, tmp_path / "big.pth")
    real_savefig = Figure.savefig

    def bounded_savefig(fig, *args, **kwargs):
        w, h = fig.get_size_inches() * fig.dpi
        assert w * h <= 4000 * 4000, f"a {w:.0f} x {h:.0f} px picture"  # before anything is allocated
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", bounded_savefig)
    old = sys.argv
    sys.argv = ["test.py", "--checkpoint", str(tmp_path / "big.pth"), "--device", "cpu", "--grid", "0",
                "--data-dir", str(tmp_path / "data")]
    try:
        test_script()
    finally:
        sys.argv = old
    out = capsys.readouterr().out
    assert len(out) < 200_000 and "most confused" in out
    with Image.open(tmp_path / "confusion.png") as im:
        assert im.width * im.height <= 4000 * 4000


def test_many_classes_text_output(tmp_path, test_script):
    """format_tables on 1,000 classes: a per-class table and the most-confused pairs, not the matrix."""
    ts = importlib.util.module_from_spec(importlib.util.spec_from_file_location("t", ROOT / "test.py"))
    ts.__spec__.loader.exec_module(ts)
    n = 1000
    labels = torch.arange(n).repeat(3)
    preds = labels.clone()
    preds[:n] = (labels[:n] + 1) % n     # every class mistaken once for the next
    preds[:5] = 999                      # classes 0..4 taken for class 999
    cm = ts.confusion_matrix(preds, labels, n)
    text = ts.format_tables(cm, [f"class{i}" for i in range(n)])
    assert len(text) < 200_000
    assert "confusion matrix (rows" not in text and "most confused" in text
    assert "class0 -> class999: 1 (33.3% of class0)" in text


BAD_SETTINGS = [
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--seed", "100000000000000000"], "--seed must be an integer from 0 to 4294967295"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--save-every-minutes", "nan"], "--save-every-minutes must be a finite number, got nan"),
    (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    (["--step-gamma", "-5"], "--step-gamma must be positive, got -5.0"),
    (["--step-gamma", "0"], "--step-gamma must be positive, got 0.0"),
    (["--image-size", "100000"], "--image-size must be at most 2048"),
    (["--batch-size", str(2**62)], "--batch-size must be at most 2147483647"),
    (["--epochs", "10000000"], "--epochs must be at most 1000000"),
    (["--workers", "100000"], "--workers must be at most 256"),
    (["--save-dir", ""], "--save-dir is empty"),
    (["--data-dir", ""], "--data-dir (or DATA_DIR) is empty"),
]


@pytest.mark.parametrize("args,message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_and_overwrite_keeps_the_old_run(args, message, saved, data, capsys):
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, "--data-dir", data, *args],
                     capsys)
    assert code == 2 and message in one_line(err)
    assert digests(saved) == before


def test_a_checkpoint_config_of_the_wrong_type_is_one_line(saved, data, capsys):
    ckpt = load(saved / "last.pth")
    ckpt["config"]["lr"] = "0.1"
    torch.save(ckpt, saved / "last.pth")
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 2 and "--lr must be a number, got '0.1'" in one_line(err)


def test_empty_data_dir_variable_is_an_error_in_both_scripts(saved, tmp_path, test_script, capsys):
    spec = importlib.util.spec_from_file_location("train_env", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_DIR", "")
        script.__spec__.loader.exec_module(script)  # DATA_DIR is read when train.py starts
        code, err = call(script.run, "train.py", ["--save-dir", tmp_path / "new"], capsys)
        assert code == 2 and "--data-dir (or DATA_DIR) is empty" in one_line(err)
        code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu"],
                         capsys)
        assert code == 2 and "--data-dir (or DATA_DIR) is empty" in one_line(err)


@pytest.mark.parametrize("flag", ["--checkpoint", "--out", "--data-dir"])
def test_empty_path_for_test_script(flag, saved, test_script, capsys):
    args = {"--checkpoint": saved / "best.pth", "--device": "cpu", flag: ""}
    code, err = call(test_script, "test.py", [x for kv in args.items() for x in kv], capsys)
    name = "--data-dir (or DATA_DIR)" if flag == "--data-dir" else flag  # test.py reads DATA_DIR too
    assert code == 2 and f"{name} is empty" in one_line(err)


def test_test_script_on_the_wrong_data_dir_creates_nothing_there(saved, tmp_path, test_script, capsys):
    wrong = tmp_path / "cifar-data"
    wrong.mkdir()
    code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu",
                                              "--data-dir", wrong], capsys)
    assert code == 2 and "mnist not found under" in one_line(err)
    assert not list(wrong.iterdir())


def test_grid_seed_out_of_range(saved, data, test_script, capsys):
    code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu",
                                              "--data-dir", data, "--grid-seed", str(2**64)], capsys)
    assert code == 2 and "--grid-seed must be an integer from 0 to 4294967295" in one_line(err)


def test_mirror_averaging_of_a_digit_model_is_refused(saved, data, test_script, capsys):
    code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu",
                                              "--data-dir", data, "--tta", "on"], capsys)
    assert code == 2 and "which does not suit mnist; it is for fashion-mnist, cifar10, folder" in one_line(err)


def test_special_paths(saved, data, tmp_path, test_script, capsys):
    """Very long names, a FIFO, /dev/null and links where files and folders are expected."""
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    long_name = tmp_path / ("x" * 300 + ".pth")
    code, err = call(test_script, "test.py", ["--checkpoint", fifo], capsys)
    assert code == 2 and "is not a file" in one_line(err)
    code, err = call(test_script, "test.py", ["--checkpoint", long_name], capsys)
    assert code == 2 and "name too long" in one_line(err).lower()
    code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu",
                                              "--image", fifo], capsys)  # never opened: it would block
    assert code == 2 and "is not a regular file" in one_line(err)
    code, err = call(train.run, "train.py", ["--save-dir", "/dev/null", "--data-dir", data, *TINY], capsys)
    assert code == 2 and "cannot write to the save folder /dev/null" in one_line(err)
    code, err = call(train.run, "train.py", ["--save-dir", tmp_path / ("y" * 300), "--data-dir", data, *TINY],
                     capsys)
    assert code == 2 and "name too long" in one_line(err).lower()
    link = tmp_path / "link"
    link.symlink_to(saved)
    code, err = call(train.run, "train.py", ["--save-dir", link, "--data-dir", data, *TINY], capsys)
    assert code == 2 and "already holds a run" in one_line(err)  # a link to a run's folder is that run
    dangling = tmp_path / "dangling.pth"
    dangling.symlink_to(tmp_path / "nowhere")
    code, err = call(test_script, "test.py", ["--checkpoint", dangling], capsys)
    assert code == 2 and "does not exist" in one_line(err)


def test_one_class_is_refused(tmp_path, capsys):
    folder = make_folder(tmp_path / "data", n_train=4, n_test=2, classes=("cat",))
    code, err = call(train.run, "train.py", ["--dataset", "folder", "--data-dir", folder, "--save-dir",
                                             tmp_path / "save", *TINY], capsys)
    assert code == 2 and "only 1 class (cat); a classifier needs at least 2" in one_line(err)
    assert not list((tmp_path / "save").glob("*.pth"))


def test_resume_recreates_a_deleted_best_checkpoint(saved, data, capsys, handlers):
    best = load(saved / "best.pth")
    (saved / "best.pth").unlink()
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 0, err
    assert not weight_differences(load(saved / "best.pth")["model"], best["model"])


# ------------------------------------------------------------------------------ unreadable image files

def write_bad_images(folder: Path) -> list[str]:
    """The unreadable files a folder dataset meets in practice, as train/cat/*; returns their names."""
    import struct
    import zlib

    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    Image.new("RGB", (64, 64), "red").save(folder / "whole.jpg", quality=95)
    jpeg = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "dangling.png").symlink_to(folder / "no-such-file.png")
    # A decompression bomb: a valid PNG whose header claims 40,000 x 40,000 pixels.
    Image.new("1", (8, 8)).save(folder / "bomb.png")
    png = bytearray((folder / "bomb.png").read_bytes())
    ihdr = b"IHDR" + struct.pack(">II", 40_000, 40_000) + bytes(png[24:29])
    png[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    (folder / "bomb.png").write_bytes(bytes(png))
    return ["bomb.png", "dangling.png", "empty.png", "text.png", "truncated.jpg"]


@pytest.fixture
def bad_folder(tmp_path):
    root = make_folder(tmp_path / "data", n_train=12, n_test=6)
    return root, write_bad_images(root / "train" / "cat")


@pytest.mark.parametrize("path", ["memory", "dataloader"])
def test_unreadable_images_are_one_line_before_training(bad_folder, tmp_path, path, monkeypatch, capsys):
    root, names = bad_folder
    if path == "dataloader":
        monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.0)
    save = tmp_path / "save"
    code, err = call(train.run, "train.py", [*TINY, "--dataset", "folder", "--data-dir", root, "--save-dir", save],
                     capsys)
    line = one_line(err)
    assert code == 2 and f"5 unreadable image file(s) under {root / 'train'}:" in line, err
    assert all(f"cat/{name} (" in line for name in names), line
    assert "--skip-bad-images" in line and not list(save.glob("*"))
    # Only the first few are named, the rest counted.
    monkeypatch.setattr(imagedata, "BAD_FILES_SHOWN", 2)
    code, err = call(train.run, "train.py", [*TINY, "--dataset", "folder", "--data-dir", root, "--save-dir", save],
                     capsys)
    assert code == 2 and "cat/dangling.png (" in one_line(err) and "; and 3 more (fix" in one_line(err)


def test_skip_bad_images_leaves_them_out_with_one_line(bad_folder, tmp_path, monkeypatch, capsys):
    root, _ = bad_folder
    c = {"dataset": "folder", "data_dir": str(root), "image_size": 32, "workers": 0, "skip_bad_images": True}
    for share in (0.25, 0.0):
        monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", share)
        data = imagedata.load_split(c, True, torch.device("cpu"))
        err = capsys.readouterr().err
        assert isinstance(data, imagedata.DeviceImages if share else imagedata.FolderImages)
        assert len(data) == len(data.labels) == 12 and data.labels.tolist().count(0) == 4  # 4 good cats
        assert one_line(err).startswith("skipping 5 unreadable image file(s) under")
        x, _ = next(data.batches(torch.arange(12), 12))
        assert x.shape == (12, 3, 32, 32)
    monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.25)
    code, err = call(train.run, "train.py", [*TINY, "--dataset", "folder", "--skip-bad-images", "--data-dir", root,
                                             "--save-dir", tmp_path / "save"], capsys)
    assert code == 0 and err.count("unreadable") == 1 and "Traceback" not in err
    assert load(tmp_path / "save" / "last.pth")["epoch"] == 1


def test_only_rank_0_reports_unreadable_images(bad_folder, monkeypatch, capsys):
    root, _ = bad_folder
    c = {"dataset": "folder", "data_dir": str(root), "image_size": 32, "workers": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as torchrun's rank 1
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(SystemExit) as e:
        imagedata.load_split(c, True, torch.device("cpu"))
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == err == ""


def test_test_script_checks_a_folder_test_split(tmp_path, test_script, monkeypatch, capsys):
    root = make_folder(tmp_path / "data", n_train=6, n_test=9)
    write_bad_images(root / "test" / "dog")
    c = {k.lower(): v for k, v in train.DEFAULTS.items()} | {
        "dataset": "folder", "data_dir": str(root), "image_size": 32, "width_div": 16, "workers": 0}
    model = net.build_model(c, 3)
    checkpoints.save({"model": model.state_dict(), "config": c, "classes": ["cat", "dog", "ship"],
                            "epoch": 1}, tmp_path / "m.pth")
    args = ["test.py", "--checkpoint", tmp_path / "m.pth", "--device", "cpu", "--grid", "0", "--data-dir", root]
    monkeypatch.setattr(sys, "argv", list(map(str, args)))
    with pytest.raises(SystemExit) as e:
        test_script()
    assert e.value.code == 2 and "5 unreadable image file(s) under" in one_line(capsys.readouterr().err)
    monkeypatch.setattr(sys, "argv", list(map(str, [*args, "--skip-bad-images"])))
    test_script()
    out, err = capsys.readouterr()
    assert "test accuracy: " in out and "/9 = " in out and "skipping 5 unreadable" in one_line(err)


@pytest.mark.quick
def test_16_bit_grey_is_scaled_for_folder_models(tmp_path):
    """A 16-bit scan given to test.py --image of a folder model: scaled to 8 bits, not clipped to white."""
    import numpy as np
    from PIL import Image
    spec = importlib.util.spec_from_file_location("test_script_16", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    Image.fromarray(np.full((40, 40), 20_000, dtype=np.uint16)).save(tmp_path / "scan.png")
    x, _ = script.read_image(tmp_path / "scan.png", "folder", "auto", imagedata.eval_transform(32))
    mean, std = imagedata.DATASETS["folder"].stats
    expected = torch.tensor([(round(20_000 / 257) / 255 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(x.mean((1, 2)), expected, atol=1e-5)
