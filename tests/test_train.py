"""train.py and test.py end to end, on a small MNIST written in the real IDX format, and on real MNIST when present."""

import csv
import importlib.util
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import checkpoints
import devices
import imagedata
import net
import runstate
import train
from conftest import (REAL_DATA, ROOT, TINY, load, make_folder, make_mnist, run_script,
                      run_train_in_process, weight_differences)
from runs import call


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-epoch run shared by the tests below: keep 2 epoch files."""
    tmp = tmp_path_factory.mktemp("trained")
    data = make_mnist(tmp / "data", n_train=512, n_test=128)
    save = tmp / "save"
    proc = run_script("train.py", *TINY, "--epochs", "3", "--keep", "2", "--data-dir", data, "--save-dir", save,
                      check=True)
    return data, save, proc


def test_checkpoints_appear_and_rotation_keeps_n(trained):
    _, save, proc = trained
    assert sorted(p.name for p in save.glob("epoch_*.pth")) == ["epoch_002.pth", "epoch_003.pth"]
    assert (save / "best.pth").is_file() and (save / "last.pth").is_file()
    assert len(re.findall(r"^epoch \d/3: train loss", proc.stdout, re.M)) == 3
    last = load(save / "last.pth")
    assert last["epoch"] == 3 and last["step"] == 0
    assert {"model", "optimizer", "scheduler", "config", "classes", "best_acc"} <= last.keys()
    assert last["classes"] == [str(i) for i in range(10)]
    assert last["config"]["width_div"] == 16 and last["config"]["image_size"] == 32
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    best = load(save / "best.pth")
    assert best["val_acc"] == pytest.approx(last["best_acc"])  # chosen on the validation split
    assert not list(save.glob(".*tmp*"))


def test_training_lowers_the_loss(trained):
    """The test loss of the trained weights is below that of the same network at initialisation."""
    data, save, _ = trained
    ckpt = load(save / "last.pth")
    c = dict(ckpt["config"], data_dir=str(data))
    test_data = imagedata.load_split(c, False, torch.device("cpu"))
    torch.manual_seed(c["seed"])  # train.py's initial weights
    model = net.build_model(c, 10)
    initial_loss, _, _ = train.evaluate(model, test_data, 128, torch.device("cpu"), None)
    model.load_state_dict(ckpt["model"])
    final_loss, final_acc, _ = train.evaluate(model, test_data, 128, torch.device("cpu"), None)
    assert final_loss < initial_loss - 0.1
    assert final_acc > 0.2  # chance is 0.1


def test_test_script_prints_predictions_and_accuracy(trained):
    data, save, _ = trained
    proc = run_script("test.py", "--checkpoint", save / "best.pth", "--data-dir", data, "--show", "5",
                      "--device", "cpu", check=True)
    lines = re.findall(r'^Predicted: "(\d)", Actual: "(\d)"$', proc.stdout, re.M)
    assert len(lines) == 5
    m = re.search(r"^test accuracy: (\d+)/128 = ([\d.]+)%$", proc.stdout, re.M)
    assert m, proc.stdout
    best = load(save / "best.pth")
    assert int(m.group(1)) / 128 == pytest.approx(best["test_acc"])
    # the labels printed are the real ones of the first five test images
    labels = imagedata.load_split(dict(best["config"], data_dir=str(data)), False, torch.device("cpu")).labels[:5]
    assert [int(a) for _, a in lines] == labels.tolist()


def test_resume_continues_at_next_epoch_with_saved_state(trained, tmp_path):
    data, save, _ = trained
    copy = tmp_path / "save"
    copy.mkdir()
    for f in ("last.pth",):
        (copy / f).write_bytes((save / f).read_bytes())
    before = load(copy / "last.pth")
    proc = run_script("train.py", "--resume", "--epochs", "4", "--data-dir", data, "--save-dir", copy, check=True)
    assert "resumed" in proc.stdout and "epoch 4/4: train loss" in proc.stdout
    assert "epoch 1/4" not in proc.stdout and "epoch 3/4" not in proc.stdout
    after = load(copy / "last.pth")
    assert after["epoch"] == 4
    # 461 images (51 of the 512 held out for validation) / 32: 15 steps more
    assert after["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] + 15
    assert after["config"]["width_div"] == 16  # the checkpoint's settings, not the script's defaults


@pytest.mark.quick
def test_each_step_trains_at_the_rate_of_the_schedule(tmp_path, monkeypatch):
    """The scheduler steps after the optimizer: step k uses LR * factor(k) from the warm-up's first step on
    (a scheduler stepped first would skip it). 64 images of batch 32: 2 steps an epoch, 4 in all."""
    data = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    # devices.fused_step tries one step of its own, once per process: done here, before the hook,
    # so that the hook sees only the run's steps (alone, this test saw the trial's two as well)
    devices.fused_step(torch.device("cpu"))
    used = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs:
                                            used.append(optimizer.param_groups[0]["lr"]))
    try:
        run_train_in_process(monkeypatch, *TINY, "--epochs", "2", "--warmup-epochs", "1", "--val-fraction", "0",
                             "--data-dir", data, "--save-dir", tmp_path / "save")
    finally:
        hook.remove()
    # warm-up (k + 1) / 2 for k = 0, 1; then cosine over the last 2 steps: 1, then cos(pi / 2) halfway
    assert used == pytest.approx([0.05 * 0.5, 0.05, 0.05, 0.05 * 0.5])


@pytest.mark.quick
def test_label_smoothing_is_in_the_training_loss_only(tmp_path, monkeypatch):
    """--label-smoothing softens the targets of the loss that trains; validation and test losses stay plain
    cross-entropy, so they compare across runs. A checkpoint from before the setting resumes without it."""
    data = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    save = tmp_path / "save"
    calls = []
    plain = torch.nn.functional.cross_entropy

    def recording(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs.get("label_smoothing", 0.0)))
        return plain(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", recording)
    run_train_in_process(monkeypatch, *TINY, "--label-smoothing", "0.2", "--data-dir", data, "--save-dir", save)
    assert {s for grad, s in calls if grad} == {0.2} and {s for grad, s in calls if not grad} == {0.0}
    ckpt = load(save / "last.pth")
    assert ckpt["config"]["label_smoothing"] == 0.2
    del ckpt["config"]["label_smoothing"], ckpt["format"]  # a file from before the setting
    checkpoints.save(ckpt, save / "last.pth")
    calls.clear()
    run_train_in_process(monkeypatch, "--resume", "--epochs", "2", "--data-dir", data, "--save-dir", save)
    assert {s for grad, s in calls if grad} == {0.0}


@pytest.mark.quick
def test_tta_averages_the_logits_of_each_image_and_its_mirror_image():
    torch.manual_seed(0)
    model = net.vgg(16, num_classes=3, batch_norm=True, width_div=16).eval()
    x = torch.randn(4, 3, 32, 32)
    mirrored = x[..., torch.arange(31, -1, -1)]  # column j from column 31 - j: left and right swap
    with torch.no_grad():
        plain, averaged = model(x), (model(x) + model(mirrored)) / 2
        assert torch.equal(imagedata.predict(model, x), plain)
        # at initialisation the logits are about 1e-3: compare relative to that
        assert torch.allclose(imagedata.predict(model, x, tta=True), averaged, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(averaged, plain, rtol=1e-2, atol=0)


@pytest.mark.quick
def test_tta_shift_adds_the_images_moved_down_right_and_up_left_and_their_mirror_images():
    torch.manual_seed(0)
    model = net.vgg(16, num_classes=3, batch_norm=True, width_div=16).eval()
    x = torch.randn(2, 3, 64, 64)
    # moved 2 px (1/32 of 64) down and right: row i, column j shows the pixel (i - 2, j - 2), and
    # the two rows and columns that come in repeat the top and left edges
    down = F.pad(x, (2, 0, 2, 0), mode="replicate")[..., :64, :64]
    up = F.pad(x, (0, 2, 0, 2), mode="replicate")[..., 2:, 2:]
    assert torch.equal(down[:, :, 10, 20], x[:, :, 8, 18]) and torch.equal(down[:, :, 0, 1], x[:, :, 0, 0])
    assert torch.equal(imagedata.move(x, 2), down) and torch.equal(imagedata.move(x, -2), up)
    with torch.no_grad():
        views = [x, down, up]
        averaged = sum(model(v) + model(v.flip(3)) for v in views) / 6
        got = imagedata.predict(model, x, tta=True, shift=1)
        assert torch.allclose(got, averaged, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(got, imagedata.predict(model, x, tta=True), rtol=1e-2, atol=0)
        # the shift only counts with the mirror images (check_settings refuses it without them)
        assert torch.equal(imagedata.predict(model, x, shift=1), model(x))


def test_tta_scores_every_epoch_and_test_py_follows_the_checkpoint(tmp_path, monkeypatch, capsys):
    """--tta: validation (which chooses best.pth) and test are scored on mirror-averaged logits; test.py
    does the same for such a checkpoint (--tta auto) and prints the accuracy train.py's evaluate gives;
    --tta off, or a checkpoint from before the setting, scores the plain logits."""
    data = make_folder(tmp_path / "data", n_train=60, n_test=30)
    save = tmp_path / "save"
    run_train_in_process(monkeypatch, *TINY, "--dataset", "folder", "--batch-size", "8", "--epochs", "4", "--tta",
                         "--tta-shift", "2", "--amp", "off",
                         "--data-dir", data, "--save-dir", save)
    ckpt = load(save / "last.pth")
    assert ckpt["config"]["tta"] is True and ckpt["config"]["tta_shift"] == 2
    c = ckpt["config"]
    model = net.build_model(c, 3)
    model.load_state_dict(ckpt["model"])
    cpu = torch.device("cpu")
    _, val_data = imagedata.load_train_val(c, cpu)
    test_data = imagedata.load_split(c, False, cpu, classes=ckpt["classes"])
    with open(save / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    for split, data_split in (("test", test_data), ("val", val_data)):
        mirrored = train.evaluate(model, data_split, 32, cpu, None, tta=True, tta_shift=2)
        plain = train.evaluate(model, data_split, 32, cpu, None)
        # metrics.csv keeps 6 decimals; the plain loss is further off than that (the patches of these
        # images run across their whole width, so a mirror image changes little)
        assert float(row[f"{split}_loss"]) == pytest.approx(mirrored[0], abs=2e-6), split
        assert abs(float(row[f"{split}_loss"]) - plain[0]) > 1e-5, split
        if split == "test":  # every view test.py is asked for below
            accuracy = {(True, 2): mirrored[1], (False, 0): plain[1]}
            accuracy |= {(True, k): train.evaluate(model, data_split, 32, cpu, None, tta=True, tta_shift=k)[1]
                         for k in (0, 1)}

    spec = importlib.util.spec_from_file_location("test_script_tta", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen, predict = [], imagedata.predict
    monkeypatch.setattr(imagedata, "predict",
                        lambda m, x, tta=False, shift=0: seen.append((tta, shift)) or predict(m, x, tta, shift))
    # a file from before the settings
    old = {k: v for k, v in ckpt["config"].items() if k not in ("tta", "tta_shift")}
    checkpoints.save({k: v for k, v in ckpt.items() if k != "format"} | {"config": old},
                     save / "old.pth")
    capsys.readouterr()
    for name, flags, expected in (("last.pth", [], (True, 2)), ("last.pth", ["--tta", "off"], (False, 0)),
                                  ("last.pth", ["--tta-shift", "0"], (True, 0)),
                                  ("old.pth", [], (False, 0)), ("old.pth", ["--tta", "on"], (True, 0)),
                                  ("old.pth", ["--tta", "on", "--tta-shift", "1"], (True, 1))):
        seen.clear()
        monkeypatch.setattr("sys.argv", ["test.py", "--checkpoint", str(save / name), "--data-dir", str(data),
                                         "--device", "cpu", "--grid", "0", *flags])
        script.main()
        out = capsys.readouterr().out
        assert seen and set(seen) == {expected}, (name, flags)
        header = next(line for line in out.splitlines() if line.startswith(str(save / name)))
        assert ("(tta)" in header) == expected[0] and ("moved" in header) == bool(expected[1])
        correct = round(accuracy[expected] * 30)
        assert f"test accuracy: {correct}/30 = {correct / 30:.2%}" in out, (name, flags)


def test_without_test_every_epoch_the_test_split_is_scored_once_on_best_pth(tmp_path, monkeypatch, capsys):
    """--no-test-every-epoch: the epochs score only the validation split (metrics.csv's test columns and
    the epoch files' test_acc stay empty); after the last epoch best.pth alone is tested, the accuracy
    said on the console and stored in best.pth, the value train.evaluate gives for its weights."""
    data = make_mnist(tmp_path / "data", n_train=320, n_test=96)
    save = tmp_path / "save"
    scored = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda m, d, *a, **k: scored.append(len(d)) or evaluate(m, d, *a, **k))
    run_train_in_process(monkeypatch, *TINY, "--epochs", "3", "--keep", "0", "--amp", "off",
                         "--no-test-every-epoch", "--data-dir", data, "--save-dir", save)
    out = capsys.readouterr().out
    assert scored == [32, 32, 32, 96]  # three validations, then one test
    with open(save / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["test_acc"] == r["test_loss"] == "" and r["val_acc"] for r in rows)
    assert all(load(save / f"epoch_{e:03d}.pth")["test_acc"] is None for e in (1, 2, 3))
    assert (save / "curves.png").stat().st_size > 0
    best = load(save / "best.pth")
    c = best["config"]
    assert c["test_every_epoch"] is False
    model = net.build_model(c, 10)
    model.load_state_dict(best["model"])
    test_data = imagedata.load_split(c, False, torch.device("cpu"), classes=best["classes"])
    loss, acc, _ = evaluate(model, test_data, 64, torch.device("cpu"), None)
    assert best["test_acc"] == pytest.approx(acc)
    assert f"best.pth (epoch {best['epoch']}): test loss {loss:.4f} acc {acc:.2%}" in out
    assert not any("test loss" in line for line in out.splitlines() if line.startswith("epoch "))

    # --resume of the finished run tests best.pth again; a best.pth that cannot be read is said in one
    # line, and left as it is
    (save / "best.pth").write_bytes(b"not a checkpoint")
    run_train_in_process(monkeypatch, *TINY, "--epochs", "3", "--resume", "--no-test-every-epoch",
                         "--data-dir", data, "--save-dir", save)
    captured = capsys.readouterr()
    assert f"warning: could not test {save / 'best.pth'}: " in captured.err
    assert (save / "best.pth").read_bytes() == b"not a checkpoint"


def test_same_seed_same_weights(tmp_path, mnist_root):
    runs = []
    for name in ("a", "b"):
        run_script("train.py", *TINY, "--data-dir", mnist_root, "--save-dir", tmp_path / name, check=True)
        runs.append(load(tmp_path / name / "last.pth")["model"])
    assert not weight_differences(runs[0], runs[1])


@pytest.mark.parametrize("stop", [None, signal.SIGTERM])
def test_a_run_called_in_process_gives_back_the_signal_handlers_it_found(stop, tmp_path, monkeypatch, capsys):
    """train.run() from a notebook or another script: after it, Ctrl-C and SIGTERM do what they did before
    (the run's own handler would swallow the next Ctrl-C), whether the run ended or was stopped."""
    found = {s: signal.getsignal(s) for s in devices.STOP_SIGNALS}
    if stop is not None:
        step_done = runstate.EpochProgress.step_done

        def signalled(self, *args):
            signal.raise_signal(stop)
            step_done(self, *args)
        monkeypatch.setattr(runstate.EpochProgress, "step_done", signalled)
    data = make_mnist(tmp_path / "data", n_train=64, n_test=32)
    try:
        code, err = call(train.run, "train.py", [*TINY, "--data-dir", data, "--save-dir", tmp_path / "save"],
                         capsys)
        assert code == (0 if stop is None else 128 + stop), err
        assert {s: signal.getsignal(s) for s in devices.STOP_SIGNALS} == found
    finally:
        for s, h in found.items():
            signal.signal(s, h)


def test_own_image_folders_train_and_test_py_reads_them(tmp_path):
    """--dataset folder: train/ and test/ of class folders, read through DataLoader workers."""
    data = make_folder(tmp_path / "data", n_train=60, n_test=30)
    save = tmp_path / "save"
    run_script("train.py", *TINY, "--dataset", "folder", "--batch-size", "16", "--workers", "2", "--data-dir", data,
               "--save-dir", save, check=True)
    last = load(save / "last.pth")
    assert last["classes"] == ["cat", "dog", "ship"] and last["epoch"] == 1
    assert last["scheduler"]["last_epoch"] == 4  # 60 images, batch 16
    proc = run_script("test.py", "--checkpoint", save / "last.pth", "--data-dir", data, "--show", "3",
                      "--device", "cpu", check=True)
    assert re.search(r'^Predicted: "(cat|dog|ship)", Actual: "cat"$', proc.stdout, re.M)
    assert re.search(r"^test accuracy: \d+/30 = [\d.]+%$", proc.stdout, re.M)


@pytest.mark.parametrize("script", ["train.py", "test.py", "bench.py"])
def test_help_lists_every_constant_of_the_settings_block(script):
    """The three scripts build their command lines one way: each constant of the block frozen right after
    it is a flag with its comment as help; a constant defined below the freeze is none."""
    spec = importlib.util.spec_from_file_location(f"settings_of_{script[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)  # not `import test`: that is Python's own package
    spec.loader.exec_module(module)
    proc = run_script(script, "--help", check=True)
    for name in module.DEFAULTS:
        assert "--" + name.lower().replace("_", "-") in proc.stdout, name
    below = [name for name in vars(module) if name.isupper() and name not in module.DEFAULTS]
    assert below and not [n for n in below if "--" + n.lower().replace("_", "-") + " " in proc.stdout]
    if script == "train.py":
        assert "(default: 224)" in proc.stdout  # IMAGE_SIZE, with the comment from the constant's line
        assert "network input side in pixels" in proc.stdout


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists(),
                    reason=f"real MNIST not found under {REAL_DATA} (set DATA_DIR)")
def test_real_mnist_reaches_95_percent(tmp_path):
    """The honest proof that training works: one epoch (422 steps; 6,000 images are held out for
    validation) of a 1/8-width VGG16 at 32 px."""
    proc = run_script("train.py", "--data-dir", REAL_DATA, "--image-size", "32", "--width-div", "8",
                      "--epochs", "1", "--batch-size", "128", "--device", "cpu", "--save-dir", tmp_path, check=True)
    acc = load(tmp_path / "best.pth")["test_acc"]
    print(proc.stdout.splitlines()[-2])
    assert acc >= 0.95, proc.stdout
