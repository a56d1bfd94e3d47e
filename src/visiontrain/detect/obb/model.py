"""YOLOv8-OBB: the YOLOv8 detector with Ultralytics' OBB head (box distribution, classes, one angle channel).

Shapes for an input ``[B, 3, H, W]`` and ``R = reg_max``:

* training mode: three raw maps ``[B, 4R + nc + 1, H_i, W_i]`` (box distribution logits, class logits, then the
  angle logit ``t``);
* eval mode: ``[B, 4 + nc + 1, A]`` = (cx, cy, w, h in input pixels, class probabilities, angle in radians), the
  layout of Ultralytics' OBB head, so imported weights give the same numbers.

Decoding: the angle is ``(sigmoid(t) - 0.25) * pi``, in ``[-pi/4, 3pi/4)``. The DFL distances ``(l, t, r, b)`` are
measured along the box's own axes from the anchor point, so the centre is the anchor plus the offset
``((r - l) / 2, (b - t) / 2)`` turned by the angle, and ``(w, h) = (l + r, t + b)`` (:func:`dist_to_rbox`).
Every parameter maps one to one onto an Ultralytics ``OBBModel`` key (``model.22.cv4.*`` is ``head.cv4.*``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visiontrain.detect.blocks import Conv
from visiontrain.detect.model import Detect, YOLOv8


def angle_from_logit(t: Tensor) -> Tensor:
    """Angle logits -> radians in ``[-pi/4, 3pi/4)``: ``(sigmoid(t) - 0.25) * pi``."""
    return (t.sigmoid() - 0.25) * math.pi


def dist_to_rbox(dist: Tensor, angle: Tensor, anchors: Tensor, dim: int = -1) -> Tensor:
    """Rotated box (cx, cy, w, h) from distances ``(l, t, r, b)`` along the box axes, the box angle and anchors.

    ``dist [..., 4, ...]`` and ``angle [..., 1, ...]`` along ``dim``; ``anchors`` broadcast (x, y) along ``dim``."""
    lt, rb = dist.split(2, dim=dim)
    cos, sin = torch.cos(angle), torch.sin(angle)
    xf, yf = ((rb - lt) / 2).split(1, dim=dim)
    x, y = xf * cos - yf * sin, xf * sin + yf * cos
    return torch.cat([torch.cat([x, y], dim=dim) + anchors, lt + rb], dim=dim)


def rbox_to_dist(boxes: Tensor, angle: Tensor, anchors: Tensor, reg_max: int | None = None) -> Tensor:
    """Inverse of :func:`dist_to_rbox` on the last dim: ``boxes [..., 4]`` (cx, cy, w, h), ``angle [..., 1]``,
    ``anchors [..., 2]`` -> ``(l, t, r, b) [..., 4]``, clamped to ``[0, reg_max - 0.01]`` when given."""
    offset = boxes[..., :2] - anchors
    ox, oy = offset[..., :1], offset[..., 1:]
    cos, sin = torch.cos(angle), torch.sin(angle)
    xf = ox * cos + oy * sin
    yf = -ox * sin + oy * cos
    w, h = boxes[..., 2:3], boxes[..., 3:4]
    dist = torch.cat([w / 2 - xf, h / 2 - yf, w / 2 + xf, h / 2 + yf], -1)
    return dist.clamp_(0, reg_max - 0.01) if reg_max is not None else dist


class OBBHead(Detect):
    """:class:`~visiontrain.detect.model.Detect` plus ``cv4[i]``, an angle branch with one output channel.

    ``raw(feats) -> [B, 4R + nc + 1, H_i, W_i]`` per level; ``decode(raw) -> [B, 4 + nc + 1, A]``."""

    def __init__(self, nc: int, channels: tuple[int, ...], reg_max: int = 16, **kw):
        super().__init__(nc, channels, reg_max, **kw)
        c4 = max(channels[0] // 4, 1)
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(c, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, 1, 1)) for c in channels)

    @property
    def no(self) -> int:
        """Channels of one raw map: ``4 * reg_max + nc + 1``."""
        return 4 * self.reg_max + self.nc + 1

    def raw(self, feats: list[Tensor]) -> list[Tensor]:
        return [torch.cat((self.cv2[i](x), self.cv3[i](x), self.cv4[i](x)), 1) for i, x in enumerate(feats)]

    def forward(self, feats: list[Tensor]) -> list[Tensor] | Tensor:
        if self.training:
            return self.raw(feats)
        return self.decode(self.raw(feats))

    def decode(self, raw: list[Tensor]) -> Tensor:
        """Raw maps ``[B, 4R + nc + 1, H_i, W_i]`` -> ``[B, 4 + nc + 1, A]`` (xywh pixels, probabilities, angle)."""
        flat = torch.cat([r.flatten(2) for r in raw], 2)
        box, cls, ang = flat.split((4 * self.reg_max, self.nc, 1), 1)
        if box.dtype in (torch.float16, torch.bfloat16):
            box, cls, ang = box.float(), cls.float(), ang.float()
        with torch.autocast(box.device.type, enabled=False):
            anchors, strides = self.anchors([r.shape[2:] for r in raw], box.device, box.dtype)  # [2, A], [1, A]
            angle = angle_from_logit(ang)  # [B, 1, A]
            xywh = dist_to_rbox(self.dfl(box), angle, anchors.unsqueeze(0), dim=1) * strides
            return torch.cat((xywh, cls.sigmoid(), angle), 1)


class YOLOv8OBB(YOLOv8):
    """YOLOv8-OBB of scale ``n|s|m|l|x`` for ``nc`` classes (see the module docstring for the outputs)."""

    def __init__(self, scale: str = "n", nc: int = 15, reg_max: int = 16, names: list[str] | None = None):
        super().__init__(scale, nc, reg_max, names)
        self.head = OBBHead(nc, self.backbone.out_channels, reg_max)
