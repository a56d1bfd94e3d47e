"""Building blocks of YOLOv8: Conv (conv + BN + SiLU), Bottleneck, C2f, SPPF and the DFL integral.

Attribute names inside each block (``conv``/``bn``, ``cv1``/``cv2``/``m``) follow the layout of the
Ultralytics checkpoints so their weights map onto ours key by key (see :mod:`visiontrain.detect.model`).
BatchNorm uses ``eps=1e-3, momentum=0.03`` like those checkpoints were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class Conv(nn.Module):
    """``SiLU(BN(Conv2d(x)))`` with "same" padding: ``[B, c_in, H, W] -> [B, c_out, H/s, W/s]``.

    After :meth:`fuse` the BN is folded into the convolution (``bn`` becomes ``nn.Identity``).
    """

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, padding=k // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into the convolution (inference only; outputs unchanged up to rounding)."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        self.conv = fuse_conv_bn(self.conv, self.bn)
        self.bn = nn.Identity()


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``Conv2d`` (with bias) equal to ``bn(conv(x))`` in eval mode. Computed in float64."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    w = conv.weight.double()
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # [c_out]
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused.weight.copy_(w * scale.view(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean.double()) * scale + bn.bias.double())
    fused.requires_grad_(conv.weight.requires_grad)
    return fused


class Bottleneck(nn.Module):
    """Two 3×3 Convs with an optional residual: ``[B, c, H, W] -> [B, c, H, W]``."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with ``n`` Bottlenecks whose every output is kept: ``[B, c_in, H, W] -> [B, c_out, H, W]``.

    ``cv1`` makes ``2c`` channels, split into halves ``(a, b)``; each Bottleneck is applied to the previous
    output starting at ``b``; ``cv2`` mixes the concatenation ``[a, b, m1, ..., mn]`` (``(2 + n) c`` channels).
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            y.append(block(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained k×k max-pools, concatenated: ``[B, c_in, H, W] -> [B, c_out, H, W]``."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(hidden * 4, c_out, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.cv1(x)
        y1 = self.m(y0)
        y2 = self.m(y1)
        return self.cv2(torch.cat((y0, y1, y2, self.m(y2)), 1))


class DFL(nn.Module):
    """Distribution Focal Loss integral: expected distance of a softmax over ``reg_max`` bins.

    ``[B, 4 * reg_max, A] -> [B, 4, A]`` (distances in grid cells, ordered left, top, right, bottom).
    The bin values live in a frozen 1×1 conv (``conv.weight = 0..reg_max-1``) so checkpoints that store
    them load key by key.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        prob = x.view(b, 4, self.reg_max, a).transpose(1, 2).softmax(1)  # [B, R, 4, A]
        bins = self.conv.weight.to(prob.dtype)  # [1, R, 1, 1] = 0..R-1
        return F.conv2d(prob, bins).view(b, 4, a)  # Σ_r r · p_r as a 1×1 conv over the bins


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is ``>= x`` (channel rounding of the YOLO scales)."""
    return int(-(-x // divisor) * divisor)
