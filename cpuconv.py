"""The convolutions on small maps as matrix products, for bf16 training on CPUs with AMX.

On 2x2 and 4x4 maps (VGG16's last six 3x3 convolutions at 32 px inputs) PyTorch's CPU convolution
(oneDNN) runs in bf16 at a small fraction of the speed of the matrix products it amounts to: with
512 channels on 2x2 maps, batch 64, on a 2-core Xeon with AMX, the weight gradient took 32 ms
against 2 ms, the forward pass 9.6 ms against 4.4 and the input's gradient 6.5 ms against 5.7
(docs/bench.md, "Small maps"). Here each output pixel's 3x3 neighbourhood becomes one row of a
matrix (im2col; the copy is small because the maps are), and

    output          = rows @ weight, as a (9 x in, out) matrix
    weight gradient = rows^T @ output gradient
    input gradient  = the same product on the output gradient's rows, with the weight mirrored
                      (3x3 flipped) and its in and out swapped

    cpuconv.use_where_faster(model, device, amp)    # train.py and bench.py call this

Nothing changes in the model's weights or checkpoints: the convolutions keep their class's
parameters, only the way they are computed differs.
"""
import torch
import torch.nn.functional as F
from torch import nn

import devices

SMALL_MAP = 16   # at most this many pixels (h x w) per map: 2x2 and 4x4 gained, 8x8 lost or tied


def use_where_faster(model: nn.Module, device: torch.device, amp) -> int:
    """Switch the model's 3x3 convolutions to the matrix products where they were measured
    faster: bf16 training on a CPU with AMX (on a Zen 4, bf16 without AMX, the step was slower
    with them; elsewhere nothing changes). Returns how many convolutions were switched."""
    if not (device.type == "cpu" and amp == torch.bfloat16 and devices.cpu_has("amx_tile")):
        return 0
    return use_for(model)


def use_for(model: nn.Module) -> int:
    """Switch every 3x3, stride 1, padding 1 convolution of `model` (plain nn.Conv2d) to
    SmallMapConv2d, which computes small bf16 maps on a CPU with matrix products.
    The parameters and the state_dict stay as they are."""
    switched = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and eligible_layer(m):
            m.__class__ = SmallMapConv2d
            switched += 1
    return switched


def eligible_layer(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d computed with matrix products on small bf16 maps on a CPU."""

    def _conv_forward(self, x, weight, bias):
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16
                and x.shape[-2] * x.shape[-1] <= SMALL_MAP):
            # the same casts as autocast's: every operand in the input's dtype
            return SmallMapConv.apply(x, weight.to(x.dtype),
                                      None if bias is None else bias.to(x.dtype))
        return super()._conv_forward(x, weight, bias)


class SmallMapConv(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) and its gradients, each one matrix product."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = neighbourhoods(x)
        ctx.save_for_backward(rows, weight)
        return product(rows, weight, bias, x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad, weight)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(rows, grad)
        if ctx.needs_input_grad[2]:  # False where there is no bias
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def neighbourhoods(x: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> (n x h x w, 9 x c): row (image, y, x) holds the 3x3 neighbourhood of pixel
    (y, x), zero outside the map, ordered (dy, dx, channel)."""
    n, c, h, w = x.shape
    # the zero-padded input with the channels last in memory: (n, h + 2, w + 2, c)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()
    sn, sh, sw, sc = padded.stride()
    return padded.as_strided((n, h, w, 3, 3, c), (sn, sh, sw, sh, sw, sc)).reshape(n * h * w, 9 * c)


def product(rows: torch.Tensor, weight: torch.Tensor, bias, shape) -> torch.Tensor:
    """The convolution's output (n, out, h, w), channels last in memory, from the rows of an
    input of `shape` (neighbourhoods) and the weight (out, in, 3, 3)."""
    n, _, h, w = shape
    matrix = weight.permute(2, 3, 1, 0).reshape(rows.shape[1], -1)     # (dy, dx, in) by out
    out = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 weight, as one matrix product."""
    return product(neighbourhoods(x), weight, bias, x.shape)


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of a 3x3, stride 1, padding 1 convolution's input, (n, in, h, w), from the
    gradient of its output (n, out, h, w): each input pixel sent its value to the 3x3 outputs
    around it, so it gathers their gradients back through the mirrored kernel."""
    return conv2d(grad, weight.flip(2, 3).transpose(0, 1))


def weight_grad(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a 3x3, stride 1, padding 1 convolution's weight, (out, in, 3, 3), from its
    input's rows (neighbourhoods) and the gradient of its output (n, out, h, w)."""
    out = grad.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)   # (image, y, x) by out channel
    return (out.t() @ rows).view(out.shape[1], 3, 3, -1).permute(0, 3, 1, 2)
