"""VGG networks written by hand (Simonyan & Zisserman, "Very Deep Convolutional Networks", 2014).

    from net import MyVgg16Net
    model = MyVgg16Net(num_classes=10)              # VGG16, configuration "D"
    logits = model(torch.randn(8, 3, 224, 224))     # (8, 10); no softmax inside

The parameter names and shapes match torchvision's vgg11/13/16/19 (and their _bn variants),
so their ImageNet weights load with `model.load_state_dict(sd, strict=True)`.
This file holds no training code and does nothing on import.
"""

import torch
import torch.nn.functional as F
from torch import nn

# One entry per configuration in Table 1 of the paper: an int is a 3x3 convolution with that many
# output channels, "M" is a 2x2 max-pool that halves the image. Every one has 5 pools (5 stages).
CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],               # "A"
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],      # "B"
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],                                                           # "D"
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],                                                      # "E"
}
# WIDTH_DIV divides every channel count (64 .. 4096) by one of these, so that each stays whole.
WIDTH_DIVS = (1, 2, 4, 8, 16, 32, 64)
# Five 2x2 pools take 32 px to 1x1; a smaller input would pool an empty map.
MIN_IMAGE_SIZE = 32
# A VGG at 2048 px keeps about 13 GB of activations per training image (counted from its layer
# sizes): beyond that not even one image fits on a device.
MAX_IMAGE_SIZE = 2048


def make_layers(cfg: list[int | str], batch_norm: bool = False,
                width_div: int = 1) -> nn.Sequential:
    """The convolutional part: conv3x3(pad 1) [-> BatchNorm] -> ReLU, and a max-pool after each
    stage.

    width_div divides every channel count (width_div=4 gives 16..128 channels, a "small VGG" for
    CPUs).
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_channels = int(v) // width_div
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """features -> AdaptiveAvgPool2d(7) -> classifier. Any input of 32 px or more works:
    five pools bring 224 px to 7x7 and 32 px to 1x1, and the adaptive pool makes both 7x7."""

    def __init__(self, features: nn.Sequential, num_classes: int = 10, dropout: float = 0.5,
                 width_div: int = 1, init_weights: bool = True) -> None:
        super().__init__()
        channels = 512 // width_div
        hidden = 4096 // width_div
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        # Indices 0..6 are those of torchvision's classifier, so its state dicts load unchanged.
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),  # 25088 -> 4096 at full width
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        if init_weights:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # As torchvision does: He init for convolutions (fan_out keeps the backward signal's
        # variance steady through ReLUs), small normal for linears, identity BatchNorm.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)              # (B, 512, 7, 7) at 224 px; (B, 512, 1, 1) at 32 px
        if x.shape[-2:] == (1, 1):        # 32-63 px inputs: a speed shortcut, exact
            return self.classifier[1:](self.first_linear_on_1x1(x))
        x = self.avgpool(x)               # (B, 512, 7, 7) whatever the input size
        x = torch.flatten(x, 1)           # (B, 25088)
        return self.classifier(x)         # (B, num_classes) logits

    def first_linear_on_1x1(self, x: torch.Tensor) -> torch.Tensor:
        """classifier[0](flatten(avgpool(x))) for a 1x1 map, without the pool's 49 copies of each
        value: the first Linear's weight summed over the 49 positions it would see them at. The
        same parameters, outputs and gradients (autograd gives each of the 49 columns its share);
        1.21x the training step at 32 px and 1/4 width (docs/bench.md)."""
        first = self.classifier[0]
        weight = first.weight.unflatten(1, (-1, 49)).sum(2)  # (4096, 512 x 49) -> (4096, 512)
        return F.linear(torch.flatten(x, 1), weight, first.bias)


def vgg(depth: int = 16, num_classes: int = 10, batch_norm: bool = False, dropout: float = 0.5,
        width_div: int = 1, init_weights: bool = True) -> VGG:
    """VGG11, 13, 16 or 19 (configurations A, B, D, E)."""
    if depth not in CFGS:
        raise ValueError(f"unknown VGG depth {depth}; choose one of {sorted(CFGS)}")
    if width_div not in WIDTH_DIVS:
        raise ValueError(f"width_div must divide 64 (one of {WIDTH_DIVS}), got {width_div}")
    return VGG(make_layers(CFGS[depth], batch_norm, width_div), num_classes, dropout, width_div,
               init_weights)


def MyVgg16Net(num_classes: int = 10, batch_norm: bool = False, dropout: float = 0.5,
               width_div: int = 1, init_weights: bool = True) -> VGG:
    """VGG16 (configuration D): 13 convolutions and 3 fully connected layers."""
    return vgg(16, num_classes, batch_norm, dropout, width_div, init_weights)


def build_model(c: dict, num_classes: int) -> VGG:
    """The network a run's config describes (train.py's settings, or a checkpoint's "config")."""
    return vgg(c["depth"], num_classes, c["batch_norm"], c["dropout"], c["width_div"])
