"""CIFAR-10 (the JPEG copy, class folders) on a 2-core CPU: about 86.7% (86.65-86.70% in two runs)
in about 16 to 30 minutes (README, "No GPU? A first run on the CPU").

    python train.py recipes/cifar10_cpu.py --data-dir "$DATA_DIR/cifar10-jpeg"

VGG16_bn at a quarter of its width on 32 px inputs, 30 epochs with flips and crops that shift
by up to 2 px (SHIFT), each validation and test image scored with its mirror image (TTA).
Nesterov momentum and a moving average of the weights (EMA_DECAY), label smoothing and no
dropout. With --epochs 54 it reached 87.24% in 29.5 minutes, and 87.79% scored afterwards by
`python test.py --tta-shift 1` (each test image also moved by a pixel: six views); with
--epochs 54 --shift 3 --no-test-every-epoch (the test split scored only on best.pth, at the end)
three seeds gave 87.39-88.09% that way, in 26.5 minutes. DATA_DIR below is where the folder is
looked for when no --data-dir is typed. Every try behind these values: docs/recipes.md.
"""
DATASET = "folder"
DATA_DIR = "data/cifar10-jpeg"
SHIFT = 2
IMAGE_SIZE = 32
WIDTH_DIV = 4
EPOCHS = 30
LR = 0.1
NESTEROV = True
WARMUP_EPOCHS = 1.0
LABEL_SMOOTHING = 0.1
DROPOUT = 0.0
EMA_DECAY = 0.999
TTA = True
