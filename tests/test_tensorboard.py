"""TensorBoard (--tensorboard): the values of every epoch and of every LOG_EVERY steps, read back with
TensorBoard's own reader, exactly once each across a stop and a --resume; the pictures at the end;
rank 0 alone writing under torchrun; and no import of tensorboard without the flag."""

import signal
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, load, run_script
from runs import popen, wait_for

EPOCH_TAGS = ["loss/train", "accuracy/train", "loss/val", "accuracy/val", "loss/test",
              "accuracy/test", "learning_rate", "images_per_s"]


def read(folder) -> dict:
    """{tag: [(step, value), ...]} of the scalars, and the set of image tags, as TensorBoard reads
    the folder (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, set(acc.Tags()["images"])


def test_a_run_stopped_and_resumed_has_one_value_per_epoch_and_step(small, tmp_path):
    """2 epochs, SIGTERM inside epoch 2 (last.pth saved every few steps, so that some step events
    were written before the stop), then --resume: each per-epoch tag has epochs 1 and 2 once, the
    values of last.pth's epoch files; the step tag every LOG_EVERY steps, each once; and the
    confusion matrix and the worst mistakes as pictures."""
    run = [*TINY, "--epochs", "2", "--batch-size", "8", "--log-every", "2", "--tensorboard",
           "--data-dir", small]
    proc = popen(*run, "--save-every-minutes", "0.0001", "--save-dir", tmp_path)
    wait_for(lambda: (tmp_path / "epoch_001.pth").exists() and
             load_step(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert load(tmp_path / "last.pth")["epoch"] == 1
    # (--log-every follows the command line on --resume, as the device does; --tensorboard the run)
    run_script("train.py", "--resume", "--log-every", "2", "--save-dir", tmp_path, check=True)
    scalars, images = read(tmp_path / "tensorboard" / "epochs")
    for tag in EPOCH_TAGS:
        assert [step for step, _ in scalars[tag]] == [1, 2], (tag, scalars[tag])
    for epoch in (1, 2):
        assert scalars["accuracy/test"][epoch - 1][1] == pytest.approx(
            load(tmp_path / f"epoch_{epoch:03d}.pth")["test_acc"], abs=1e-6)
    assert {"test/confusion_matrix", "test/worst_mistakes"} <= images
    # the step tag: at every LOG_EVERY steps and at every save (here every step of the first run),
    # each step once, up to the last step of the run, no gap wider than LOG_EVERY
    steps, _ = read(tmp_path / "tensorboard" / "steps")
    logged = [step for step, _ in steps["loss/train"]]
    assert logged == sorted(set(logged)), logged
    assert logged[-1] == load(tmp_path / "last.pth")["scheduler"]["last_epoch"]  # 2 x 8 steps
    assert max(b - a for a, b in zip([0, *logged], logged)) <= 2, logged


def load_step(folder) -> int:
    try:
        return load(folder / "last.pth")["step"]
    except Exception:  # being written right now
        return 0


def test_without_the_flag_tensorboard_is_never_imported_and_under_torchrun_rank_0_alone_writes(
        small, tmp_path):
    code = ("import sys; sys.argv = ['train.py', *sys.argv[1:]]; sys.path.insert(0, %r)\n"
            "import train; train.run(); print('tensorboard imported:', 'tensorboard' in sys.modules)"
            % str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--data-dir", str(small),
                           "--save-dir", str(tmp_path / "plain")], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "tensorboard imported: False" in proc.stdout, proc.stderr
    assert not (tmp_path / "plain" / "tensorboard").exists()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(ROOT / "train.py"), *TINY, "--tensorboard",
                           "--data-dir", str(small), "--save-dir", str(tmp_path / "ddp")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("epochs", "steps"):
        assert len(list((tmp_path / "ddp" / "tensorboard" / run).iterdir())) == 1, run
    scalars, _ = read(tmp_path / "ddp" / "tensorboard" / "epochs")
    assert [step for step, _ in scalars["loss/train"]] == [1]
