"""The validation split: held out from the training images by the seed alone, evaluated without
augmentation, and the only thing that chooses best.pth (the test split is reported, never selected on)."""

import csv

import pytest
import torch

import checkpoints
import imagedata
import train
from conftest import TINY, load, make_folder, make_mnist, run_train_in_process

CPU = torch.device("cpu")


@pytest.mark.parametrize("n, fraction, n_val", [(1000, 0.1, 100), (257, 0.1, 26), (10, 0.01, 1), (50, 0.0, 0)])
@pytest.mark.quick
def test_split_is_disjoint_complete_sized_and_seeded(n, fraction, n_val):
    train_idx, val_idx = imagedata.validation_indices(n, fraction, seed=3)
    assert len(val_idx) == n_val and len(train_idx) == n - n_val
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(n))
    again = imagedata.validation_indices(n, fraction, seed=3)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], val_idx)
    if n_val > 1:
        other = imagedata.validation_indices(n, fraction, seed=4)[1]
        assert not torch.equal(other, val_idx)
        # not simply the first or last images of the split
        assert val_idx.tolist() != list(range(n_val)) and val_idx.tolist() != list(range(n - n_val, n))


def test_training_batches_never_hold_a_validation_image(tmp_path, monkeypatch):
    root = make_mnist(tmp_path / "data", n_train=200, n_test=8)
    c = {"dataset": "mnist", "data_dir": str(root), "image_size": 32, "workers": 0, "val_fraction": 0.25,
         "seed": 7}
    tr, val = imagedata.load_train_val(c, CPU)
    full = imagedata.load_split(c, True, CPU)
    assert (len(tr), len(val)) == (150, 50)
    # What train.py shuffles and shards are positions in `tr`; they must map to the held-in images only.
    seen = []
    monkeypatch.setattr(full, "batches", lambda idx, *a, **k: seen.append(idx) or iter(()))
    tr.data = full
    for epoch in range(3):
        list(tr.batches(imagedata.shard_indices(len(tr), 7, epoch), 32))
    used = set(torch.cat(seen).tolist())
    assert used == set(tr.indices.tolist()) and not used & set(val.indices.tolist())
    # The batches are the images and labels at those indices, unaugmented for validation.
    x, y = next(imagedata.load_train_val(c, CPU)[1].batches(torch.arange(4), 4))
    assert torch.equal(y, full.labels[val.indices[:4]])
    assert torch.equal(x, full.preprocess(full.images[val.indices[:4]]))
    # The split depends on the seed and the size only: the same in every process (RANK) and run.
    monkeypatch.setenv("RANK", "1")
    assert torch.equal(imagedata.load_train_val(c, CPU)[1].indices, val.indices)
    assert imagedata.load_train_val(dict(c, val_fraction=0.0), CPU)[1] is None


def test_a_val_folder_is_used_when_present(tmp_path):
    root = make_folder(tmp_path / "data", n_train=12, n_test=6)
    c = {"dataset": "folder", "data_dir": str(root), "image_size": 32, "workers": 0, "val_fraction": 0.5,
         "seed": 0}
    tr, val = imagedata.load_train_val(c, CPU)
    assert len(tr) == 6 and len(val) == 6  # no val/: half of train/ held out
    make_folder(tmp_path / "other", n_train=9, n_test=6)
    (tmp_path / "other" / "train").rename(root / "val")
    tr, val = imagedata.load_train_val(c, CPU)
    assert len(tr) == 12 and len(val) == 9  # the whole of train/, and val/
    assert val.classes == tr.classes == ["cat", "dog", "ship"]


def run_train(args, monkeypatch, accuracies):
    """train.py in this process, with evaluate() returning scripted (loss, accuracy) per split and epoch."""
    calls = {"val": 0, "test": 0}

    def evaluate(model, data, *a, **k):
        split = "test" if len(data) == 64 else "val"
        acc = accuracies[split][calls[split]]
        calls[split] += 1
        return 1 - acc, acc, acc

    monkeypatch.setattr(train, "evaluate", evaluate)
    run_train_in_process(monkeypatch, *args)
    return calls


def test_best_pth_follows_validation_accuracy_not_test_accuracy(tmp_path, monkeypatch):
    data = make_mnist(tmp_path / "data", n_train=200, n_test=64)
    save = tmp_path / "save"
    accuracies = {"val": [0.5, 0.7, 0.6], "test": [0.9, 0.1, 0.95]}
    calls = run_train([*TINY, "--epochs", "3", "--data-dir", data, "--save-dir", save], monkeypatch, accuracies)
    assert calls == {"val": 3, "test": 3}
    best = load(save / "best.pth")
    assert best["epoch"] == 2 and best["val_acc"] == 0.7 and best["test_acc"] == 0.1
    assert load(save / "last.pth")["best_acc"] == 0.7
    with open(save / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_acc"]) for r in rows] == [0.5, 0.7, 0.6]
    assert [float(r["test_acc"]) for r in rows] == [0.9, 0.1, 0.95]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([0.5, 0.3, 0.4])

    # --val-fraction 0: no validation split, best.pth is simply the last epoch.
    save0 = tmp_path / "save0"
    calls = run_train([*TINY, "--epochs", "3", "--val-fraction", "0", "--data-dir", data, "--save-dir", save0],
                      monkeypatch, {"val": [], "test": [0.9, 0.5, 0.1]})
    assert calls == {"val": 0, "test": 3}
    assert load(save0 / "best.pth")["epoch"] == 3 and load(save0 / "best.pth")["val_acc"] is None
    with open(save0 / "metrics.csv", newline="") as f:
        assert [r["val_acc"] for r in csv.DictReader(f)] == ["", "", ""]


def test_a_validation_tie_keeps_the_first_epoch_in_training_restore_and_curves(tmp_path, monkeypatch):
    """Epochs 2 and 3 validate equally: training keeps epoch 2 (a tie is no improvement), a deleted
    best.pth is restored from epoch 2, and curves.png names epoch 2."""
    import plots
    data = make_mnist(tmp_path / "data", n_train=200, n_test=64)
    save = tmp_path / "save"
    run_train([*TINY, "--epochs", "3", "--data-dir", data, "--save-dir", save], monkeypatch,
              {"val": [0.5, 0.7, 0.7], "test": [0.9, 0.1, 0.95]})
    assert load(save / "best.pth")["epoch"] == 2 and load(save / "last.pth")["best_acc"] == 0.7
    assert plots.plot_curves(save / "metrics.csv", tmp_path / "curves.png") == 2
    (save / "best.pth").unlink()
    assert checkpoints.restore_best(save, load(save / "last.pth"), lambda *a: None)
    assert load(save / "best.pth")["epoch"] == 2


def test_resume_keeps_the_split_and_an_old_checkpoint_resumes_without_one(tmp_path, monkeypatch, capsys):
    data = make_mnist(tmp_path / "data", n_train=200, n_test=64)
    save = tmp_path / "save"
    run_train([*TINY, "--val-fraction", "0.2", "--data-dir", data, "--save-dir", save], monkeypatch,
              {"val": [0.5], "test": [0.5]})
    # Typed again with another value, the checkpoint's split is kept: the run goes on with the same images.
    calls = run_train(["--resume", "--epochs", "2", "--val-fraction", "0.5", "--data-dir", data, "--save-dir", save],
                      monkeypatch, {"val": [0.4], "test": [0.5]})
    out = capsys.readouterr().out
    assert "--val-fraction 0.5 differs from the checkpoint's 0.2: using the checkpoint's 0.2" in out
    assert "160 train / 40 validation / 64 test" in out and calls["val"] == 1
    assert load(save / "best.pth")["epoch"] == 1  # 0.4 < 0.5
    # A checkpoint written before validation splits existed trained on every image: it goes on doing so.
    ckpt = load(save / "last.pth")
    del ckpt["config"]["val_fraction"], ckpt["format"]
    checkpoints.save(ckpt, save / "last.pth")
    run_train(["--resume", "--epochs", "3", "--data-dir", data, "--save-dir", save], monkeypatch,
              {"val": [], "test": [0.5]})
    assert "200 train / 0 validation / 64 test" in capsys.readouterr().out
