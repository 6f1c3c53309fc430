"""The weight gradient of the convolutions on small maps, as one matrix product, for bf16 training
on CPUs with AMX.

On 2x2 and 4x4 maps (VGG16's last six 3x3 convolutions at 32 px inputs) PyTorch's CPU backward
pass (oneDNN) computes a convolution's weight gradient in bf16 at a small fraction of the speed of
the matrix product that gradient is: 512 channels on 2x2 maps, batch 64, took 32 ms against 2 ms on
a 2-core Xeon with AMX, and those layers held more than half of the full-width step
(docs/bench.md, "Small maps"). Here each output pixel's 3x3 neighbourhood becomes one row of a
matrix (im2col; the copy is small because the maps are) and the gradient is that matrix times the
output's gradient. The forward pass and the input's gradient stay PyTorch's own.

    cpuconv.use_where_faster(model, device, amp)    # train.py and bench.py call this

Nothing changes in the model's weights or checkpoints: the convolutions keep their class's
parameters, only the way their backward pass is computed differs.
"""
import torch
import torch.nn.functional as F
from torch import nn

import devices

SMALL_MAP = 16   # at most this many pixels (h x w) per map: 2x2 and 4x4 gained, 8x8 did not always


def use_where_faster(model: nn.Module, device: torch.device, amp) -> int:
    """Switch the model's 3x3 convolutions to the matrix-product weight gradient where it was
    measured faster: bf16 training on a CPU with AMX (elsewhere it was not measured, so nothing
    changes). Returns how many convolutions were switched."""
    if not (device.type == "cpu" and amp == torch.bfloat16 and devices.cpu_has("amx_tile")):
        return 0
    return use_for(model)


def use_for(model: nn.Module) -> int:
    """Switch every 3x3, stride 1, padding 1 convolution of `model` (plain nn.Conv2d) to
    SmallMapConv2d, which takes the matrix-product weight gradient on small bf16 maps on a CPU.
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
    """nn.Conv2d whose weight gradient on small bf16 maps on a CPU is one matrix product."""

    def _conv_forward(self, x, weight, bias):
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and torch.is_grad_enabled()
                and weight.requires_grad and x.shape[-2] * x.shape[-1] <= SMALL_MAP):
            # the same casts as autocast's: every operand in the input's dtype
            return SmallMapConv.apply(x, weight.to(x.dtype),
                                      None if bias is None else bias.to(x.dtype))
        return super()._conv_forward(x, weight, bias)


class SmallMapConv(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1), with the weight gradient of weight_grad()."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=1)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad)
        if ctx.needs_input_grad[2]:  # False where there is no bias
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def weight_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a 3x3, stride 1, padding 1 convolution's weight, (out, in, 3, 3), from its
    input x (n, in, h, w) and the gradient of its output (n, out, h, w)."""
    n, c, h, w = x.shape
    # the zero-padded input with the channels last in memory: (n, h + 2, w + 2, c)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()
    sn, sh, sw, sc = padded.stride()
    # row (image, y, x) holds the 3x3 neighbourhood of output pixel (y, x): (dy, dx, channel)
    rows = padded.as_strided((n, h, w, 3, 3, c), (sn, sh, sw, sh, sw, sc)).reshape(n * h * w, 9 * c)
    out = grad.permute(0, 2, 3, 1).reshape(n * h * w, -1)       # (image, y, x) by out channel
    return (out.t() @ rows).view(-1, 3, 3, c).permute(0, 3, 1, 2)
