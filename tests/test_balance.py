"""Folders whose classes differ in size: the warning, balanced draws (BALANCE), and the balanced
accuracy (the mean recall of the classes) that joins the epoch line, metrics.csv and curves.png, and
with --balance chooses best.pth."""

import numpy as np
import pytest
import torch
from PIL import Image

import imagedata
import net
import train
from conftest import TINY, csv_rows, load, run_script, run_train_in_process, weight_differences

CPU = torch.device("cpu")


def unbalanced_folder(root, sizes=(30, 6), n_test=6):
    """Class k has sizes[k] training images: a bright bar at a place of its own, on noise."""
    rng = np.random.default_rng(0)
    names = [f"c{k}" for k in range(len(sizes))]
    for split, counts in (("train", sizes), ("test", [n_test] * len(sizes))):
        for k, (name, n) in enumerate(zip(names, counts)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                img[4 + 6 * k:8 + 6 * k] = 250
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.quick
def test_balanced_draws_give_every_class_the_same_share_seeded_and_sharded():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    draws = imagedata.shard_indices(1000, seed=3, epoch=2, labels=labels)
    per_class = torch.bincount(labels[draws], minlength=3).tolist()
    assert len(draws) == 1000 and all(250 <= n <= 420 for n in per_class), per_class
    assert torch.equal(draws, imagedata.shard_indices(1000, seed=3, epoch=2, labels=labels))
    assert not torch.equal(draws, imagedata.shard_indices(1000, seed=3, epoch=3, labels=labels))
    shards = [imagedata.shard_indices(1000, 3, 2, rank, 2, labels) for rank in (0, 1)]
    assert torch.equal(torch.stack(shards, 1).flatten(), draws)  # the shards interleave the draws


@pytest.mark.quick
def test_balanced_accuracy_is_the_mean_recall_of_the_classes():
    """A model that answers class 0 for every image (its last layer: weight 0, bias favouring 0):
    accuracy is class 0's share of the split, balanced accuracy 1 / classes."""
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    data = imagedata.DeviceImages(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), labels,
                                  ["a", "b", "c"], (0.5,) * 3, (0.5,) * 3, 32, CPU)
    model = net.vgg(11, 3, width_div=64)
    with torch.no_grad():
        model.classifier[6].weight.zero_()
        model.classifier[6].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    score = train.evaluate(model, data, 16, CPU, None)
    assert score.acc == pytest.approx(30 / 40) and score.balanced == pytest.approx(1 / 3)


def test_an_unbalanced_folder_is_said_and_balance_shows_and_chooses_by_the_mean_recall(
        tmp_path, monkeypatch, capsys):
    root = unbalanced_folder(tmp_path / "d")
    run = [*TINY, "--dataset", "folder", "--data-dir", root, "--workers", "0", "--batch-size", "8",
           "--val-fraction", "0.2", "--epochs", "2"]
    run_train_in_process(monkeypatch, *run, "--epochs", "1", "--save-dir", tmp_path / "plain")
    err = capsys.readouterr().err
    line, = [l for l in err.splitlines() if "unbalanced" in l]
    assert "--balance" in line and "c0" in line and "c1" in line
    rows = csv_rows(tmp_path / "plain" / "metrics.csv")
    header = rows[0]
    assert "val_balanced_acc" in header and "test_balanced_acc" in header
    for row in rows[1:]:
        assert 0 <= float(row[header.index("val_balanced_acc")]) <= 1
    # --balance: no warning, and best.pth follows the balanced accuracy (scripted here, against the
    # plain accuracy, which would choose the other epoch)
    scores = iter([(1.0, 0.9, 0.5), (1.0, 0.5, 0.5), (1.0, 0.6, 0.8), (1.0, 0.5, 0.5)])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: train.Score(*next(scores)))
    run_train_in_process(monkeypatch, *run, "--balance", "--save-dir", tmp_path / "balanced")
    out, err = capsys.readouterr()
    assert "unbalanced" not in err and "bal 80.00%" in out
    best = load(tmp_path / "balanced" / "best.pth")
    assert best["epoch"] == 2 and best["val_balanced_acc"] == 0.8
    assert load(tmp_path / "balanced" / "last.pth")["best_acc"] == 0.8


def test_balanced_draws_resume_mid_epoch_exactly(tmp_path):
    """Stopped by SIGTERM inside the first epoch (saved every few steps), then --resume: the same
    weights as 2 epochs straight. The balanced draws are seeded like the shuffle they replace."""
    import signal
    from runs import popen, wait_for
    root = unbalanced_folder(tmp_path / "d")
    run = [*TINY, "--dataset", "folder", "--data-dir", root, "--workers", "0", "--batch-size", "4",
           "--val-fraction", "0", "--balance", "--schedule", "constant", "--epochs", "2"]
    run_script("train.py", *run, "--save-dir", tmp_path / "straight", check=True)
    proc = popen(*run, "--save-every-minutes", "0.0001", "--save-dir", tmp_path / "split")
    wait_for(lambda: (tmp_path / "split" / "last.pth").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stopped = load(tmp_path / "split" / "last.pth")
    assert stopped["epoch"] == 0 and 0 < stopped["step"] < 9  # 36 images, 9 steps an epoch
    run_script("train.py", "--resume", "--save-dir", tmp_path / "split", check=True)
    assert not weight_differences(load(tmp_path / "split" / "last.pth")["model"],
                                  load(tmp_path / "straight" / "last.pth")["model"])
