"""Export a model train.py trained to files that run without this repo: ONNX and TorchScript.

    python export.py                                 # save_model/best.pth -> best.onnx, best.torchscript.pt
    python export.py --checkpoint runs/photos/best.pth --out exported/
    python export.py --help                          # every setting with its default

Each file takes RGB images as float32 in [0, 1] at the size the model was trained at, (N, 3, S, S)
for any N, and returns the logits, one per class (softmax gives probabilities). It normalizes the
images inside, as training did; a digit model turns them grey first (training gave it three equal
channels of a grey image). Each file names the class names, the image size and the input it
expects: ONNX metadata_props, TorchScript extra files (classes.json, input.json). Before it says
so, export.py checks the files: each one and the PyTorch model score the same test images, and the
largest logit difference and whether every prediction agrees are printed; a disagreement is exit
code 1. README shows how to classify a photo with onnxruntime and PIL alone.
"""

import inspect
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import cli
import imagedata
from errors import UserError
from imagedata import DATASETS

# ------------------------------------------------------------------------------------- settings
# Edit these, or override any of them on the command line: python export.py --opset 18
CHECKPOINT = "save_model/best.pth"  # checkpoint written by train.py (with EMA_DECAY the weights'
                                    # average is exported, the network its accuracies are of)
OUT: str | None = None   # folder for the files; None: the checkpoint's folder
OPSET = 17               # ONNX operator set version the file is written in
CHECK_IMAGES = 100       # test images each file and PyTorch score to check the files (random
                         # images where the checkpoint's test split is not on disk)
DATA_DIR: str | None = None  # dataset root for those images; None: the training one while it
                             # exists, else DATA_DIR from the environment, else ./data
# ------------------------------------------------------------------------------------------
DEFAULTS = cli.settings(globals())  # the block above ends here: a constant below is no setting

# What each value must be (a failure is one line, exit code 2).
RULES = [("opset", "from 7 to 30", lambda v: 7 <= v <= 30),
         ("check_images", "at least 1", lambda v: v >= 1)]

# What the files say of their input, in their metadata.
INPUT = "float32 RGB in [0, 1], shape (N, 3, {size}, {size}); normalized inside the model"
OUTPUT = "logits, one per class in the order of classes (softmax for probabilities)"


class WithPreprocessing(torch.nn.Module):
    """The network with the preprocessing of training: RGB in [0, 1] -> (grey, by the luma weights
    PIL's convert("L") uses) -> normalized with the run's statistics -> logits."""

    def __init__(self, model: torch.nn.Module, mean, std, grey: bool):
        super().__init__()
        self.model, self.grey = model.eval(), grey
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.grey:
            images = (images * self.luma).sum(1, keepdim=True)  # (N, 1, S, S)
        x = (images - self.mean) / self.std  # (N, 1 or 3, S, S)
        return self.model(x.expand(-1, 3, -1, -1))


def export_onnx(module, example, path: Path, opset: int, meta: dict) -> None:
    """The ONNX file, any batch size, with `meta` as its metadata_props; written whole or not at
    all. Written by torch's TorchScript-based exporter, which every torch this repo allows has."""
    import onnx
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters \
        else {}
    try:
        with checkpoints.replaced_whole(path) as tmp:
            with warnings.catch_warnings():  # the exporter's notes on tracing a fixed input size
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(tmp), input_names=["images"],
                                  output_names=["logits"], opset_version=opset,
                                  dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}}, **kwargs)
            model = onnx.load(str(tmp))
            for key, value in meta.items():
                model.metadata_props.add(key=key, value=value)
            onnx.save(model, str(tmp))
    except OSError as e:
        why = checkpoints.write_failure(e, path.parent)
        raise UserError(f"could not write {path}: {why}") from None
    except Exception as e:  # an opset the exporter cannot write, an operator it lacks
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the ONNX exporter of torch {torch.__version__} cannot write this model "
                        f"at --opset {opset} ({reason})") from None


def export_torchscript(module, example, path: Path, meta: dict) -> None:
    """The TorchScript file (torch.jit.trace: the model has no data-dependent branch at a fixed
    image size), with `meta` as its extra files; written whole or not at all."""
    try:
        with checkpoints.replaced_whole(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example)
            torch.jit.save(traced, str(tmp), _extra_files=meta)
    except (OSError, RuntimeError) as e:
        why = checkpoints.write_failure(e, path.parent)
        raise UserError(f"could not write {path}: {why}") from None


@torch.inference_mode()
def check_images(module: WithPreprocessing, c: dict, classes: list[str], n: int,
                 data_dir: str | None):
    """(n images as the files take them, PyTorch's logits for them, what they are): a seeded
    sample of the checkpoint's test split, brought to the training size as RGB in [0, 1], with the
    logits of the network on the very batches training's pipeline makes of them (test.py's); where
    the split is not on disk, random images and the logits of `module`."""
    c = dict(c, data_dir=imagedata.choose_data_dir(data_dir, c.get("data_dir"),
                                                   os.environ.get("DATA_DIR") or "data")[0])
    size = c["image_size"]
    try:
        data = imagedata.load_split(c, False, torch.device("cpu"), classes=classes,
                                    download=False)
    except UserError as e:
        torch.manual_seed(0)
        x = torch.rand(n, 3, size, size)
        return x, module(x), f"{n} random images ({e})"
    try:
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
        stored = torch.cat([x for _, x in data.stored(chosen, 256)])
        ours = module.model(data.preprocess(stored))  # normalized, then resized: as training
    finally:
        imagedata.close(data)
    x = stored.float() / 255
    if x.shape[-2:] != (size, size):  # resized, then normalized: the same (bilinear sums to 1)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), ours, f"{len(chosen)} images of the test split"


def compare(name: str, theirs: np.ndarray, ours: torch.Tensor) -> bool:
    """Print how the file's logits differ from PyTorch's; True when every prediction agrees."""
    diff = float(np.abs(theirs - ours.numpy()).max())
    agree = int((theirs.argmax(1) == ours.numpy().argmax(1)).sum())
    print(f"{name}: largest logit difference {diff:.2e}, predictions agree on {agree}/{len(ours)}")
    return agree == len(ours)


def main() -> None:
    _, args = cli.parse(DEFAULTS, __doc__.splitlines()[0], rules=RULES)
    model, ckpt = checkpoints.load_model(args.checkpoint)
    c, classes = ckpt["config"], [str(name) for name in ckpt["classes"]]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    checkpoints.check_writable(out, "--out")
    mean, std = imagedata.normalization(c)
    module = WithPreprocessing(model, mean, std, DATASETS[c["dataset"]].grey).eval()
    size = c["image_size"]
    meta = {"classes": json.dumps(classes), "image_size": str(size),
            "input": INPUT.format(size=size), "output": OUTPUT, "dataset": c["dataset"],
            "checkpoint": f"{Path(args.checkpoint).name}, epoch {ckpt.get('epoch')}"}
    stem = Path(args.checkpoint).stem
    onnx_path, ts_path = out / f"{stem}.onnx", out / f"{stem}.torchscript.pt"
    example = torch.rand(2, 3, size, size)
    export_onnx(module, example, onnx_path, args.opset, meta)
    export_torchscript(module, example, ts_path, {"classes.json": meta["classes"],
                                                  "input.json": json.dumps(meta)})
    x, ours, what = check_images(module, c, classes, args.check_images, args.data_dir)
    print(f"checking both files against PyTorch on {what}")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that TorchScript is deprecated
        scripted = torch.jit.load(str(ts_path))(x)
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ok = compare(onnx_path.name, session.run(None, {"images": x.numpy()})[0], ours)
    ok = compare(ts_path.name, scripted.numpy(), ours) and ok
    if not ok:
        print("export.py: error: a file's predictions differ from PyTorch's (see above)",
              file=sys.stderr)
        sys.exit(1)
    print(f"wrote {onnx_path} and {ts_path}: {len(classes)} classes, RGB in [0, 1] at {size} px")


if __name__ == "__main__":
    cli.run_main(main)
