"""CIFAR-10 on a 2-core CPU: 87.68%, 87.38% and 87.79% with seeds 0-2, 20 min 45 s to 21 min 18 s
each, on a Xeon with AMX (README's table; measured on a JPEG copy of CIFAR-10 in class folders,
`--dataset folder --data-dir DIR`).

    python train.py recipes/cifar10_cpu.py            # torchvision downloads CIFAR-10 into ./data
    python train.py recipes/cifar10_cpu.py --dataset folder --data-dir "$DATA_DIR/cifar10-jpeg"

VGG16_bn at a quarter of its width on 32 px inputs, 50 epochs with flips and crops that shift
by up to 3 px (SHIFT). Each validation image is scored with six views (TTA, TTA_SHIFT: the image,
it moved a pixel down and right, and up and left, each with its mirror image), which choose
best.pth; the test split is scored once, on best.pth, the same way (TEST_EVERY_EPOCH). Nesterov
momentum and a moving average of the weights (EMA_DECAY), label smoothing and no dropout. Every try
behind these values: docs/recipes.md.
"""
DATASET = "cifar10"
SHIFT = 3
IMAGE_SIZE = 32
WIDTH_DIV = 4
EPOCHS = 50
LR = 0.1
NESTEROV = True
WARMUP_EPOCHS = 1.0
LABEL_SMOOTHING = 0.1
DROPOUT = 0.0
EMA_DECAY = 0.999
TTA = True
TTA_SHIFT = 1
TEST_EVERY_EPOCH = False
