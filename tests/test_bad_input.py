"""Bad input of every kind is one line on stderr and exit code 2, and harms no run: options, settings,
checkpoints (damaged, crafted, of another kind), paths and devices."""

import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import imagedata
import net
import train
from conftest import ROOT, TINY, load, make_folder, run_script, weight_differences
from errors import UserError
from runs import digests, call, one_line


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


# (options, the key words of the one line they give: the setting, the value, what would work)
BAD_OPTIONS = [
    (["--dataset", "imagenet"], ["dataset", "imagenet", "mnist"]),
    (["--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    (["--ep", "3"], ["unrecognized arguments: --ep"]),                      # no silent abbreviations
    (["--batch-size", "ten"], ["--batch-size", "'ten'"]),
    (["--batch-size", "0"], ["--batch-size", "from 1", "0"]),
    (["--lr", "-0.1"], ["--lr", "positive", "-0.1"]),
    (["--image-size", "28"], ["--image-size", "from 32", "28"]),
    (["--depth", "12"], ["--depth", "11, 13, 16, 19", "12"]),
    (["--width-div", "3"], ["--width-div", "divides 64", "3"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
    (["--device", "cpu:1"], ["--device cpu:1", "1 CPU device(s)"]),
    (["--amp", "fp8"], ["--amp", "'fp8'", "bf16"]),
    (["--tta"], ["--tta", "mirror image", "mnist"]),
    # Fashion-MNIST's shoes all point the same way: a model trained without flips scored 85.09%
    # with mirror images against 92.83% without (docs/recipes.md, f10)
    (["--dataset", "fashion-mnist", "--tta"], ["--tta", "training never showed", "--augment on"]),
    (["--augment", "on", "--shift", "0"], ["--shift 0", "mnist", "never flipped"]),
    (["--shift", "17"], ["--shift", "from 0 to 16", "17"]),
    (["--shift", "1.5"], ["--shift", "'1.5'"]),
    (["--dataset", "cifar10", "--tta-shift", "1"], ["--tta-shift 1", "--tta", "off"]),
    (["--dataset", "cifar10", "--tta", "--tta-shift", "9"], ["--tta-shift", "from 0 to 8", "9"]),
    (["--schedule", "linear"], ["--schedule", "'linear'", "cosine"]),
    (["--cutout", "0.5"], ["unrecognized arguments: --cutout"]),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_even_overwrite_keeps_the_old_run(args, message, saved, capsys):
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, *args], capsys)
    assert code == 2
    assert all(word in one_line(err) for word in message), err
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
    assert proc.returncode == 2 and proc.stderr.startswith("train.py: error: --batch-size must be ")
    assert proc.stderr.count("\n") == 1
    proc = run_script("test.py", "--checkpoint", tmp_path)
    assert proc.returncode == 2 and proc.stderr == f"test.py: error: checkpoint {tmp_path} is not a file\n"


BAD_SETTINGS = [
    (["--log-every", "0"], ["--log-every", "at least 1", "0"]),
    (["--seed", "100000000000000000"], ["--seed", "from 0 to 4294967295"]),
    (["--seed", "-1"], ["--seed", "from 0 to 4294967295", "-1"]),
    (["--lr", "inf"], ["--lr", "finite", "inf"]),
    (["--lr", "nan"], ["--lr", "finite", "nan"]),
    (["--warmup-epochs", "inf"], ["--warmup-epochs", "finite", "inf"]),
    (["--weight-decay", "inf"], ["--weight-decay", "finite", "inf"]),
    (["--save-every-minutes", "nan"], ["--save-every-minutes", "finite", "nan"]),
    (["--momentum", "nan"], ["--momentum", "finite", "nan"]),
    (["--image-size", "100000"], ["--image-size", "to 2048", "100000"]),
    (["--batch-size", str(2**62)], ["--batch-size", "to 2147483647"]),
    (["--epochs", "10000000"], ["--epochs", "to 1000000"]),
    (["--workers", "100000"], ["--workers", "to 256"]),
    (["--save-dir", ""], ["--save-dir", "empty"]),
    (["--data-dir", ""], ["--data-dir", "empty"]),
]


@pytest.mark.parametrize("args,message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_and_overwrite_keeps_the_old_run(args, message, saved, data, capsys):
    before = digests(saved)
    code, err = call(train.run, "train.py", ["--overwrite", "--save-dir", saved, "--data-dir", data, *args],
                     capsys)
    assert code == 2 and all(word in one_line(err) for word in message), err
    assert digests(saved) == before


def test_a_checkpoint_config_of_the_wrong_type_is_one_line(saved, data, capsys):
    ckpt = load(saved / "last.pth")
    ckpt["config"]["lr"] = "0.1"
    torch.save(ckpt, saved / "last.pth")
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 2 and all(w in one_line(err) for w in ("LR", "number", "'0.1'", "last.pth"))


def test_empty_data_dir_variable_is_an_error_in_both_scripts(saved, tmp_path, test_script, capsys):
    spec = importlib.util.spec_from_file_location("train_env", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_DIR", "")
        script.__spec__.loader.exec_module(script)  # DATA_DIR is read when train.py starts
        code, err = call(script.run, "train.py", ["--save-dir", tmp_path / "new"], capsys)
        assert code == 2 and "data-dir" in one_line(err).lower() and "empty" in one_line(err)
        code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu"],
                         capsys)
        assert code == 2 and "DATA_DIR" in one_line(err) and "empty" in one_line(err)


@pytest.mark.parametrize("flag", ["--checkpoint", "--out", "--data-dir"])
def test_empty_path_for_test_script(flag, saved, test_script, capsys):
    args = {"--checkpoint": saved / "best.pth", "--device": "cpu", flag: ""}
    code, err = call(test_script, "test.py", [x for kv in args.items() for x in kv], capsys)
    assert code == 2 and flag in one_line(err) and "empty" in one_line(err)


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
    assert code == 2 and all(w in one_line(err) for w in ("--grid-seed", "from 0 to 4294967295"))


def test_mirror_averaging_of_a_digit_model_is_refused(saved, data, test_script, capsys):
    code, err = call(test_script, "test.py", ["--checkpoint", saved / "best.pth", "--device", "cpu",
                                              "--data-dir", data, "--tta", "on"], capsys)
    assert code == 2 and "which does not suit mnist; it is for fashion-mnist, cifar10, folder" in one_line(err)


@pytest.mark.parametrize("dataset, augment, refused", [
    ("fashion-mnist", "auto", True), ("fashion-mnist", "off", True), ("fashion-mnist", "on", False),
    ("cifar10", "auto", False), ("cifar10", "off", True), ("folder", "auto", False),
])
def test_mirror_averaging_needs_a_model_trained_on_mirror_images(dataset, augment, refused):
    """The one check both scripts run on a config (train.py's settings, a checkpoint's in test.py)."""
    c = {"dataset": dataset, "augment": augment, "tta": True}
    if refused:
        with pytest.raises(UserError, match=f"which training never showed: augmentation .* is off "
                                            f"for {dataset} \\(--augment {augment}\\)"):
            imagedata.check_settings(c)
    else:
        imagedata.check_settings(c)
    imagedata.check_settings(c | {"tta": False})


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
    assert code == 2 and "/dev/null" in one_line(err) and "not a folder" in one_line(err)
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


def test_resume_recreates_a_deleted_best_checkpoint(saved, data, capsys):
    best = load(saved / "best.pth")
    (saved / "best.pth").unlink()
    code, err = call(train.run, "train.py", ["--resume", "--save-dir", saved, "--data-dir", data], capsys)
    assert code == 0, err
    assert not weight_differences(load(saved / "best.pth")["model"], best["model"])


