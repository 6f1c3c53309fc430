"""Reload a checkpoint written by train.py and show predicted against actual labels on the test split.

    python test.py                                       # save_model/best.pth, first 20 test images
    python test.py --checkpoint save_model/epoch_003.pth --show 100
    python test.py --show-all                            # one line per test image

The model is rebuilt from the configuration stored in the checkpoint, and the test images are
preprocessed exactly as they were during training. Nothing opens a window.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

import common
from common import UserError

# ------------------------------------------------------------------------------------------------ defaults
CHECKPOINT = "save_model/best.pth"   # the checkpoint to load
SHOW = 20                            # print `Predicted: "7", Actual: "7"` for this many test images
BATCH_SIZE = 256                     # images per forward pass
DEVICE = "auto"                      # auto | cuda | npu | mps | cpu
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = common.OneLineParser(description=__doc__.splitlines()[0],
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=CHECKPOINT, help="checkpoint file written by train.py")
    p.add_argument("--show", type=int, default=SHOW, metavar="N", help="print the prediction of the first N test images")
    p.add_argument("--show-all", action="store_true", help="print the prediction of every test image")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    p.add_argument("--device", default=DEVICE, help="auto | cuda | npu | mps | cpu")
    p.add_argument("--data-dir", default=None,
                   help="dataset root (default: DATA_DIR from the environment, else the one used for training)")
    args = p.parse_args(argv)
    if args.show < 0 or args.batch_size < 1:
        p.error("--show must be >= 0 and --batch-size >= 1")
    return args


@torch.inference_mode()
def predict(model, data, batch_size: int, device, amp) -> torch.Tensor:
    """Predicted class of every image of `data`, in order (on the CPU)."""
    model.eval()
    preds = []
    for x, _ in data.batches(torch.arange(len(data)), batch_size):
        with common.autocast(device, amp):
            preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds)


def load_model(path, device):
    """(model, checkpoint) rebuilt from the configuration the checkpoint carries."""
    ckpt = common.load_checkpoint(path, map_location="cpu")
    model = common.build_model(ckpt["config"], len(ckpt["classes"]))
    common.load_model_state(model, ckpt["model"], path)
    model = model.to(device)
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def main() -> None:
    args = parse_args()
    device = common.pick_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    c = dict(ckpt["config"])
    c["data_dir"] = args.data_dir or os.environ.get("DATA_DIR") or c["data_dir"]
    classes = ckpt["classes"]
    amp = common.amp_dtype(device, c["amp"])
    data = common.load_split(c, False, device, classes=classes)
    print(f"{args.checkpoint}: VGG{c['depth']}{'_bn' if c['batch_norm'] else ''} width/{c['width_div']}, "
          f"{c['dataset']} at {c['image_size']} px, trained {ckpt['epoch']} epoch(s)")

    preds = predict(model, data, args.batch_size, device, amp)
    labels = data.labels.cpu()
    n_show = len(preds) if args.show_all else min(args.show, len(preds))
    for p, y in zip(preds[:n_show].tolist(), labels[:n_show].tolist()):
        print(f'Predicted: "{classes[p]}", Actual: "{classes[y]}"')
    correct = int((preds == labels).sum())
    print(f"test accuracy: {correct}/{len(labels)} = {correct / len(labels):.2%}")


if __name__ == "__main__":
    common.run_main(main)
