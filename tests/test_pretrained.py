"""Fine-tuning from pretrained weights, with no network: torchvision-format weights are made here, in
the real format and under the real file name, in a temporary TORCH_HOME (the hub cache), or served
through a file:// URL (urllib reads those) so that the real download code runs."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

import cli
import imagedata
import net
import pretrained
from conftest import TINY, load, make_folder, make_mnist, run_script, run_train_in_process, \
    weight_differences

CPU = torch.device("cpu")
# A folder of 2 classes and a 1/16-width VGG16 at 32 px: each run takes seconds.
FOLDER_RUN = [*TINY, "--dataset", "folder", "--workers", "0", "--batch-size", "8",
              "--val-fraction", "0", "--schedule", "constant"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A model this repo trained (MNIST, 10 classes), to fine-tune onto a folder of 2 classes."""
    tmp = tmp_path_factory.mktemp("source")
    data = make_mnist(tmp / "mnist", n_train=64, n_test=16)
    run_script("train.py", *TINY, "--data-dir", data, "--save-dir", tmp / "save", check=True)
    return tmp / "save" / "best.pth"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("photos") / "d", n_train=24, n_test=6,
                       classes=("cat", "dog"))


def body(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in pretrained.HEAD}


def test_the_frozen_epoch_moves_only_the_head(source, photos, tmp_path, monkeypatch, capsys):
    """Every pretrained tensor (BatchNorm statistics included) is bitwise unchanged after the frozen
    epoch; the new head, sized for 2 classes, has moved."""
    run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--save-dir", tmp_path,
                         "--pretrained", source, "--epochs", "1")
    out = capsys.readouterr().out
    assert "pretrained: best.pth (mnist, epoch 1), new head for 2 classes" in out
    before, after = load(source)["model"], load(tmp_path / "last.pth")["model"]
    assert not weight_differences(body(before), body(after))
    assert after["classifier.6.weight"].shape == (2, 4096 // 16)
    torch.manual_seed(0)  # the head the run began with: the seeded fresh model's
    fresh = net.build_model(load(tmp_path / "last.pth")["config"], 2).state_dict()
    assert not torch.equal(after["classifier.6.weight"], fresh["classifier.6.weight"])
    config = load(tmp_path / "last.pth")["config"]
    assert config["pretrained"] == str(source)
    # the statistics the source's weights were trained with (MNIST's), not the folder's
    assert config["normalize"] == [[0.1307], [0.3081]]


def test_after_the_unfreeze_the_body_trains_at_a_tenth_of_the_rate(source, photos, tmp_path,
                                                                    monkeypatch):
    run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--save-dir", tmp_path,
                         "--pretrained", source, "--epochs", "2", "--lr", "0.04")
    last = load(tmp_path / "last.pth")
    lrs = sorted({g["lr"] for g in last["optimizer"]["param_groups"]})
    assert lrs == pytest.approx([0.004, 0.04])
    heads = [g for g in last["optimizer"]["param_groups"] if g["lr"] == pytest.approx(0.04)]
    assert sum(len(g["params"]) for g in heads) == 2  # the head's weight and bias only
    assert weight_differences(body(load(source)["model"]), body(last["model"]))  # it trained


def test_the_learning_rate_of_each_group_at_each_step(source, photos, tmp_path, monkeypatch):
    """Recorded at every optimizer step: the body's rate is LR x 0.1 x the schedule's factor, the
    head's LR x the factor, and the body has no gradients while frozen."""
    seen = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append([(g["lr"], any(p.grad is not None for p in g["params"]))
                     for g in self.param_groups])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--save-dir", tmp_path,
                         "--pretrained", source, "--epochs", "2", "--lr", "0.04",
                         "--schedule", "cosine")
    steps = len(seen)
    assert steps == 6  # 24 images, batch 8, 2 epochs
    for k, groups in enumerate(seen):
        factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / steps)).item())
        frozen = k < 3
        for lr, has_grad in groups[:-2]:  # body groups first
            assert lr == pytest.approx(0.004 * factor)
            assert has_grad == (not frozen)
        for lr, has_grad in groups[-2:]:
            assert lr == pytest.approx(0.04 * factor) and has_grad


def test_resume_across_the_unfreeze_is_exact(source, photos, tmp_path, monkeypatch):
    run = [*FOLDER_RUN, "--data-dir", photos, "--pretrained", source]
    run_train_in_process(monkeypatch, *run, "--epochs", "3", "--save-dir", tmp_path / "straight")
    run_train_in_process(monkeypatch, *run, "--epochs", "1", "--save-dir", tmp_path / "split")
    run_train_in_process(monkeypatch, *run, "--resume", "--epochs", "3",
                         "--save-dir", tmp_path / "split")
    assert not weight_differences(load(tmp_path / "split" / "last.pth")["model"],
                                  load(tmp_path / "straight" / "last.pth")["model"])


def test_test_script_preprocesses_as_the_fine_tune_did(source, photos, tmp_path, monkeypatch):
    run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--save-dir", tmp_path,
                         "--pretrained", source, "--epochs", "1")
    ckpt = load(tmp_path / "best.pth")
    proc = run_script("test.py", "--checkpoint", tmp_path / "best.pth", "--device", "cpu",
                      "--grid", "0", check=True)
    reported = float(proc.stdout.split("test accuracy: ")[1].split("= ")[1].split("%")[0]) / 100
    assert reported == pytest.approx(ckpt["test_acc"], abs=1e-4)
    img = next((photos / "test" / "cat").iterdir())
    proc = run_script("test.py", "--checkpoint", tmp_path / "best.pth", "--device", "cpu",
                      "--image", img, check=True)
    assert "Predicted:" in proc.stdout


@pytest.mark.parametrize("bad,words", [
    (["--width-div", "8"], ["holds a VGG16_bn width/16", "width/8"]),
    (["--no-batch-norm"], ["holds a VGG16_bn", "VGG16 width/16"]),
    (["--pretrained", "nowhere.pth"], ["nowhere.pth", "no such file"]),
    (["--pretrained", "imagenet"], ["imagenet", "--width-div 1"]),
])
def test_a_pretrained_source_that_does_not_fit_is_one_line(bad, words, source, photos, tmp_path,
                                                           monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--pretrained",
                             source, *bad, "--save-dir", tmp_path / "save")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "save").exists()


# ------------------------------------------------------------------ torchvision's ImageNet weights

@pytest.fixture(scope="module")
def vgg11_file(tmp_path_factory):
    """torchvision's vgg11 with random weights, saved as the IMAGENET1K_V1 file is (a state dict)
    under a name that carries the first hex digits of its own SHA-256, as torchvision's do."""
    import torchvision
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    model = torchvision.models.vgg11()
    raw = folder / "raw.pth"
    torch.save(model.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    named = folder / f"vgg11-{digest[:8]}.pth"
    raw.rename(named)
    return named


def in_hub_cache(weights: Path, url: str, tmp_path, monkeypatch) -> Path:
    """`weights` under the name of `url` in a temporary TORCH_HOME's hub cache, where torchvision
    looks before it downloads (a hard link: no second 507 MB written)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    os.link(weights, cached)
    return cached


def test_imagenet_weights_load_offline_from_the_hub_cache(vgg11_file, tmp_path, monkeypatch):
    """The file under its real name in $TORCH_HOME/hub/checkpoints loads without a network, and the
    network gives the same outputs as torchvision's vgg11 with those weights."""
    import torchvision
    url, categories = pretrained.imagenet_weights("vgg11")
    cached = in_hub_cache(vgg11_file, url, tmp_path, monkeypatch)
    c = {"depth": 11, "batch_norm": False, "width_div": 1, "dropout": 0.5,
         "pretrained": "imagenet"}
    source = pretrained.fetch(c)
    names = source.classes
    assert source.what == "vgg11 IMAGENET1K_V1" and names == categories and len(names) == 1000
    assert source.normalize == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
    assert source.file == cached
    ours = net.build_model(c, 1000)
    assert pretrained.load_into(ours, source, names) == "own"  # ImageNet's own head
    theirs = torchvision.models.vgg11()
    theirs.load_state_dict(torch.load(vgg11_file, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)
        small = net.build_model(c, 5)
        assert pretrained.load_into(small, source, [str(k) for k in range(5)]) == "new"
        assert torch.equal(small.features(x), theirs.features(x))


def test_the_download_runs_through_a_file_url_and_checks_the_hash(vgg11_file, tmp_path,
                                                                  monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    c = {"depth": 11, "batch_norm": False, "width_div": 1, "dropout": 0.5, "pretrained": "imagenet"}
    monkeypatch.setattr(pretrained, "imagenet_weights",
                        lambda name: (vgg11_file.as_uri(), ["x"] * 1000))
    pretrained.fetch(c, progress=False)
    downloaded = home / "hub" / "checkpoints" / vgg11_file.name
    assert downloaded.read_bytes() == vgg11_file.read_bytes()
    # the same bytes under a name whose hash digits do not match: refused, nothing kept
    wrong = tmp_path / "vgg11-00000000.pth"
    os.link(vgg11_file, wrong)
    monkeypatch.setattr(pretrained, "imagenet_weights", lambda name: (wrong.as_uri(), ["x"] * 1000))
    with pytest.raises(cli.UserError, match="SHA-256"):
        pretrained.fetch(c, progress=False)
    assert sorted(p.name for p in downloaded.parent.iterdir()) == [vgg11_file.name]


def test_offline_without_the_file_is_one_line_naming_url_file_and_folder(tmp_path, monkeypatch,
                                                                          capsys):
    """No network (a port on this machine where nothing listens) and an empty hub cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    url = "http://127.0.0.1:9/vgg16_bn-6c64b313.pth"
    monkeypatch.setattr(pretrained, "imagenet_weights", lambda name: (url, ["x"] * 1000))
    photos = make_folder(tmp_path / "d", n_train=4, n_test=2, classes=("a", "b"))
    with pytest.raises(SystemExit) as e:
        run_train_in_process(monkeypatch, "--dataset", "folder", "--data-dir", photos,
                             "--pretrained", "imagenet", "--image-size", "32", "--device", "cpu",
                             "--save-dir", tmp_path / "save")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert url in err and "vgg16_bn-6c64b313.pth" in err
    assert str(home / "hub" / "checkpoints") in err
    assert not (tmp_path / "save").exists()
    assert not list((home / "hub" / "checkpoints").glob("*")) if (home / "hub").exists() else True


def test_a_fine_tune_from_imagenet_weights_end_to_end(vgg11_file, tmp_path, monkeypatch, capsys):
    """train.py --pretrained imagenet at full width (vgg11 at 32 px, 1 epoch), then test.py: the
    checkpoint records the source and ImageNet's statistics, and digits become 3 grey channels."""
    url, _ = pretrained.imagenet_weights("vgg11")
    in_hub_cache(vgg11_file, url, tmp_path, monkeypatch)
    data = make_mnist(tmp_path / "mnist", n_train=16, n_test=8)
    run_train_in_process(monkeypatch, "--data-dir", data, "--pretrained", "imagenet", "--depth",
                         "11", "--no-batch-norm", "--image-size", "32", "--batch-size", "8",
                         "--epochs", "1", "--device", "cpu", "--val-fraction", "0", "--keep", "1",
                         "--save-dir", tmp_path / "save")
    assert "pretrained: vgg11 IMAGENET1K_V1, new head for 10 classes" in capsys.readouterr().out
    ckpt = load(tmp_path / "save" / "best.pth")
    assert ckpt["config"]["pretrained"] == "imagenet"
    assert ckpt["config"]["normalize"] == [list(pretrained.IMAGENET_MEAN),
                                           list(pretrained.IMAGENET_STD)]
    c = ckpt["config"]
    data_split = imagedata.load_split(c, False, CPU)
    x, _ = next(data_split.batches(torch.arange(1), 1))
    raw = data_split.images[0].float() / 255  # (1, 28, 28) grey
    up = torch.nn.functional.interpolate(raw[None], size=(32, 32), mode="bilinear",
                                         align_corners=False)[0, 0]
    for ch in range(3):  # each channel: the grey image normalized with that channel's statistics
        expected = (up - pretrained.IMAGENET_MEAN[ch]) / pretrained.IMAGENET_STD[ch]
        assert torch.allclose(x[0, ch], expected, atol=1e-5)


# ------------------------------------------------------------------ sources that mislead, round four

def one_error(monkeypatch, capsys, *args) -> str:
    """train.py ARGS in this process, expected to stop with one line and exit code 2."""
    with pytest.raises(SystemExit) as e:
        run_train_in_process(monkeypatch, *args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_state_dict_saved_from_a_ddp_or_compiled_model_loads(source, photos, tmp_path,
                                                               monkeypatch, capsys):
    """A torchvision-format file whose keys carry DDP's `module.` (or torch.compile's `_orig_mod.`)
    loads like the plain network's, instead of being blamed on --depth or --batch-norm."""
    state = load(source)["model"]
    for prefix in ("module.", "_orig_mod."):
        wrapped = tmp_path / f"{prefix.strip('.')}.pth"
        torch.save({prefix + k: v for k, v in state.items()}, wrapped)
        run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--pretrained",
                             wrapped, "--epochs", "1", "--save-dir", tmp_path / prefix)
        after = load(tmp_path / prefix / "last.pth")["model"]
        assert not weight_differences(body(state), body(after))
    capsys.readouterr()


def test_a_legacy_pickle_as_pretrained_is_one_line_without_torch_warnings(photos, tmp_path):
    """A plain pickle of a state dict (no zip container): torch warned about its pickle protocol
    in two lines before the error. Run as a user runs it, so that every warning reaches stderr."""
    import pickle
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"features.0.weight": torch.zeros(1)}, f)
    proc = run_script("train.py", *FOLDER_RUN, "--data-dir", photos, "--pretrained", raw,
                      "--save-dir", tmp_path / "save")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert str(raw) in line and "weights_only" in line
    assert not (tmp_path / "save").exists()


def test_weights_that_are_not_finite_are_refused_and_a_first_epoch_divergence_says_no_checkpoint(
        source, photos, tmp_path, monkeypatch, capsys):
    state = dict(load(source)["model"])
    state["features.0.weight"] = state["features.0.weight"].clone()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(state, nan)
    err = one_error(monkeypatch, capsys, *FOLDER_RUN, "--data-dir", photos, "--pretrained", nan,
                    "--save-dir", tmp_path / "save")
    assert str(nan) in err and "not finite" in err and "features.0.weight" in err
    assert not (tmp_path / "save").exists()
    # a run that diverges before its first save has no good checkpoint to speak of
    with pytest.raises(SystemExit) as e:
        run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--lr", "1e30",
                             "--save-dir", tmp_path / "diverged")
    err = capsys.readouterr().err
    line, = [l for l in err.splitlines() if "error:" in l]
    assert e.value.code == 3 and "no checkpoint of this run was written" in line
    assert "last good checkpoint" not in line


def test_a_wrong_file_in_the_hub_cache_is_named_with_how_to_remove_it(vgg11_file, tmp_path,
                                                                       monkeypatch, capsys):
    """A valid state dict of other shapes under the ImageNet file's name (a vgg11 where vgg11_bn
    belongs): the line names the cached file and says to delete it, not the run's settings."""
    url, _ = pretrained.imagenet_weights("vgg11_bn")
    cached = in_hub_cache(vgg11_file, url, tmp_path, monkeypatch)
    photos = make_folder(tmp_path / "d", n_train=4, n_test=2, classes=("a", "b"))
    err = one_error(monkeypatch, capsys, "--dataset", "folder", "--data-dir", photos,
                    "--pretrained", "imagenet", "--depth", "11", "--image-size", "32",
                    "--device", "cpu", "--workers", "0", "--save-dir", tmp_path / "save")
    assert str(cached) in err and "delete" in err and "--depth" not in err, err
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("flag, value", [("--freeze-epochs", "2"), ("--backbone-lr-mult", "0.5")])
def test_fine_tune_settings_without_pretrained_weights_are_one_line(flag, value, photos, tmp_path,
                                                                    monkeypatch, capsys):
    err = one_error(monkeypatch, capsys, *FOLDER_RUN, "--data-dir", photos, flag, value,
                    "--save-dir", tmp_path / "save")
    assert flag in err and "--pretrained" in err
    assert not (tmp_path / "save").exists()


def test_freezing_every_epoch_is_said(source, photos, tmp_path, monkeypatch, capsys):
    run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--pretrained", source,
                         "--freeze-epochs", "3", "--epochs", "2", "--save-dir", tmp_path)
    err = capsys.readouterr().err
    assert "--freeze-epochs 3" in err and "never" in err
    assert not weight_differences(body(load(source)["model"]),
                                  body(load(tmp_path / "last.pth")["model"]))


def test_the_same_classes_in_another_order_keep_their_head_by_name(tmp_path):
    """A source trained on ["dog", "cat", "ant"] fine-tuned onto a folder listed as ["ant", "cat",
    "dog"]: the head's rows follow the names, so each class's logit is the one the source gave
    that class (against the source network's own outputs)."""
    c = {"depth": 16, "batch_norm": True, "width_div": 16, "dropout": 0.0}
    torch.manual_seed(1)
    theirs = net.build_model(c, 3).eval()
    src = pretrained.Source(theirs.state_dict(), ["dog", "cat", "ant"], "src.pth", [], Path("s"),
                            "")
    ours = net.build_model(c, 3).eval()
    assert pretrained.load_into(ours, src, ["ant", "cat", "dog"]) == "reordered"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x)[:, [2, 1, 0]], atol=1e-6)
    other = net.build_model(c, 3)
    assert pretrained.load_into(other, src, ["ant", "bee", "dog"]) == "new"


def test_after_the_unfreeze_batchnorm_statistics_follow_the_new_data(source, photos, tmp_path,
                                                                      monkeypatch):
    """The frozen epoch keeps the source's BatchNorm statistics; the next one trains the body in
    train mode, so they move towards the folder's images."""
    run_train_in_process(monkeypatch, *FOLDER_RUN, "--data-dir", photos, "--pretrained", source,
                         "--epochs", "2", "--save-dir", tmp_path)
    before = load(source)["model"]
    first, second = load(tmp_path / "epoch_001.pth")["model"], load(tmp_path / "epoch_002.pth")["model"]
    stats = [k for k in before if "running_" in k]
    assert stats and all(torch.equal(first[k], before[k]) for k in stats)
    assert all(not torch.equal(second[k], before[k]) for k in stats)
