"""PWC-style flow network as used by UFlow (Jonschkowski et al. 2020; PWC-Net by Sun et al. 2018).

Reads top to bottom::

    images [B, 3, H, W] in [0, 1]  (H, W multiples of 32)
      -> FeaturePyramid: 5 levels at 1/2 .. 1/32, 3 convs each (first stride 2), LeakyReLU 0.1
      -> coarse to fine, levels 5 (1/32) .. 2 (1/4):
           flow_up = 2 x upsample(flow of the coarser level)      (zero at the top level)
           f2_warped = warp(features2, flow_up)
           f1, f2_warped = normalize_features(f1, f2_warped)      (moments over channels and both images)
           cost = LeakyReLU(cost_volume(f1, f2_warped, max displacement 4))   -> 81 channels
           flow, context = FlowDecoder(cost, f1, flow_up, context_up)  (dense block 128,128,96,64,32)
      -> ContextNetwork refines the 1/4 flow (dilations 1, 2, 4, 8, 16, 1)
      -> bilinear upsampling x4 (vectors x4) to full resolution

One call estimates forward and backward flow: both directions run as one batch of ``2B`` pairs
through shared weights. Flows are ``(u, v)`` in pixels; a pyramid level's flow is in pixels of that
level. Layer sizes follow UFlow's code defaults (``channel_multiplier=1``: 32 pyramid channels,
``num_levels=5``, ``normalize_before_cost_volume=True``, ``accumulate_flow=True``); UFlow's level
dropout (0.1) is not reproduced. Everything exports to ONNX (opset 17, see :func:`export_flow_onnx`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visiontrain.engine.runtime import dynamo_exporter_missing
from visiontrain.flow.warp import resize_flow, warp

LEAKY_SLOPE = 0.1
PWC_STRIDE = 32  # 2 ** num_levels of the default 5-level PWCFlow: image sides must be multiples of it
PWC_MIN_SIZE = 2 * PWC_STRIDE  # and at least 2 pixels at the coarsest level


class PWCInputError(ValueError):
    """Images the network cannot take (wrong shape or a size that is not a multiple of 32)."""


def conv_lrelu(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3 x 3 convolution + LeakyReLU(0.1), 'same' padding (for stride 1)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class FeaturePyramid(nn.Module):
    """``[N, 3, H, W] -> [[N, C, H/2, W/2], [N, C, H/4, W/4], ..., [N, C, H/2^L, W/2^L]]``, ``C = 32 m``."""

    def __init__(self, num_levels: int = 5, channels: int = 32, convs_per_level: int = 3):
        super().__init__()
        levels = []
        in_ch = 3
        for _ in range(num_levels):
            layers = [conv_lrelu(in_ch, channels, stride=2)]
            layers += [conv_lrelu(channels, channels) for _ in range(convs_per_level - 1)]
            levels.append(nn.Sequential(*layers))
            in_ch = channels
        self.levels = nn.ModuleList(levels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images * 2.0 - 1.0
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def normalize_features(features1: torch.Tensor, features2: torch.Tensor, eps: float = 1e-16) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale both feature maps ``[N, C, h, w]`` by shared per-pair moments.

    Mean and variance are taken over channels and pixels of each image, then averaged over the two
    images of a pair (UFlow: moments across channels and across images). Unlike UFlow's code, the
    moments are not also averaged over the batch, so a pair's output does not depend on its batch.
    """
    mean1, mean2 = features1.mean(dim=(1, 2, 3), keepdim=True), features2.mean(dim=(1, 2, 3), keepdim=True)
    var1 = ((features1 - mean1) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    var2 = ((features2 - mean2) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    mean = (mean1 + mean2) / 2.0
    std = torch.sqrt((var1 + var2) / 2.0 + eps)
    return (features1 - mean) / std, (features2 - mean) / std


def cost_volume(features1: torch.Tensor, features2: torch.Tensor, max_displacement: int = 4) -> torch.Tensor:
    """Correlation of ``features1`` with ``features2`` shifted by every ``(dx, dy)`` in
    ``[-d, d]^2``: ``[N, C, h, w] x 2 -> [N, (2d + 1)^2, h, w]``, mean over channels.

    Channel ``k = (dy + d) (2d + 1) + (dx + d)`` holds ``mean_c f1(x, y) f2(x + dx, y + dy)`` (zero
    outside). Built from zero padding and static slices, so it exports to ONNX at a fixed size.
    """
    d = max_displacement
    height, width = features1.shape[-2:]
    padded = F.pad(features2, (d, d, d, d))
    costs = []
    for dy in range(2 * d + 1):
        for dx in range(2 * d + 1):
            shifted = padded[:, :, dy : dy + height, dx : dx + width]
            costs.append((features1 * shifted).mean(dim=1, keepdim=True))
    return torch.cat(costs, dim=1)


class FlowDecoder(nn.Module):
    """Dense decoder of one level: each conv's output is concatenated to its input (DenseNet style).

    Input ``[N, in_ch, h, w]``; returns ``(flow_residual [N, 2, h, w], context [N, 32 m, h, w])``.
    """

    def __init__(self, in_ch: int, widths: tuple[int, ...]):
        super().__init__()
        layers = []
        ch = in_ch
        for width in widths:
            layers.append(conv_lrelu(ch, width))
            ch += width
        self.layers = nn.ModuleList(layers)
        self.to_flow = nn.Conv2d(ch, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = x
        for layer in self.layers:
            last = layer(x)
            x = torch.cat([last, x], dim=1)
        return self.to_flow(x), last


class ContextNetwork(nn.Module):
    """Dilated convolutions over ``[context, flow]``; returns a flow correction ``[N, 2, h, w]``."""

    def __init__(self, in_ch: int, multiplier: float = 1.0):
        super().__init__()
        spec = ((128, 1), (128, 2), (128, 4), (96, 8), (64, 16), (32, 1))
        layers = []
        ch = in_ch
        for width, dilation in spec:
            out = max(1, int(width * multiplier))
            layers.append(conv_lrelu(ch, out, dilation=dilation))
            ch = out
        layers.append(nn.Conv2d(ch, 2, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PWCFlow(nn.Module):
    """UFlow's PWC network. ``model(image1, image2) -> dict``:

    - ``flow_fw``: ``[B, 2, H, W]`` flow from image 1 to image 2, full resolution, in pixels;
    - ``flow_bw``: ``[B, 2, H, W]`` flow from image 2 to image 1 (only when ``backward=True``);
    - ``flow_fw_pyramid`` / ``flow_bw_pyramid``: per-level flows, finest first: ``[0]`` is the refined
      1/4-resolution flow ``[B, 2, H/4, W/4]`` (in 1/4-resolution pixels), then 1/8, 1/16, 1/32.

    Images are ``[B, 3, H, W]`` in [0, 1] with ``H`` and ``W`` multiples of ``2^num_levels`` (32), at least 64.
    """

    def __init__(
        self,
        channel_multiplier: float = 1.0,
        num_levels: int = 5,
        output_level: int = 2,
        max_displacement: int = 4,
    ):
        super().__init__()
        if not 1 <= output_level < num_levels:
            raise ValueError(f"PWCFlow: output_level must be in 1..{num_levels - 1}, got {output_level}")
        self.num_levels = num_levels
        self.output_level = output_level
        self.max_displacement = max_displacement
        m = channel_multiplier
        feat_ch = max(1, int(32 * m))
        context_ch = max(1, int(32 * m))
        widths = tuple(max(1, int(w * m)) for w in (128, 128, 96, 64, 32))
        cost_ch = (2 * max_displacement + 1) ** 2
        self.pyramid = FeaturePyramid(num_levels, feat_ch)
        # Decoders for levels num_levels .. output_level (index 0 = coarsest).
        decoders = [FlowDecoder(cost_ch + feat_ch, widths)]
        decoders += [FlowDecoder(cost_ch + feat_ch + 2 + context_ch, widths)
                     for _ in range(num_levels - output_level)]
        self.decoders = nn.ModuleList(decoders)
        self.context_up = nn.ModuleList(
            [nn.ConvTranspose2d(widths[-1], context_ch, 4, stride=2, padding=1)
             for _ in range(num_levels - output_level)]
        )
        self.refine = ContextNetwork(widths[-1] + 2, m)
        # Flow outputs start at exactly zero. With default init the untrained network predicts flows of
        # ~10 px that can point most pixels outside the image, where the photometric mask is empty and
        # no gradient brings them back.
        for layer in [decoder.to_flow for decoder in self.decoders] + [self.refine.net[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_input(self, image1: torch.Tensor, image2: torch.Tensor) -> None:
        if image1.dim() != 4 or image1.shape[1] != 3 or image1.shape != image2.shape:
            raise PWCInputError(
                f"PWCFlow: need two image batches [B, 3, H, W] of the same shape, got "
                f"{tuple(image1.shape)} and {tuple(image2.shape)}"
            )
        stride = 2**self.num_levels
        height, width = image1.shape[-2:]
        if height % stride or width % stride or min(height, width) < 2 * stride:
            raise PWCInputError(
                f"PWCFlow: image size {height}×{width} (H×W) must be a multiple of {stride} and at least "
                f"{2 * stride} (2 pixels at the coarsest level); resize or crop the images (e.g. to "
                f"{max(2 * stride, height // stride * stride)}×{max(2 * stride, width // stride * stride)})"
            )

    def estimate(self, features1: list[torch.Tensor], features2: list[torch.Tensor]) -> list[torch.Tensor]:
        """Coarse-to-fine flow for pairs of pyramids; returns flows finest (refined) first."""
        flows: list[torch.Tensor] = []
        flow = context = None
        for i, level in enumerate(range(self.num_levels, self.output_level - 1, -1)):
            f1, f2 = features1[level - 1], features2[level - 1]
            if flow is None:
                f2_warped = f2
            else:
                flow = resize_flow(flow, tuple(f1.shape[-2:]))
                context = self.context_up[i - 1](context)
                f2_warped = warp(f2, flow)
            f1n, f2n = normalize_features(f1, f2_warped)
            cost = F.leaky_relu(cost_volume(f1n, f2n, self.max_displacement), LEAKY_SLOPE)
            if flow is None:
                residual, context = self.decoders[i](torch.cat([cost, f1], dim=1))
                flow = residual
            else:
                residual, context = self.decoders[i](torch.cat([cost, f1, flow, context], dim=1))
                flow = flow + residual
            flows.append(flow)
        flows[-1] = flow + self.refine(torch.cat([context, flow], dim=1))
        return flows[::-1]

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, backward: bool = True) -> dict:
        self.check_input(image1, image2)
        batch = image1.shape[0]
        size = tuple(image1.shape[-2:])
        features = self.pyramid(torch.cat([image1, image2], dim=0))
        feats1 = [f[:batch] for f in features]
        feats2 = [f[batch:] for f in features]
        if backward:  # both directions as one batch of 2B pairs
            flows = self.estimate(features, [torch.cat([f2, f1], dim=0) for f1, f2 in zip(feats1, feats2)])
        else:
            flows = self.estimate(feats1, feats2)
        full = resize_flow(flows[0], size)
        out = {"flow_fw": full[:batch], "flow_fw_pyramid": [f[:batch] for f in flows]}
        if backward:
            out["flow_bw"] = full[batch:]
            out["flow_bw_pyramid"] = [f[batch:] for f in flows]
        return out


class _OnnxFlowWrapper(nn.Module):
    """Tuple output ``(flow_fw, flow_bw)`` for export (ONNX graphs cannot return dicts of lists)."""

    def __init__(self, model: PWCFlow):
        super().__init__()
        self.model = model

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image1, image2, backward=True)
        return out["flow_fw"], out["flow_bw"]


def export_flow_onnx(
    model: PWCFlow, path: str | Path, size: tuple[int, int], opset: int = 17, dynamo: bool = False
) -> Path:
    """Export ``model`` to ONNX for images of ``size = (H, W)`` (batch dimension dynamic).

    Graph inputs ``image1``, ``image2`` ``[B, 3, H, W]`` float32 in [0, 1]; outputs ``flow_fw``, ``flow_bw``
    ``[B, 2, H, W]``. The spatial size is fixed because the cost volume uses static slices.
    ``dynamo=False`` uses PyTorch's TorchScript exporter (deprecated upstream but ~15x faster here,
    a few seconds); ``dynamo=True`` the torch.export-based one (about a minute on a small CPU; the
    outputs agree to ~4e-6 either way).
    """
    height, width = size
    stride = 2**model.num_levels
    if height % stride or width % stride or min(height, width) < 2 * stride:
        raise PWCInputError(f"export_flow_onnx: size {height}×{width} (H×W) must be a multiple of {stride}, at least {2 * stride}")
    if dynamo and (why := dynamo_exporter_missing()):
        raise RuntimeError(f"export_flow_onnx: {why}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _OnnxFlowWrapper(model).eval()
    dummy = (torch.rand(1, 3, height, width), torch.rand(1, 3, height, width))
    names = {"input_names": ["image1", "image2"], "output_names": ["flow_fw", "flow_bw"]}
    with torch.no_grad(), warnings.catch_warnings():
        # Shape checks become trace-time constants, which is what a fixed-size export wants.
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(wrapper, dummy, str(path), **names, opset_version=max(opset, 18), dynamo=True,
                              dynamic_shapes=({0: batch}, {0: batch}), verbose=False)
        else:
            axes = {name: {0: "batch"} for name in ("image1", "image2", "flow_fw", "flow_bw")}
            torch.onnx.export(wrapper, dummy, str(path), **names, dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path
