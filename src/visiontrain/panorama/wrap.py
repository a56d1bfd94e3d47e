"""Convolutions that wrap around the longitude seam of an equirectangular panorama.

The left and right edges of a 2:1 panorama ``[B, C, H, 2H]`` are the same meridian (longitude ±180°), so a
convolution over it should see the columns on the other side of the seam, not zeros. :class:`WrapXConv2d`
pads circularly in x (width) and with zeros in y (height: the poles have no neighbour across them that a
plain row shift would give). With it, a stack of such convolutions (stride 1) is exactly periodic in x:
shifting the input by ``k`` columns (``torch.roll(x, k, -1)``) shifts the output by ``k`` columns; a stack
with total stride ``s`` is periodic for shifts that are multiples of ``s``.

:func:`wrap_x_convs` turns every padded ``nn.Conv2d`` of a module (the decoder UNet, the fusion of the
2:1 latent) into a :class:`WrapXConv2d` that shares its parameters, so state-dict keys and shapes are those
of the plain module: a checkpoint trained without wrapping loads into a wrapped model and vice versa
(``model.wrap_x`` in the saved config says which the weights were trained with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pad_wrap_x(x: Tensor, pad_x: int, pad_y: int = 0) -> Tensor:
    """``[..., h, w] → [..., h + 2·pad_y, w + 2·pad_x]``: circular in x (the last ``pad_x`` columns go
    left, the first ``pad_x`` right), zeros in y."""
    if pad_x:
        x = torch.cat((x[..., -pad_x:], x, x[..., :pad_x]), dim=-1)
    if pad_y:
        x = F.pad(x, (0, 0, pad_y, pad_y))
    return x


class WrapXConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose padding wraps around in x and is zero in y; built by :meth:`from_conv`.

    ``wrap_padding = (pad_y, pad_x)`` replaces the convolution's own ``padding`` (set to 0)."""

    wrap_padding: tuple[int, int]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WrapXConv2d:
        """A wrapped copy of ``conv`` sharing its weight and bias (the same ``nn.Parameter`` objects)."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot wrap a convolution with padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                  conv.groups, conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.wrap_padding = (int(conv.padding[0]), int(conv.padding[1]))
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        pad_y, pad_x = self.wrap_padding
        return self._conv_forward(pad_wrap_x(x, pad_x, pad_y), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", wrap_padding={self.wrap_padding}"


def wrap_x_convs(module: nn.Module) -> int:
    """Replace every ``nn.Conv2d`` with non-zero padding inside ``module`` by a :class:`WrapXConv2d` sharing
    its parameters; returns how many were replaced (1×1 convolutions need no padding and stay)."""
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Conv2d and any(p > 0 for p in m.padding)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, WrapXConv2d.from_conv(conv))
    return len(targets)


def upsample_wrap_x(x: Tensor, factor: int) -> Tensor:
    """Bilinear ×``factor`` upsampling ``[B, C, h, w] → [B, C, h·f, w·f]`` that interpolates across the
    seam (the last and first columns are neighbours) instead of clamping at the image edges; rows clamp as
    usual (``align_corners=False``)."""
    h, w = x.shape[-2:]
    padded = pad_wrap_x(x, 1)
    up = F.interpolate(padded, size=(h * factor, (w + 2) * factor), mode="bilinear", align_corners=False)
    return up[..., factor:factor + w * factor]
