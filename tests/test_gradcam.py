"""Grad-CAM and the mistakes report: the heat maps checked against an independent computation and
against where the evidence really is; mistakes.csv and the metrics against the predictions."""

import csv
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import gradcam
import imagedata
import net
import train
from conftest import load_script, make_mnist, run_train_in_process

CPU = torch.device("cpu")


def config(**more) -> dict:
    return {k.lower(): v for k, v in train.DEFAULTS.items()} | {
        "image_size": 32, "width_div": 16, "device": "cpu"} | more


@pytest.mark.quick
@pytest.mark.parametrize("depth,size,name", [(16, 224, "conv5_3"), (16, 32, "conv4_3"),
                                             (11, 32, "conv4_2"), (19, 64, "conv5_4"),
                                             (16, 48, "conv4_3")])
def test_the_layer_is_the_last_block_with_a_map_of_4x4_or_more(depth, size, name):
    model = net.build_model(config(depth=depth, image_size=size), 10)
    index, label = gradcam.cam_layer(model, size)
    assert label.startswith(name + " ReLU") and isinstance(model.features[index], torch.nn.ReLU)
    with torch.device("meta"):
        maps = model.to("meta").features[:index + 1](torch.empty(1, 3, size, size))
    assert maps.shape[-1] >= 4 and maps.shape[-1] < 8 or size == 224 and maps.shape[-1] == 14


@pytest.mark.quick
@pytest.mark.parametrize("batch_norm", [True, False])
def test_grad_cam_equals_an_independent_computation(batch_norm):
    """The network cut in two at the layer: the activations made a leaf tensor, the rest of the
    network run on them, the gradient of the class scores taken with respect to that leaf."""
    torch.manual_seed(0)
    c = config(batch_norm=batch_norm, image_size=48)
    model = net.build_model(c, 5).eval()
    x = torch.randn(3, 3, 48, 48)
    target = torch.tensor([0, 3, 4])
    layer, _ = gradcam.cam_layer(model, 48)
    ours = gradcam.grad_cam(model, x, layer, target)

    with torch.no_grad():
        maps = model.features[:layer + 1](x.clone())
    leaf = maps.clone().requires_grad_()
    rest = model.features[layer + 1:](leaf)
    logits = model.classifier(torch.flatten(model.avgpool(rest), 1))
    grad, = torch.autograd.grad(logits[torch.arange(3), target].sum(), leaf)
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(1).values.view(-1, 1, 1)
    assert ours.shape == (3, 48, 48) and ours.dtype == torch.float32
    assert torch.allclose(ours, cam, atol=1e-5)
    assert not any(p.grad is not None for p in model.parameters())  # no parameter gradients


def pattern_folder(root, n_train: int, n_test: int, size: int = 224, bar: int = 24, seed: int = 0):
    """Grey noise; class "bar" holds a bright vertical bar (bar x bar/3 px) at a random place, class
    "plain" nothing. The bar's files are named after the top-left corner of its bar x bar box."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            img = rng.integers(60, 140, (size, size, 1), dtype=np.uint8).repeat(3, 2)
            r, col = rng.integers(0, size - bar, 2)
            name = ("bar", "plain")[i % 2]
            if name == "bar":
                img[r:r + bar, col + bar // 3:col + 2 * bar // 3] = 240
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}_r{r}_c{col}.png")
    return root


def test_the_heat_map_peaks_on_the_pattern_that_decides_the_class(tmp_path, monkeypatch):
    """A small VGG16 trained to tell noise with a bar at a random place from noise alone: at the
    layer cam.png uses (conv5_3, 14 x 14 at 224 px) the heat map of "bar" peaks on the bar's 24 px box
    for most test images that hold one (16 and 14 of 20 measured with two data seeds; by chance about
    1%), and within half a map cell (8 px) of it for nearly all (20 of 20 with both). Only the class
    with evidence of its own is asked: in a two-class task the other can be learnt as "no bar", and
    Grad-CAM shows positive evidence only (measured with two bar directions as the classes: 18 of 20
    peaks on one class, 1 of 20 on the other). With the weights' sign reversed the test finds 0 of 20;
    with all weights equal (plain activations) it passes too, since the bar's activations are
    strong: the weights themselves are checked by the independent computation above."""
    bar = 24
    root = pattern_folder(tmp_path / "d", n_train=240, n_test=40, bar=bar)
    run_train_in_process(monkeypatch, "--dataset", "folder", "--data-dir", root, "--image-size",
                         "224", "--width-div", "8", "--epochs", "6", "--batch-size", "16",
                         "--device", "cpu", "--workers", "0", "--val-fraction", "0", "--lr",
                         "0.02", "--augment", "off", "--save-dir", tmp_path / "s")
    ckpt = checkpoints.load(tmp_path / "s" / "best.pth")
    model = net.build_model(ckpt["config"], 2)
    model.load_state_dict(ckpt["model"])
    data = imagedata.load_split(ckpt["config"], False, CPU, classes=ckpt["classes"])
    x, y = next(iter(data.batches(torch.arange(len(data)), len(data))))
    with torch.no_grad():
        preds = model.eval()(x).argmax(1)
    assert (preds == y).float().mean() >= 0.9
    layer, name = gradcam.cam_layer(model, 224)
    assert name.startswith("conv5_3")
    has_bar = (y == ckpt["classes"].index("bar")).nonzero().flatten().tolist()
    heat = gradcam.grad_cam(model, x[has_bar], layer, y[has_bar])
    on, near, half_cell = 0, 0, 224 // 14 // 2
    for i, h in zip(has_bar, heat):
        r, col = map(int, re.search(r"_r(\d+)_c(\d+)", data.name(i)).groups())
        pr, pc = divmod(int(h.flatten().argmax()), 224)
        on += r <= pr < r + bar and col <= pc < col + bar
        near += (r - half_cell <= pr < r + bar + half_cell
                 and col - half_cell <= pc < col + bar + half_cell)
    assert on >= 0.6 * len(has_bar) and near >= 0.9 * len(has_bar), (on, near, len(has_bar))


@pytest.fixture(scope="module")
def test_script():
    return load_script("test.py", "test_script_gradcam")


def test_mistakes_csv_and_the_metrics_agree_with_the_predictions(tmp_path, test_script,
                                                                 monkeypatch, capsys):
    """An untrained model (many mistakes) on a 12-class-free MNIST: each mistakes.csv row, the count
    of rows, precision/recall/F1 and the accuracy recomputed here from the model's own logits."""
    root = make_mnist(tmp_path / "d", n_train=16, n_test=60)
    torch.manual_seed(1)
    c = config(data_dir=str(root))
    model = net.build_model(c, 10)
    checkpoints.save({"model": model.state_dict(), "config": c,
                      "classes": [str(k) for k in range(10)], "epoch": 1}, tmp_path / "m.pth")
    monkeypatch.setattr("sys.argv", ["test.py", "--checkpoint", str(tmp_path / "m.pth"),
                                     "--device", "cpu", "--grid", "0", "--cam", "4",
                                     "--mistakes", "5", "--amp", "off"])  # fp32, as below
    test_script.main()
    out = capsys.readouterr().out
    data = imagedata.load_split(c, False, CPU)
    x, y = next(iter(data.batches(torch.arange(60), 60)))
    with torch.no_grad():
        logits = model.eval()(x)
    preds = logits.argmax(1)
    correct = int((preds == y).sum())
    assert f"test accuracy: {correct}/60 = " in out
    rows = list(csv.DictReader(open(tmp_path / "mistakes.csv")))
    assert len(rows) == 60 - correct > 0
    losses = F.cross_entropy(logits, y, reduction="none")
    assert [float(r["loss"]) for r in rows] == sorted((float(r["loss"]) for r in rows),
                                                      reverse=True)
    for r in rows:
        i = int(r["image"])
        assert int(r["actual"]) == y[i] and int(r["predicted"]) == preds[i] != y[i]
        assert float(r["loss"]) == pytest.approx(float(losses[i]), abs=1e-5)
        p = torch.softmax(logits[i], 0)
        assert float(r["p_predicted"]) == pytest.approx(float(p[preds[i]]), abs=1e-5)
        assert float(r["p_actual"]) == pytest.approx(float(p[y[i]]), abs=1e-5)
    per_class = out.split("confusion matrix")[0]  # the per-class table, not the matrix below it
    table = {line.split()[0]: line.split() for line in per_class.splitlines()
             if re.match(r"^(\d|macro) ", line)}
    yn, pn = y.numpy(), preds.numpy()
    f1s = []
    for k in range(10):
        tp = int(((pn == k) & (yn == k)).sum())
        precision = tp / max(1, int((pn == k).sum()))
        recall = tp / max(1, int((yn == k).sum()))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        assert [float(v) for v in table[str(k)][4:7]] == pytest.approx([precision, recall, f1],
                                                                        abs=1e-4)
    assert float(table["macro"][-1]) == pytest.approx(np.mean(f1s), abs=1e-4)
    for picture in ("cam.png", "mistakes.png", "confusion.png"):
        assert (tmp_path / picture).stat().st_size > 0


def test_own_images_get_a_spreadsheet_and_heat_maps(tmp_path, test_script, monkeypatch, capsys):
    from PIL import Image
    torch.manual_seed(0)
    c = config()
    checkpoints.save({"model": net.build_model(c, 10).state_dict(), "config": c,
                      "classes": [str(k) for k in range(10)], "epoch": 1}, tmp_path / "m.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 30), 40 * i, np.uint8)).save(photos / f"p{i}.png")
    monkeypatch.setattr("sys.argv", ["test.py", "--checkpoint", str(tmp_path / "m.pth"),
                                     "--device", "cpu", "--image", str(photos), "--cam", "3",
                                     "--out", str(tmp_path / "out"), "--batch-size", "2"])
    test_script.main()
    printed = [line for line in capsys.readouterr().out.splitlines() if "Predicted:" in line]
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["file"] for r in rows] == [str(photos / f"p{i}.png") for i in range(5)]
    for r, line in zip(rows, printed):
        assert f'Predicted: "{r["predicted"]}"' in line and r["top_3"].startswith(r["predicted"])
    assert (tmp_path / "out" / "cam.png").stat().st_size > 0


def test_many_classes_report_top5_accuracy(tmp_path, test_script, monkeypatch, capsys):
    root = make_mnist(tmp_path / "d", n_train=16, n_test=30)
    torch.manual_seed(0)
    c = config(data_dir=str(root))
    names = [str(k) for k in range(10)] + [f"extra{k}" for k in range(2)]
    model = net.build_model(c, 12)
    checkpoints.save({"model": model.state_dict(), "config": c, "classes": names, "epoch": 1},
                     tmp_path / "m.pth")
    monkeypatch.setattr("sys.argv", ["test.py", "--checkpoint", str(tmp_path / "m.pth"),
                                     "--device", "cpu", "--grid", "0", "--cam", "0",
                                     "--mistakes", "0"])
    data = imagedata.load_split(c, False, CPU)
    x, y = next(iter(data.batches(torch.arange(30), 30)))
    with torch.no_grad():
        top5 = int((model.eval()(x).topk(5, 1).indices == y[:, None]).any(1).sum())
    test_script.main()
    assert f"top-5 accuracy: {top5}/30 = " in capsys.readouterr().out
