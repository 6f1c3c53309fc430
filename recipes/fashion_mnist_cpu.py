"""Fashion-MNIST on a 2-core CPU: 92.5% or more in about 6 to 15 minutes (README, "Running on a
CPU").

    python train.py recipes/fashion_mnist_cpu.py      # options typed after it still win

VGG16_bn at a quarter of its width on 32 px inputs, 9 epochs without augmentation (it tested
best so), label smoothing and no dropout. Every try behind these values: docs/recipes.md.
"""
DATASET = "fashion-mnist"
IMAGE_SIZE = 32
WIDTH_DIV = 4
EPOCHS = 9
LR = 0.05
WARMUP_EPOCHS = 0.2
LABEL_SMOOTHING = 0.1
DROPOUT = 0.0
