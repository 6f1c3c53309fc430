"""The options of the short CPU recipes: a moving average of the weights (EMA_DECAY) and Nesterov
momentum (NESTEROV), and the schedule. Runs use the 1,024-image MNIST and a 1/16-width VGG16 at 32 px,
so each takes seconds."""

import pytest
import torch

import checkpoints
import net
from conftest import TINY, load, run_script, weight_differences

# a constant rate: 1 epoch extended by --resume to 2 trains as 2 straight do
RUN = [*TINY, "--epochs", "2", "--schedule", "constant", "--ema-decay", "0.9"]


def tiny_config(**more) -> dict:
    return {"depth": 16, "batch_norm": True, "dropout": 0.0, "width_div": 16, "image_size": 32,
            "ema_decay": 0.9, "epochs": 2, "warmup_epochs": 0.0, "schedule": "cosine", **more}


def test_the_average_follows_its_rule_with_the_warm_up(monkeypatch):
    """After n updates the average moves towards the weights by 1 - min(decay, (1 + n) / (10 + n));
    the first update copies them. Computed here in float64 from the rule, for a weight and for
    BatchNorm's running mean (averaged too), while BatchNorm's batch count is copied."""
    import train
    model = net.build_model(tiny_config(), 10)
    average = train.make_average(model, tiny_config())
    weight, mean = model.features[0].weight, model.features[1].running_mean
    expected_w = expected_m = None
    for n in range(120):  # the decay reaches its cap 0.9 at n = 80
        with torch.no_grad():
            weight.fill_(float(n % 7))
            mean.fill_(float(n % 5) - 2)
        model.features[1].num_batches_tracked.fill_(n)
        average.update_parameters(model)
        if expected_w is None:
            expected_w, expected_m = float(n % 7), float(n % 5) - 2
        else:
            step = 1 - min(0.9, n / (9 + n))  # n - 1 updates before this one
            expected_w += (float(n % 7) - expected_w) * step
            expected_m += (float(n % 5) - 2 - expected_m) * step
    averaged = average.module
    assert torch.allclose(averaged.features[0].weight, torch.full_like(weight, expected_w), atol=1e-5)
    assert torch.allclose(averaged.features[1].running_mean, torch.full_like(mean, expected_m), atol=1e-5)
    assert int(averaged.features[1].num_batches_tracked) == 119
    assert not any(p.requires_grad for p in average.parameters())
    assert train.make_average(model, tiny_config(ema_decay=0.0)) is None


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("straight_ema")
    run_script("train.py", *RUN, "--data-dir", data, "--save-dir", save, check=True)
    return save


def test_the_epoch_files_hold_the_average_and_a_resumed_run_averages_exactly(data, straight, tmp_path):
    last = load(straight / "last.pth")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert int(last["ema"]["n_averaged"]) == last["scheduler"]["last_epoch"]  # one update per step
    assert not weight_differences(load(straight / "epoch_002.pth")["model"], ema)
    # best.pth is whichever epoch validated best (on one CPU epoch 1, on another epoch 2): it holds
    # that epoch's file, which holds that epoch's average
    best = load(straight / "best.pth")
    epochs = {e: load(straight / f"epoch_{e:03d}.pth") for e in (1, 2)}
    assert best["val_acc"] == max(w["val_acc"] for w in epochs.values())
    assert not weight_differences(best["model"], epochs[best["epoch"]]["model"])
    # the average is not the trained weights (which last.pth keeps to go on training)
    assert weight_differences(last["model"], ema)

    run_script("train.py", *RUN, "--epochs", "1", "--data-dir", data, "--save-dir", tmp_path, check=True)
    run_script("train.py", "--resume", "--epochs", "2", "--data-dir", data, "--save-dir", tmp_path, check=True)
    resumed = load(tmp_path / "last.pth")
    assert not weight_differences(resumed["ema"], last["ema"])  # bitwise
    assert not weight_differences(resumed["model"], last["model"])


def test_test_py_on_last_pth_scores_the_average_like_the_epoch_it_ends(data, straight, tmp_path):
    """last.pth keeps the trained weights to go on training; test.py (and --pretrained) take the
    average from it, the network whose accuracy the run recorded."""
    proc = run_script("test.py", "--checkpoint", straight / "last.pth", "--data-dir", data, "--out", tmp_path,
                      "--device", "cpu", check=True)
    recorded = load(straight / "epoch_002.pth")["test_acc"]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("test accuracy:"))
    correct, total = map(int, line.split()[2].split("/"))
    assert correct / total == pytest.approx(recorded)
    assert not weight_differences(checkpoints.evaluated_weights(load(straight / "last.pth")),
                                  load(straight / "epoch_002.pth")["model"])


def test_nesterov_reaches_the_optimizer_and_is_refused_where_it_means_nothing(small, tmp_path):
    run_script("train.py", *TINY, "--nesterov", "--data-dir", small, "--save-dir", tmp_path, check=True)
    groups = load(tmp_path / "last.pth")["optimizer"]["param_groups"]
    assert groups and all(g["nesterov"] for g in groups)
    assert load(tmp_path / "last.pth")["config"]["nesterov"] is True
    for extra, words in ((["--optimizer", "adamw"], "adamw"), (["--momentum", "0"], "momentum")):
        proc = run_script("train.py", *TINY, "--nesterov", *extra, "--data-dir", small,
                          "--save-dir", tmp_path / "no")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--nesterov" in lines[0] and words in lines[0], proc.stderr
        assert not (tmp_path / "no").exists()


def test_a_run_saved_before_these_settings_resumes_without_them(data, tmp_path):
    """A format-2 last.pth (no ema_decay, nesterov or ema) resumes as the run it was: plain momentum
    and no average."""
    run_script("train.py", *TINY, "--data-dir", data, "--save-dir", tmp_path, check=True)
    ckpt = load(tmp_path / "last.pth")
    del ckpt["config"]["ema_decay"], ckpt["config"]["nesterov"], ckpt["ema"]
    ckpt["format"], ckpt["folder_in_memory"] = 2, None
    checkpoints.save(ckpt, tmp_path / "last.pth")
    run_script("train.py", "--resume", "--epochs", "2", "--data-dir", data, "--save-dir", tmp_path,
               check=True)
    resumed = load(tmp_path / "last.pth")
    assert resumed["format"] == checkpoints.FORMAT and resumed["ema"] is None
    assert "folder_in_memory" not in resumed
    assert (resumed["config"]["ema_decay"], resumed["config"]["nesterov"],
            resumed["config"]["shift"]) == (0.0, False, 4)
    assert {g["initial_lr"] for g in resumed["optimizer"]["param_groups"]} == {0.05}  # LR alone
    assert not any(g["nesterov"] for g in resumed["optimizer"]["param_groups"])
    assert resumed["epoch"] == 2


def test_the_average_reads_its_count_on_the_host_not_on_the_device():
    """The update's warm-up needs the number of updates so far. Read from the device it would be one
    wait for the device every step (on a GPU the host could no longer queue work ahead); the count
    lives on the host. Proven with the model on the meta device, where any read of a value
    (.item(), int(), bool()) of a device tensor raises."""
    import train
    with torch.device("meta"):
        model = net.build_model(tiny_config(), 10)
    average = train.make_average(model, tiny_config())
    for _ in range(3):
        average.update_parameters(model)
    assert average.n_averaged.device.type == "cpu" and int(average.n_averaged) == 3
    assert average.module.features[0].weight.device.type == "meta"


@pytest.mark.parametrize("damage", ["no average", "another width"])
def test_a_last_pth_whose_average_does_not_fit_is_refused_in_one_line(data, straight, tmp_path, damage):
    """A hand-edited or mixed-up last.pth: the run averages the weights (ema_decay 0.9) but the file
    holds no average, or one of another network. One line, exit 2, and the file is left as it was."""
    ckpt = load(straight / "last.pth")
    if damage == "no average":
        ckpt["ema"] = None
    else:
        other = train_average_state(width_div=8)
        ckpt["ema"] = other
    checkpoints.save(ckpt, tmp_path / "last.pth")
    before = (tmp_path / "last.pth").read_bytes()
    proc = run_script("train.py", "--resume", "--epochs", "3", "--data-dir", data, "--save-dir", tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "last.pth" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert ("average" in lines[0]) if damage == "no average" else ("different architecture" in lines[0])
    assert (tmp_path / "last.pth").read_bytes() == before


def train_average_state(**more) -> dict:
    import train
    model = net.build_model(tiny_config(**more), 10)
    return train.make_average(model, tiny_config(**more)).state_dict()
