"""export.py: the ONNX and TorchScript files run without this repo, take RGB in [0, 1] at the training
size for any batch, normalize inside, carry the class names, and give what test.py --image gives;
README's onnxruntime lines run as written; bad input is one line."""

import functools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, load_script, make_folder, run_script


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """A folder model (3 classes, 32 px, 1 epoch) and 32x32 pictures of its test split's kind."""
    tmp = tmp_path_factory.mktemp("export")
    photos = make_folder(tmp / "d", n_train=48, n_test=9)
    run_script("train.py", *TINY, "--dataset", "folder", "--data-dir", photos, "--workers", "0",
               "--batch-size", "8", "--save-dir", tmp / "run", check=True)
    pictures = tmp / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        img = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
        img[8:16, :, i % 3] = 255
        Image.fromarray(img).save(pictures / f"{i}.png")
    return tmp


def test_the_onnx_file_gives_test_py_s_predictions_and_carries_the_classes(folder_model):
    """The ONNX file, run by onnxruntime on 32x32 pictures (RGB / 255), against python test.py
    --image on the same pictures (in fp32, without mirror images, as the file computes): the same
    predictions, probabilities within 1e-3; and the class names and image size in its metadata."""
    import onnxruntime
    run = folder_model / "run"
    proc = run_script("export.py", "--checkpoint", run / "best.pth", check=True)
    assert "predictions agree on 9/9" in proc.stdout and "images of the test split" in proc.stdout
    session = onnxruntime.InferenceSession(str(run / "best.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"])
    assert classes == ["cat", "dog", "ship"] and meta["image_size"] == "32"
    files = sorted((folder_model / "pictures").iterdir())
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
                  for f in files]) / 255
    logits = session.run(None, {"images": x})[0]
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    proc = run_script("test.py", "--checkpoint", run / "best.pth", "--image", *files, "--amp", "off",
                      "--tta", "off", "--top-k", "3", "--out", folder_model / "out", check=True)
    for f, p in zip(files, probs):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(f"{f}: "))
        shown = dict(re.findall(r'"(\w+)" ([\d.]+)%', line.split("top-3: ")[1]))
        assert line.split('Predicted: "')[1].split('"')[0] == classes[int(p.argmax())]
        for name, percent in shown.items():
            assert float(percent) / 100 == pytest.approx(float(p[classes.index(name)]), abs=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # torch 2.14 on TorchScript
def test_the_torchscript_file_takes_any_batch_and_names_its_classes(folder_model):
    run = folder_model / "run"
    run_script("export.py", "--checkpoint", run / "best.pth", "--out", folder_model / "ts",
               check=True)
    extra = {"classes.json": "", "input.json": ""}
    module = torch.jit.load(str(folder_model / "ts" / "best.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == ["cat", "dog", "ship"]
    assert json.loads(extra["input.json"])["image_size"] == "32"
    for n in (1, 5):
        assert module(torch.rand(n, 3, 32, 32)).shape == (n, 3)


def test_readme_s_onnxruntime_lines_run_as_written(folder_model, tmp_path):
    """The python block under README's export heading, run as it stands in a folder holding
    save_model/best.onnx and photo.jpg: it prints the class test.py --image predicts."""
    text = (ROOT / "README.md").read_text()
    section = text.split("export.py`\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    run_script("export.py", "--checkpoint", folder_model / "run" / "best.pth", "--out",
               tmp_path / "save_model", check=True)
    Image.open(sorted((folder_model / "pictures").iterdir())[0]).save(tmp_path / "photo.jpg",
                                                                      quality=95)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc2 = run_script("test.py", "--checkpoint", folder_model / "run" / "best.pth", "--image",
                       tmp_path / "photo.jpg", "--amp", "off", "--tta", "off", "--out",
                       tmp_path / "out", check=True)
    assert f'Predicted: "{proc.stdout.strip()}"' in proc2.stdout


def test_a_digit_model_is_exported_grey_and_checked_against_training_s_pipeline(data, tmp_path):
    """An MNIST model (28 px digits upsampled to 32 on the device): the file takes RGB at 32 px and
    turns it grey inside; on the test split its logits agree with those of training's pipeline."""
    run_script("train.py", *TINY, "--data-dir", data, "--save-dir", tmp_path, check=True)
    proc = run_script("export.py", "--checkpoint", tmp_path / "best.pth", check=True)
    assert "predictions agree on 100/100" in proc.stdout
    diffs = [float(d) for d in re.findall(r"largest logit difference ([\d.e+-]+)", proc.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_a_disagreement_is_exit_1_with_the_numbers(folder_model, tmp_path, monkeypatch, capsys):
    """An ONNX file that does not compute what the model does (the rows of its last layer rolled by
    one class before the export): the numbers are printed and the exit code is 1."""
    import cli
    script = load_script("export.py", "export_script_fault")
    real = torch.onnx.export

    @functools.wraps(real)  # the exporter's own parameters, as export.py looks them up
    def perturbed(module, *args, **kwargs):
        head = module.model.classifier[6]
        with torch.no_grad():
            saved = head.weight.clone(), head.bias.clone()
            head.weight.copy_(saved[0].roll(1, 0))
            head.bias.copy_(saved[1].roll(1, 0))
            real(module, *args, **kwargs)
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])
    monkeypatch.setattr(torch.onnx, "export", perturbed)
    monkeypatch.setattr(sys, "argv", ["export.py", "--checkpoint",
                                      str(folder_model / "run" / "best.pth"), "--out",
                                      str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.run_main(script.main)
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "differ" in err
    assert re.search(r"best\.onnx: largest logit difference [\d.e+-]+, predictions agree on [0-8]/9",
                     out), out


@pytest.mark.parametrize("case", ["missing", "not a checkpoint", "out under a file", "opset"])
def test_bad_input_is_one_line(case, folder_model, tmp_path):
    best = folder_model / "run" / "best.pth"
    (tmp_path / "notes.txt").write_text("mine")
    args = {"missing": ["--checkpoint", tmp_path / "none.pth"],
            "not a checkpoint": ["--checkpoint", tmp_path / "notes.txt"],
            "out under a file": ["--checkpoint", best, "--out", tmp_path / "notes.txt" / "x"],
            "opset": ["--checkpoint", best, "--opset", "8", "--out", tmp_path / "o"]}[case]
    proc = run_script("export.py", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    words = {"missing": "does not exist", "not a checkpoint": "not a PyTorch checkpoint",
             "out under a file": "--out", "opset": "--opset 8"}[case]
    assert words in line, line
    assert not list(tmp_path.glob("**/*.onnx"))
