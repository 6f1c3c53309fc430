"""Grad-CAM (Selvaraju et al., 2017, introduced on VGG16): where the network looks for a class.

For a convolution layer's activations A (C maps of h x w) and a class score y (its logit), each map's
weight is the mean over the map of dy/dA; the heat map is ReLU(sum of the weighted maps), upsampled to
the input and scaled to [0, 1]. Written with a forward hook that keeps the activations and
torch.autograd.grad for their gradient (module backward hooks break on in-place ReLU).
"""

import torch
import torch.nn.functional as F

# The map a heat map is taken from must be at least this many cells a side to say where.
MIN_MAP = 4


def cam_layer(model, image_size: int) -> tuple[int, str]:
    """(index in model.features, name) of the ReLU that ends the last convolution block whose map is
    at least MIN_MAP x MIN_MAP at this input size: conv5_3's at 224 px (14 x 14); at 32 px conv5's
    map is 2 x 2, so conv4_3's (4 x 4)."""
    side, block, conv, chosen = image_size, 1, 0, None
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Conv2d):
            conv += 1
        elif isinstance(layer, torch.nn.MaxPool2d):
            side, block, conv = side // 2, block + 1, 0
        elif isinstance(layer, torch.nn.ReLU):
            last_of_block = i + 1 == len(layers) or isinstance(layers[i + 1], torch.nn.MaxPool2d)
            if last_of_block and side >= MIN_MAP:
                chosen = (i, f"conv{block}_{conv} ReLU ({side}x{side}, features.{i})")
    if chosen is None:
        raise ValueError(f"no convolution map of at least {MIN_MAP}x{MIN_MAP} at {image_size} px")
    return chosen


def grad_cam(model, x: torch.Tensor, layer: int, classes: torch.Tensor) -> torch.Tensor:
    """Heat maps (B, H, W) in [0, 1] of `classes` (B,) for the batch x (B, 3, H, W), from the
    activations of model.features[layer]. The model is left in eval mode; no parameter gradient is
    computed."""
    model.eval()
    kept = {}
    handle = model.features[layer].register_forward_hook(
        lambda module, args, out: kept.__setitem__("maps", out))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_()  # so that the graph reaches the maps
            logits = model(x).float()
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            maps = kept["maps"]
            grads, = torch.autograd.grad(score, maps)
    finally:
        handle.remove()
    weights = grads.float().mean((2, 3), keepdim=True)                       # (B, C, 1, 1)
    cam = F.relu((weights * maps.detach().float()).sum(1, keepdim=True))     # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).detach()
