"""CIFAR-10 (the JPEG copy, class folders) on a 2-core CPU: about 86% (85.84% in one run;
85.1-85.7% with 4 px shifts) in about 17 to 30 minutes (README, "No GPU? A first run on the CPU").

    python train.py recipes/cifar10_cpu.py --data-dir "$DATA_DIR/cifar10-jpeg"

VGG16_bn at a quarter of its width on 32 px inputs, 30 epochs with flips and crops that shift
by up to 2 px (SHIFT), each validation and test image scored with its mirror image (TTA).
DATA_DIR below is where the folder is looked for when no --data-dir is typed. Every try behind
these values: docs/recipes.md.
"""
DATASET = "folder"
DATA_DIR = "data/cifar10-jpeg"
SHIFT = 2
IMAGE_SIZE = 32
WIDTH_DIV = 4
EPOCHS = 30
LR = 0.1
WARMUP_EPOCHS = 1.0
LABEL_SMOOTHING = 0.1
DROPOUT = 0.0
TTA = True
