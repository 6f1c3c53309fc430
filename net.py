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

    # Below 64 px the last map is 1x1 and the pool would copy each value 49 times; the first Linear
    # then equals one with its weights summed over the 49 positions (exact: autograd still gives
    # every position its gradient, and the parameters are the same). False runs the layers as
    # written (bench.py's original pipeline and its FLOP count do).
    sum_1x1 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)        # (B, 3, 224, 224) -> (B, 512, 7, 7)
        if self.sum_1x1 and x.shape[-2:] == (1, 1):  # 32-63 px inputs
            first = self.classifier[0]
            weight = first.weight.unflatten(1, (-1, 49)).sum(2)  # (4096, 512 x 49) -> (4096, 512)
            x = F.linear(torch.flatten(x, 1), weight, first.bias)
            return self.classifier[1:](x)  # (B, num_classes) logits
        x = pool_to_7x7(x, self.avgpool)  # (B, 512, 7, 7) whatever the input size
        x = torch.flatten(x, 1)     # (B, 25088)
        return self.classifier(x)   # (B, num_classes) logits


def pool_copies(image_size: int) -> float:
    """How many of the pool's 7x7 outputs each value of the last map feeds, weighted by the bins'
    averages: 49 for the 1x1 map of 32-63 px inputs, 12.25 for 64 px's 2x2, (7 / side)^2 on
    average below 7x7, and 1 from 224 px on (a larger map is averaged, not copied). So SGD at one
    rate moves the first Linear that many times as fast as a layer that sees each value once
    (SMALL_MAP_LR in train.py corrects for it)."""
    side = image_size // 32  # five 2x2 pools, each rounding down
    return max(1.0, 49 / side ** 2)


# Devices whose adaptive average pool only takes sizes where one side divides the other (pytorch
# issue 143864): on MPS, 7x7 from a 2x2 .. 6x6 or 8x8 map (64-223 px and 256 px inputs) fails.
DIVISIBLE_POOL_ONLY = ("mps",)


def pool_supported(size: int, out: int = 7) -> bool:
    """Whether a divisible-only adaptive pool takes `size` -> `out`."""
    return out % size == 0 if size < out else size % out == 0


def pool_to_7x7(x: torch.Tensor, avgpool: nn.AdaptiveAvgPool2d) -> torch.Tensor:
    """avgpool(x), except: a 7x7 map is returned as it is (the pool would copy it), and on devices
    in DIVISIBLE_POOL_ONLY a size they reject is pooled by two matrix products with the same
    bins."""
    h, w = x.shape[-2:]
    if (h, w) == (7, 7):
        return x
    if x.device.type in DIVISIBLE_POOL_ONLY and not (pool_supported(h) and pool_supported(w)):
        return torch.einsum("ih,bchw,jw->bcij", _pool_matrix(h, x), x, _pool_matrix(w, x))
    return avgpool(x)


def _pool_matrix(size: int, like: torch.Tensor, out: int = 7) -> torch.Tensor:
    """(out, size): row i averages the bin [floor(i * size / out), ceil((i + 1) * size / out)),
    the bins of nn.AdaptiveAvgPool2d."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m.to(device=like.device, dtype=like.dtype)


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
