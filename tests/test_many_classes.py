"""test.py on 1,000 classes: the most confused pairs instead of a million-cell matrix, pictures that fit."""

import importlib.util
import sys

import torch

import net
import plots
import train
from conftest import ROOT


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
    cm = plots.confusion_matrix(preds, labels, n)
    text = ts.format_tables(cm, [f"class{i}" for i in range(n)])
    assert len(text) < 200_000
    assert "confusion matrix (rows" not in text and "most confused" in text
    assert "class0 -> class999: 1 (33.3% of class0)" in text


