"""YOLOv8 detector: ``backbone`` (Ultralytics layers 0-9) → ``neck`` (10-21, PAN-FPN) → ``head`` (22, Detect).

Shapes for an input ``[B, 3, H, W]`` (H, W multiples of 32) and ``R = reg_max``:

* ``backbone(x) -> (C3 [B, c256, H/8, W/8], C4 [B, c512, H/16, W/16], C5 [B, c1024, H/32, W/32])``
* ``neck(C3, C4, C5) -> [P3, P4, P5]`` with the same shapes (``forward_features``)
* ``head`` in training mode: three raw maps ``[B, 4R + nc, H_i, W_i]`` (box distribution logits first,
  then class logits), like Ultralytics' training output; in eval mode the decoded
  ``[B, 4 + nc, A]`` (``xywh`` in input pixels, sigmoid class probabilities), ``A = Σ H_i W_i``.

``c256`` etc. are the Ultralytics channel counts after the width multiple and channel cap of the scale.
Every parameter maps one to one onto an Ultralytics ``DetectionModel`` key (:func:`ultralytics_key_to_ours`).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from visiontrain.detect.blocks import DFL, SPPF, C2f, Conv, make_divisible
from visiontrain.detect.boxes import make_anchors

#: scale -> (depth multiple, width multiple, max channels), as in Ultralytics' yolov8.yaml
SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.25, 512),
}
STRIDES = (8, 16, 32)


class ScaleError(ValueError):
    """An unknown YOLOv8 scale or an input the model cannot take."""


def scale_channels(scale: str) -> dict[str, int]:
    """Channel counts of a scale, keyed by their width-1 name (``{"c64": 16, ...}`` for ``n``)."""
    if scale not in SCALES:
        raise ScaleError(f"unknown YOLOv8 scale {scale!r}; choose one of {', '.join(SCALES)}")
    _, width, max_ch = SCALES[scale]
    return {f"c{c}": make_divisible(min(c, max_ch) * width, 8) for c in (64, 128, 256, 512, 1024)}


def scale_depth(scale: str, repeats: int) -> int:
    depth = SCALES[scale][0]
    return max(round(repeats * depth), 1) if repeats > 1 else repeats


class Backbone(nn.Module):
    """CSPDarknet: ``[B, 3, H, W] -> (C3 [B, c256, H/8, W/8], C4 [B, c512, H/16, W/16], C5 [B, c1024, H/32, W/32])``.

    Module names carry the pyramid level they work at (``down3`` halves P2 into P3, ``c2f3`` refines P3).
    """

    def __init__(self, scale: str):
        super().__init__()
        c = scale_channels(scale)
        n3, n6 = scale_depth(scale, 3), scale_depth(scale, 6)
        self.stem = Conv(3, c["c64"], 3, 2)  # 0  P1/2
        self.down2 = Conv(c["c64"], c["c128"], 3, 2)  # 1  P2/4
        self.c2f2 = C2f(c["c128"], c["c128"], n3, shortcut=True)  # 2
        self.down3 = Conv(c["c128"], c["c256"], 3, 2)  # 3  P3/8
        self.c2f3 = C2f(c["c256"], c["c256"], n6, shortcut=True)  # 4
        self.down4 = Conv(c["c256"], c["c512"], 3, 2)  # 5  P4/16
        self.c2f4 = C2f(c["c512"], c["c512"], n6, shortcut=True)  # 6
        self.down5 = Conv(c["c512"], c["c1024"], 3, 2)  # 7  P5/32
        self.c2f5 = C2f(c["c1024"], c["c1024"], n3, shortcut=True)  # 8
        self.sppf = SPPF(c["c1024"], c["c1024"], 5)  # 9
        self.out_channels = (c["c256"], c["c512"], c["c1024"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.c2f3(self.down3(self.c2f2(self.down2(self.stem(x)))))
        c4 = self.c2f4(self.down4(c3))
        c5 = self.sppf(self.c2f5(self.down5(c4)))
        return c3, c4, c5


class Neck(nn.Module):
    """PAN-FPN: top-down (upsample + concat + C2f) then bottom-up (stride-2 Conv + concat + C2f).

    ``(C3, C4, C5) -> [P3 [B, c256, H/8, W/8], P4 [B, c512, H/16, W/16], P5 [B, c1024, H/32, W/32]]``.
    """

    def __init__(self, scale: str):
        super().__init__()
        c = scale_channels(scale)
        n3 = scale_depth(scale, 3)
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")  # 10, 13
        self.topdown_p4 = C2f(c["c1024"] + c["c512"], c["c512"], n3)  # 11 concat, 12
        self.topdown_p3 = C2f(c["c512"] + c["c256"], c["c256"], n3)  # 14 concat, 15 -> P3
        self.downsample_p3 = Conv(c["c256"], c["c256"], 3, 2)  # 16
        self.bottomup_p4 = C2f(c["c256"] + c["c512"], c["c512"], n3)  # 17 concat, 18 -> P4
        self.downsample_p4 = Conv(c["c512"], c["c512"], 3, 2)  # 19
        self.bottomup_p5 = C2f(c["c512"] + c["c1024"], c["c1024"], n3)  # 20 concat, 21 -> P5

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        t4 = self.topdown_p4(torch.cat((self.upsample(c5), c4), 1))
        p3 = self.topdown_p3(torch.cat((self.upsample(t4), c3), 1))
        p4 = self.bottomup_p4(torch.cat((self.downsample_p3(p3), t4), 1))
        p5 = self.bottomup_p5(torch.cat((self.downsample_p4(p4), c5), 1))
        return [p3, p4, p5]


class SplitClassBranch(nn.Module):
    """One level of a class branch in parts: ``parts[0]`` a teacher's own class branch (its classes), each later
    part a branch for the classes one class-incremental step added. Output rows are put in the model's class
    order by the ``perm`` buffer: ``cat(parts[0](x), parts[1](x), …)[:, perm]``. Built by
    :func:`~visiontrain.detect.distill.split_classes` for ``distill.frozen_base``, where every part but the
    last (with the backbone, neck and box branch) stays frozen, so the old classes keep their predictions."""

    def __init__(self, parts: list[nn.Sequential], rows: list[int]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        n = sum(self.sizes)
        if sorted(rows) != list(range(n)):
            raise ValueError(f"SplitClassBranch: rows {rows} must be a permutation of 0..{n - 1}")
        perm = torch.empty(n, dtype=torch.long)
        perm[torch.tensor(rows)] = torch.arange(n)  # model row r reads output perm[r] of cat(parts)
        self.register_buffer("perm", perm)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Classes of each part."""
        return tuple(p[-1].out_channels for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], 1).index_select(1, self.perm)


class Detect(nn.Module):
    """Decoupled anchor-free head. ``cv2[i]``: box branch (``4 * reg_max`` DFL logits), ``cv3[i]``: class branch.

    ``raw(feats) -> [B, 4R + nc, H_i, W_i]`` per level; ``decode(raw) -> [B, 4 + nc, A]``.
    Anchor points and strides are cached per feature-map shape, device and dtype.
    """

    def __init__(
        self, nc: int, channels: tuple[int, ...], reg_max: int = 16, strides: tuple[int, ...] = STRIDES
    ):
        super().__init__()
        if nc < 1:
            raise ValueError(f"number of classes must be >= 1, got nc={nc}")
        self.reg_max = reg_max
        self.channels = tuple(channels)
        self.strides = tuple(float(s) for s in strides)
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)
        box_ch = max(16, channels[0] // 4, reg_max * 4)
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, box_ch, 3), Conv(box_ch, box_ch, 3), nn.Conv2d(box_ch, 4 * reg_max, 1))
            for c in channels
        )
        self.dfl = DFL(reg_max)
        self.nc = nc
        self.cv3 = self._class_branch(nc)
        self.bias_init()
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _class_branch(self, nc: int) -> nn.ModuleList:
        return nn.ModuleList(self._class_level(c, nc) for c in self.channels)

    def _class_level(self, c: int, nc: int) -> nn.Sequential:
        cls_ch = max(self.channels[0], min(nc, 100))
        return nn.Sequential(Conv(c, cls_ch, 3), Conv(cls_ch, cls_ch, 3), nn.Conv2d(cls_ch, nc, 1))

    @property
    def class_parts(self) -> tuple[int, ...]:
        """Classes of each part of a split class branch (:class:`SplitClassBranch`); ``()`` when not split."""
        first = self.cv3[0]
        return first.sizes if isinstance(first, SplitClassBranch) else ()

    def split_class_branch(self, sizes: tuple[int, ...]) -> None:
        """Give the head the structure of a class branch in parts of ``sizes`` classes (summing to ``nc``),
        freshly initialised, rows in order: the shape a checkpoint of a ``distill.frozen_base`` run is loaded
        into (its ``perm`` buffers then set the real order)."""
        if len(sizes) < 2 or min(sizes) < 1 or sum(sizes) != self.nc:
            raise ValueError(f"split_class_branch: parts of {list(sizes)} classes; give two or more, each >= 1, "
                             f"summing to nc={self.nc}")
        ref = self.cv2[0][-1].weight
        self.cv3 = nn.ModuleList(
            SplitClassBranch([self._class_level(c, n) for n in sizes], list(range(self.nc)))
            for c in self.channels).to(device=ref.device, dtype=ref.dtype)

    @torch.no_grad()
    def bias_init(self, box: bool = True) -> None:
        """Box bias 1.0; class bias ``log(5 / nc / (640 / stride)^2)`` (about 0.01 objects per cell at 640)."""
        for i, s in enumerate(self.strides):
            if box:
                self.cv2[i][-1].bias.fill_(1.0)
            self.cv3[i][-1].bias.fill_(math.log(5 / self.nc / (640 / s) ** 2))

    def reset_class_branch(self, nc: int) -> None:
        """Replace the class branch by a freshly initialised one for ``nc`` classes (box branch kept)."""
        ref = self.cv2[0][-1].weight
        self.nc = nc
        self.cv3 = self._class_branch(nc).to(device=ref.device, dtype=ref.dtype)
        self.bias_init(box=False)

    @property
    def no(self) -> int:
        """Channels of one raw map: ``4 * reg_max + nc``."""
        return 4 * self.reg_max + self.nc

    def raw(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[P3, P4, P5] -> [B, 4R + nc, H_i, W_i]`` per level (box logits first, then class logits)."""
        return [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(feats)]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        if self.training:
            return self.raw(feats)
        shapes = [x.shape[2:] for x in feats]
        box = torch.cat([self.cv2[i](x).flatten(2) for i, x in enumerate(feats)], 2)  # [B, 4R, A]
        cls = torch.cat([self.cv3[i](x).flatten(2) for i, x in enumerate(feats)], 2)  # [B, nc, A]
        return self._decode(box, cls, shapes)

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps ``[B, 4R + nc, H_i, W_i]`` -> ``[B, 4 + nc, A]`` (xywh pixels, class probabilities)."""
        flat = torch.cat([r.flatten(2) for r in raw], 2)  # [B, 4R + nc, A]
        box, cls = flat.split((4 * self.reg_max, self.nc), 1)
        return self._decode(box, cls, [r.shape[2:] for r in raw])

    def _decode(self, box: torch.Tensor, cls: torch.Tensor, shapes: list) -> torch.Tensor:
        if box.dtype in (
            torch.float16,
            torch.bfloat16,
        ):  # decode in float32: bf16 cannot hold pixel positions
            box, cls = box.float(), cls.float()
        with torch.autocast(box.device.type, enabled=False):
            anchors, strides = self.anchors(shapes, box.device, box.dtype)  # [2, A], [1, A]
            lt, rb = self.dfl(box).chunk(2, 1)  # [B, 2, A] each, grid cells
            x1y1, x2y2 = anchors - lt, anchors + rb
            xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
            return torch.cat((xywh, cls.sigmoid()), 1)

    def anchors(
        self, shapes: list, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres ``[2, A]`` (x, y in grid units) and their strides ``[1, A]`` for these level shapes."""
        key = (tuple((int(h), int(w)) for h, w in shapes), str(device), dtype)
        hit = self._anchor_cache.get(key)
        if hit is None:
            points, strides = make_anchors(key[0], self.strides, dtype=dtype, device=device)  # [A, 2], [A, 1]
            hit = (points.T.contiguous(), strides.T.contiguous())
            if len(self._anchor_cache) >= 16:
                self._anchor_cache.clear()
            if not torch.jit.is_tracing():
                self._anchor_cache[key] = hit
        return hit

    def _apply(self, fn, recurse: bool = True):  # .to()/.half() invalidate cached anchors
        self._anchor_cache = {}
        return super()._apply(fn, recurse)


def flatten_raw(raw: list[torch.Tensor], reg_max: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps -> ``(box_logits [B, 4R, A], class_logits [B, nc, A])`` concatenated over levels.

    This is the ``{"boxes", "scores"}`` pair of Ultralytics 8.4's training output.
    """
    flat = torch.cat([r.flatten(2) for r in raw], 2)
    return flat[:, : 4 * reg_max], flat[:, 4 * reg_max :]


class YOLOv8(nn.Module):
    """YOLOv8 detector of scale ``n|s|m|l|x`` for ``nc`` classes.

    ``forward(x [B, 3, H, W])``: training mode -> three raw maps ``[B, 4R + nc, H_i, W_i]``;
    eval mode -> ``[B, 4 + nc, A]`` (xywh in input pixels, class probabilities). H and W must be
    multiples of 32.
    """

    def __init__(self, scale: str = "n", nc: int = 80, reg_max: int = 16, names: list[str] | None = None):
        super().__init__()
        scale_channels(scale)  # validates the scale
        self.scale = scale
        self.backbone = Backbone(scale)
        self.neck = Neck(scale)
        self.head = Detect(nc, self.backbone.out_channels, reg_max)
        self.names = list(names) if names is not None else None
        self.fused = False

    @property
    def nc(self) -> int:
        return self.head.nc

    @property
    def reg_max(self) -> int:
        return self.head.reg_max

    @property
    def stride(self) -> torch.Tensor:
        """``[8., 16., 32.]``."""
        return self.head.stride

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ScaleError(f"YOLOv8 expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        if not torch.jit.is_tracing() and (int(h) % 32 or int(w) % 32):
            raise ScaleError(
                f"YOLOv8 input height and width must be multiples of 32, got {int(h)}x{int(w)}; "
                "letterbox/pad the images (e.g. to 640x640)"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W] -> [P3, P4, P5]`` neck outputs (strides 8, 16, 32)."""
        self._check_input(x)
        return self.neck(*self.backbone(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One pass giving ``([P3, P4, P5], raw head maps [B, 4R + nc, H_i, W_i])`` in any mode.

        Decode the raw maps with ``model.head.decode(raw)``.
        """
        feats = self.forward_features(x)
        return feats, self.head.raw(feats)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        return self.head(self.forward_features(x))

    def prepare_for_inference(self, channels_last: bool = True) -> YOLOv8:
        """``eval()``, :meth:`fuse` and (default) channels-last weights, which make CPU convolutions faster
        (inputs may stay contiguous). Modifies and returns self: use a copy of a model still in training."""
        self.eval().fuse()
        return self.to(memory_format=torch.channels_last) if channels_last else self

    def fuse(self) -> YOLOv8:
        """Fold every BatchNorm into its convolution (inference; do not train a fused model). Returns self."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        self.fused = True
        return self


# --- Ultralytics key mapping -------------------------------------------------------------------------

#: Ultralytics ``model.<index>`` -> our module path (layers 10, 11, 13, 14, 17, 20 have no parameters)
ULTRALYTICS_LAYERS: dict[int, str] = {
    0: "backbone.stem",
    1: "backbone.down2",
    2: "backbone.c2f2",
    3: "backbone.down3",
    4: "backbone.c2f3",
    5: "backbone.down4",
    6: "backbone.c2f4",
    7: "backbone.down5",
    8: "backbone.c2f5",
    9: "backbone.sppf",
    12: "neck.topdown_p4",
    15: "neck.topdown_p3",
    16: "neck.downsample_p3",
    18: "neck.bottomup_p4",
    19: "neck.downsample_p4",
    21: "neck.bottomup_p5",
    22: "head",
}
_OURS_TO_LAYER = {v: k for k, v in ULTRALYTICS_LAYERS.items()}
#: the Ultralytics module class expected at each layer index of a YOLOv8 detection model
ULTRALYTICS_LAYER_TYPES = [
    "Conv",
    "Conv",
    "C2f",
    "Conv",
    "C2f",
    "Conv",
    "C2f",
    "Conv",
    "C2f",
    "SPPF",
    "Upsample",
    "Concat",
    "C2f",
    "Upsample",
    "Concat",
    "C2f",
    "Conv",
    "Concat",
    "C2f",
    "Conv",
    "Concat",
    "C2f",
    "Detect",
]
_ULTRA_KEY = re.compile(r"^model\.(\d+)\.(.+)$")


class KeyMappingError(ValueError):
    """A state-dict key that has no counterpart in the other naming scheme."""


def ultralytics_key_to_ours(key: str) -> str:
    """``model.4.m.0.cv1.conv.weight -> backbone.c2f3.m.0.cv1.conv.weight``; ``model.22.* -> head.*``."""
    match = _ULTRA_KEY.match(key)
    if match is None or int(match.group(1)) not in ULTRALYTICS_LAYERS:
        raise KeyMappingError(
            f"{key!r} is not a key of an Ultralytics YOLOv8 detection model "
            f"(expected 'model.<i>.…' with i in {sorted(ULTRALYTICS_LAYERS)})"
        )
    return f"{ULTRALYTICS_LAYERS[int(match.group(1))]}.{match.group(2)}"


def ours_key_to_ultralytics(key: str) -> str:
    """Inverse of :func:`ultralytics_key_to_ours`: ``head.cv3.0.2.bias -> model.22.cv3.0.2.bias``."""
    if key.startswith("head."):
        return f"model.22.{key[5:]}"
    prefix, _, rest = key.partition(".")
    name, _, tail = rest.partition(".")
    layer = _OURS_TO_LAYER.get(f"{prefix}.{name}")
    if layer is None or not tail:
        raise KeyMappingError(f"{key!r} is not a parameter/buffer key of visiontrain's YOLOv8")
    return f"model.{layer}.{tail}"
