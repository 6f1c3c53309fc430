"""What a run writes: only finite models, the newest epochs kept, one best epoch, and resume's edges.

Most checks here compare with a value known independently of the code under test (a count, an
order, a hand-computed number), so that two runs sharing one bug cannot agree their way past them.
"""

import math
import os
import sys

import pytest
import torch

import checkpoints
import cli
import devices
import net
import runstate
import train
from conftest import TINY, csv_rows, load, make_mnist, run_train_in_process

CPU = torch.device("cpu")


def tiny_config(**more) -> dict:
    return {k.lower(): v for k, v in train.DEFAULTS.items()} | {
        "image_size": 32, "width_div": 16, "batch_size": 4, "device": "cpu", "epochs": 1} | more


def tiny_state(c=None):
    c = c or tiny_config()
    run = runstate.Run(c, [str(k) for k in range(10)], CPU, None, steps_per_epoch=2)
    return run, train.make_state(run, None)


@pytest.mark.quick
@pytest.mark.parametrize("where", ["running_var", "running_mean", "weight"])
def test_a_model_that_is_not_finite_is_never_saved(where):
    """A BatchNorm statistic that became inf while the loss was still finite used to be saved over
    best.pth and last.pth."""
    run, state = tiny_state()
    bn = state.model.features[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    getattr(bn, where).data[0] = math.inf
    with pytest.raises(runstate.Diverged, match="no longer finite"):
        state.checkpoint(run, 1, 0, runstate.EpochTotals())


@pytest.mark.quick
def test_an_evaluated_loss_that_is_not_finite_saves_nothing(tmp_path):
    c = tiny_config(save_dir=str(tmp_path))
    run, state = tiny_state(c)
    keeper = runstate.Keeper(run, checkpoints.OldRun(tmp_path, False), "save_model")
    for val, test in (((math.nan, 0.5), None), (None, (math.inf, 0.5))):
        with pytest.raises(runstate.Diverged, match="loss"):
            keeper.end_epoch(state, 0, runstate.EpochTotals(1.0, 1, 4), val, test, 1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.quick
def test_test_script_says_when_a_checkpoint_is_not_finite(tmp_path, capsys):
    from conftest import load_script
    script = load_script("test.py", "test_script_saving")
    c = tiny_config()
    model = net.build_model(c, 10)
    state = model.state_dict()
    state["features.8.running_var"][0] = math.inf
    checkpoints.save({"model": state, "config": c, "classes": [str(k) for k in range(10)],
                      "epoch": 1}, tmp_path / "m.pth")
    script.load_model(tmp_path / "m.pth", CPU)
    err = capsys.readouterr().err
    assert "features.8.running_var" in err and "not finite" in err


@pytest.mark.quick
def test_rotation_keeps_the_newest_epochs_past_999(tmp_path):
    for epoch in (9, 10, 998, 999, 1000, 1001):
        (tmp_path / f"epoch_{epoch:03d}.pth").write_bytes(b"x")
    checkpoints.rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1000.pth", "epoch_1001.pth"]


@pytest.mark.quick
def test_truncate_metrics_keeps_exactly_the_epochs_done(tmp_path):
    path = tmp_path / "metrics.csv"
    fields = checkpoints.METRICS_FIELDS
    rows = [fields] + [[str(e)] + ["0"] * (len(fields) - 1) for e in (1, 2, 3)]
    checkpoints.write_csv(path, rows)
    checkpoints.truncate_metrics(path, 2)
    assert [r[0] for r in checkpoints.read_metrics(path, checkpoints.METRICS_FIELDS)[1:]] == ["1", "2"]


@pytest.mark.quick
def test_restoring_best_picks_the_first_of_two_equal_epochs_as_training_did(tmp_path):
    """Training keeps the first epoch that reaches the best validation accuracy (a later tie is no
    improvement); a deleted best.pth is restored from that same epoch, and curves.png names it."""
    for epoch in (1, 2, 3):
        checkpoints.save({"model": {}, "config": {}, "classes": [], "epoch": epoch,
                          "val_acc": 0.5 if epoch > 1 else 0.25, "test_acc": 0.1 * epoch},
                         tmp_path / f"epoch_{epoch:03d}.pth")
    assert checkpoints.restore_best(tmp_path, {"epoch": 3, "best_acc": 0.5}, lambda *a: None)
    assert load(tmp_path / "best.pth")["epoch"] == 2


@pytest.mark.quick
def test_a_random_state_of_the_wrong_kind_is_one_line():
    """A CPU-typed augmentation state of 16 bytes (a CUDA generator's size): tampered or
    inconsistent, and one line."""
    state = devices.random_state(CPU, torch.Generator())
    state["aug"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(cli.UserError, match="random"):
        devices.restore_random_state(state, CPU, torch.Generator())
    state = devices.random_state(CPU, torch.Generator())
    state["torch"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(cli.UserError, match="random"):
        devices.restore_random_state(state, CPU, torch.Generator())


@pytest.mark.quick
def test_no_decay_group_is_exactly_the_biases_and_batchnorm(monkeypatch):
    """Weight decay on the 2-d and 4-d weights only; checked against the layer types, and against
    one SGD step computed by hand."""
    c = tiny_config(weight_decay=0.5, momentum=0.0, lr=0.1)
    model = net.build_model(c, 10)
    opt = train.make_optimizer(model, c)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    bn_or_bias = {n for n, p in model.named_parameters()
                  if n.endswith("bias") or isinstance(model.get_submodule(n.rsplit(".", 1)[0]),
                                                      torch.nn.BatchNorm2d)}
    assert decayed == {n for n, _ in model.named_parameters()} - bn_or_bias
    bn_weight = model.features[1].weight
    before = bn_weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(bn_weight.detach(), before)  # zero gradient, no decay: unchanged
    conv = model.features[0].weight
    before = conv.detach().clone()
    opt.step()  # decayed: w - lr * wd * w
    assert torch.allclose(conv.detach(), before * (1 - 0.1 * 0.5))


def test_train_loss_is_the_mean_over_the_images(tmp_path, monkeypatch):
    """The epoch's train loss is the cross-entropy summed over its images, divided by their number:
    compared here with the loss of each step, recomputed outside the loop (batch sizes 4, 4, 2)."""
    root = make_mnist(tmp_path / "d", n_train=10, n_test=8)
    losses = []
    real = torch.nn.functional.cross_entropy

    def recording(logits, y, **kw):
        loss = real(logits, y, **kw)
        if kw.get("reduction", "mean") == "mean":
            losses.append((loss.item(), len(y)))
        return loss
    monkeypatch.setattr(train.F, "cross_entropy", recording)
    state, results = run_train_in_process(
        monkeypatch, *TINY, "--batch-size", "4", "--val-fraction", "0", "--data-dir", root,
        "--save-dir", tmp_path / "s", "--amp", "off")
    assert [n for _, n in losses] == [4, 4, 2]
    expected = sum(l * n for l, n in losses) / 10
    assert results["train"][0] == pytest.approx(expected, rel=1e-5)
    row = csv_rows(tmp_path / "s" / "metrics.csv")[1]
    assert float(row[1]) == pytest.approx(expected, rel=1e-4)


def test_resume_with_fewer_epochs_than_done_is_one_line(tmp_path, monkeypatch, capsys):
    root = make_mnist(tmp_path / "d", n_train=16, n_test=8)
    args = [*TINY, "--batch-size", "8", "--data-dir", root, "--save-dir", tmp_path / "s"]
    run_train_in_process(monkeypatch, *args, "--epochs", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train_in_process(monkeypatch, *args, "--resume", "--epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--epochs 1" in err and "2" in err, err


def test_resume_and_test_find_the_data_folder_by_one_rule(tmp_path, monkeypatch, capsys):
    """A typed --data-dir wins, then the folder the checkpoint names while it exists, then DATA_DIR,
    then ./data: --resume --save-dir X without --data-dir continues on the run's own data (it used
    to fall back to ./data), and test.py on the checkpoint ignores a DATA_DIR exported for
    another dataset (README's CIFAR-10 recipe, followed verbatim)."""
    from conftest import run_script
    root = make_mnist(tmp_path / "d", n_train=16, n_test=8)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "elsewhere"))
    args = [*TINY, "--batch-size", "8", "--save-dir", tmp_path / "s"]
    run_train_in_process(monkeypatch, *args, "--data-dir", root)
    block = train.DEFAULTS
    monkeypatch.setattr(train, "DEFAULTS", cli.Block({**block, "DATA_DIR": str(tmp_path / "elsewhere")},
                                                     block.kinds, block.help, block.source))
    state, _ = run_train_in_process(monkeypatch, *args, "--resume", "--epochs", "2")
    assert state.epoch == 2
    proc = run_script("test.py", "--checkpoint", tmp_path / "s" / "best.pth", "--device", "cpu",
                      env={"DATA_DIR": str(tmp_path / "elsewhere")})
    assert proc.returncode == 0 and "test accuracy: " in proc.stdout, proc.stderr


def test_a_relative_data_folder_from_another_working_directory_says_where_it_came_from(tmp_path):
    import subprocess
    from conftest import ROOT
    c = tiny_config(data_dir="rel/d")
    checkpoints.save({"model": net.build_model(c, 10).state_dict(), "config": c,
                      "classes": [str(k) for k in range(10)], "epoch": 1}, tmp_path / "m.pth")
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), "--checkpoint", "m.pth",
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "rel/d" in line and "checkpoint" in line
    assert "--data-dir" in line
