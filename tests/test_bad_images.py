"""Unreadable image files in folder datasets: named in one line before training, or left out."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import folders
import imagedata
import net
import train
from conftest import ROOT, TINY, load, make_folder
from runs import call, one_line


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
    monkeypatch.setattr(folders, "BAD_FILES_SHOWN", 2)
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
        assert type(data) is (imagedata.DeviceImages if share else imagedata.StreamedImages)
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
    x, _, _ = script.read_image(tmp_path / "scan.png", "folder", "auto", 32)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert (x == round(20_000 / 257)).all()

