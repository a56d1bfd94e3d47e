"""RAFT from ``torchvision.models.optical_flow`` (not re-implemented here): building and running.

The model *is* torchvision's ``RAFT`` module, so its state dict is torchvision's: a torchvision
checkpoint (``raft_small_C_T_V2-*.pth``) loads as is, and our checkpoints load back into torchvision.

:func:`raft_forward` is the one place that knows RAFT's input convention: images in ``[-1, 1]`` with
``H`` and ``W`` divisible by 8 and at least 128 (torchvision's correlation pyramid needs 1/8-resolution
feature maps of at least 16 x 16). It takes ``[0, 1]`` images of any size, pads them (edge replication,
centred) to that and crops the predictions back. The number of refinement steps is an argument, so
training and evaluation can use different counts (``num_flow_updates_train`` / ``_eval``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.optical_flow.raft import RAFT as _TorchvisionRAFT
from torchvision.models.optical_flow.raft import CorrBlock

from visiontrain.flow.deterministic import grid_sample_bilinear, needs_deterministic, resize_bilinear

RAFT_NAMES = ("raft_small", "raft_large", "raft_small_convex")


def build_raft(name: str = "raft_small") -> nn.Module:
    """A randomly initialised torchvision RAFT (never downloads; files load through
    :func:`visiontrain.flow.inference.load_flow_model`).

    ``raft_small`` (~1.0 M parameters) and ``raft_large`` (~5.3 M) are torchvision's builders as they are.
    ``raft_small_convex`` (~1.36 M) is torchvision's ``raft_small`` given torchvision's ``MaskPredictor``,
    i.e. RAFT-large's learned convex upsampling instead of RAFT-small's bilinear upsampling of the 1/8
    resolution flow; it keeps motion boundaries sharp (bilinear upsampling smears them over 8 pixels)
    for about 30 % more time per training step. Its state dict is ``raft_small``'s plus ``mask_predictor.*``.
    The mask predictor starts as exact bilinear interpolation (:func:`init_convex_upsampling_as_bilinear`),
    so the untrained model upsamples like ``raft_small`` and training only has to learn the boundaries.
    """
    from torchvision.models import optical_flow
    from torchvision.models.optical_flow.raft import MaskPredictor

    if name not in RAFT_NAMES:
        raise ValueError(f"model '{name}' is not one of {', '.join(RAFT_NAMES)}")
    corr = Float32CorrBlock(num_levels=4, radius=4 if name == "raft_large" else 3)  # the builders' values
    if name == "raft_small_convex":
        # the hidden state of raft_small is 96 channels; hidden_size and multiplier as in raft_large
        mask = MaskPredictor(in_channels=96, hidden_size=256, multiplier=0.25)
        init_convex_upsampling_as_bilinear(mask)
        model = optical_flow.raft_small(weights=None, progress=False, mask_predictor=mask, corr_block=corr)
    else:
        model = getattr(optical_flow, name)(weights=None, progress=False, corr_block=corr)
    model.__class__ = RAFT  # torchvision's module, with ``upsample`` in forward (no new state)
    return model


class RAFT(_TorchvisionRAFT):
    """torchvision's ``RAFT`` whose ``forward`` also takes ``upsample`` (``all``: torchvision's forward;
    ``last``: the mask predictor for the last prediction only, :func:`raft_forward`). The choice lives in
    ``forward`` so that it reaches the model through ``DistributedDataParallel``, which only forwards
    ``forward``'s arguments. Same modules and state dict as torchvision's class. Training on a GPU under
    deterministic algorithms runs the same steps with reproducible bilinear ops
    (:mod:`visiontrain.flow.deterministic`)."""

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int = 12,
                upsample: str = "all") -> list[torch.Tensor]:
        if ((upsample == "all" or self.mask_predictor is None)
                and not needs_deterministic(image1, next(self.parameters()))):
            return super().forward(image1, image2, num_flow_updates=num_flow_updates)
        return _raft_updates(self, image1, image2, num_flow_updates, convex_all=upsample == "all")


class Float32CorrBlock(CorrBlock):
    """torchvision's ``CorrBlock``, with the correlation volume built in float32 under autocast.

    Under bf16 autocast the all-pairs dot products come out of the matrix product rounded to 8 bits of
    mantissa, which blurs the sub-pixel shape of the correlation peaks the update block learns to read
    (``grid_sample`` already runs in float32 under autocast). The original RAFT does the same: its mixed
    precision casts the feature maps to float before building the volume. The volume is small
    (``(HW/64)^2`` values), so float32 costs nothing measurable. Without autocast it is torchvision's
    block exactly; it has no parameters, so state dicts are unchanged.
    """

    def build_pyramid(self, fmap1: torch.Tensor, fmap2: torch.Tensor) -> None:
        with torch.autocast(device_type=fmap1.device.type, enabled=False):
            super().build_pyramid(fmap1.float(), fmap2.float())

    def index_pyramid(self, centroids_coords: torch.Tensor) -> torch.Tensor:
        """torchvision's lookup, the same arithmetic in the same order (bit for bit, tested), sampling through
        :func:`grid_sample_bilinear`: torch's ``grid_sample``, or its reproducible twin when training on a
        GPU under deterministic algorithms. One code path for both, so every CPU test runs it."""
        side = 2 * self.radius + 1
        offsets = torch.linspace(-self.radius, self.radius, side)
        delta = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).to(centroids_coords.device)
        delta = delta.view(1, side, side, 2)
        batch, _, h, w = centroids_coords.shape
        centroids = centroids_coords.permute(0, 2, 3, 1).reshape(batch * h * w, 1, 1, 2)
        levels = []
        for volume in self.corr_pyramid:  # [B*h*w, 1, H_l, W_l]; positions in pixels of the level
            height, width = volume.shape[-2:]
            x, y = (centroids + delta).split([1, 1], dim=-1)
            grid = torch.cat([2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1], dim=-1)
            levels.append(grid_sample_bilinear(volume, grid, align_corners=True).view(batch, h, w, -1))
            centroids = centroids / 2
        return torch.cat(levels, dim=-1).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def init_convex_upsampling_as_bilinear(mask_predictor: nn.Module, factor: int = 8, floor: float = 1e-4) -> None:
    """Make a torchvision ``MaskPredictor`` output, for any input, the masks of bilinear interpolation.

    RAFT's convex upsampling gives full-resolution pixel ``(8Y + i, 8X + j)`` the softmax-weighted mean of
    the 3 x 3 coarse flows around cell ``(Y, X)``; the mask has ``9 * 8 * 8`` channels ordered
    (neighbour ``(dy, dx)`` row-major, ``i``, ``j``). Cell-centred bilinear interpolation puts the pixel at
    ``(i + 0.5) / 8 - 0.5`` cells from the centre and weighs the neighbours by the tent function; those
    weights (floored at ``floor``; the zero ones) become the final conv's bias, in logits, with its weights
    zeroed. A linear flow field is then upsampled exactly away from the border (where torchvision pads the
    neighbours with zeros), and the weights still get gradients, so training departs from it where needed.
    Random initialisation instead starts from random convex combinations, which blur even smooth motion.
    """
    offsets = (torch.arange(factor, dtype=torch.float64) + 0.5) / factor - 0.5  # in cells, per sub-position
    tent = torch.stack([(-offsets).clamp(min=0), 1 - offsets.abs(), offsets.clamp(min=0)])  # [3 neighbours, factor]
    weights = tent[:, None, :, None] * tent[None, :, None, :]  # [dy, dx, i, j]
    logits = weights.reshape(9 * factor * factor).clamp(min=floor).log() / mask_predictor.multiplier
    mask_predictor.conv.weight.zero_()
    mask_predictor.conv.bias.copy_(logits.to(mask_predictor.conv.bias.dtype))


# torchvision's RAFT refuses smaller inputs: its CorrBlock halves the 1/8-resolution feature maps 3 times
# (4 levels) and needs them at least 2**4 = 16 pixels on each side, i.e. images of at least 128 x 128.
RAFT_MIN_SIZE = 128


def pad_to_multiple(images: torch.Tensor, multiple: int = 8, minimum: int = RAFT_MIN_SIZE
                    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad ``[B, C, H, W]`` by edge replication, centred, to ``H``, ``W`` divisible by ``multiple`` and at
    least ``minimum``. Returns the padded tensor and ``(left, right, top, bottom)``."""
    h, w = images.shape[-2:]
    ph = max(minimum, h + (-h) % multiple) - h
    pw = max(minimum, w + (-w) % multiple) - w
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if ph == 0 and pw == 0:
        return images, pads
    return F.pad(images, pads, mode="replicate"), pads


UPSAMPLE_MODES = ("all", "last")


def raft_forward(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor,
                 num_flow_updates: int = 12, upsample: str = "all") -> list[torch.Tensor]:
    """Run RAFT on ``[0, 1]`` images ``[B, 3, H, W]`` -> ``num_flow_updates`` predictions
    ``[B, 2, H, W]`` (first to last), in pixels of the input images.

    ``upsample`` says which predictions go through the model's learned convex upsampling (models with a
    ``mask_predictor``: ``raft_large``, ``raft_small_convex``): ``all`` is torchvision's forward exactly;
    ``last`` upsamples the intermediate 1/8-resolution flows bilinearly (as ``raft_small`` does) and runs
    the mask predictor once, for the last prediction. The last prediction is the same either way; the
    intermediate ones differ only in how they are upsampled. A RAFT not made by :func:`build_raft`
    (torchvision's class itself) always runs torchvision's forward: the same last prediction. For ``raft_small_convex`` at 6 updates a
    training step with ``last`` takes 0.84x the time, about ``raft_small``'s (BENCHMARKS.md)."""
    if image1.shape != image2.shape or image1.ndim != 4 or image1.shape[1] != 3:
        raise ValueError(f"raft_forward: image1 {list(image1.shape)} and image2 {list(image2.shape)} must both "
                         f"be [B, 3, H, W]")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"raft_forward: upsample={upsample!r} must be one of {', '.join(UPSAMPLE_MODES)}")
    h, w = image1.shape[-2:]
    both, (left, _, top, _) = pad_to_multiple(torch.cat([image1, image2]) * 2.0 - 1.0)
    first, second = both.chunk(2)
    first, second = first.contiguous(), second.contiguous()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    # through the model's (or DDP's) forward; a RAFT built by torchvision directly runs its own forward
    extra = {"upsample": upsample} if isinstance(inner, RAFT) else {}
    preds = model(first, second, num_flow_updates=num_flow_updates, **extra)
    if both.shape[-2:] != (h, w):
        preds = [p[..., top:top + h, left:left + w] for p in preds]
    return preds


def _raft_updates(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor,
                  num_flow_updates: int, convex_all: bool = False) -> list[torch.Tensor]:
    """torchvision's ``RAFT.forward`` (same modules, same order of operations) with the convex upsampling
    for every prediction (``convex_all``: torchvision's forward) or only the last one, the earlier ones
    upsampled bilinearly. ``image1``/``image2`` are already in ``[-1, 1]`` and padded to multiples of 8."""
    from torchvision.models.optical_flow._utils import make_coords_grid

    batch, _, h, w = image1.shape
    fmap1, fmap2 = model.feature_encoder(torch.cat([image1, image2], dim=0)).chunk(2, dim=0)
    model.corr_block.build_pyramid(fmap1, fmap2)
    context_out = model.context_encoder(image1)
    hidden_size = model.update_block.hidden_state_size
    hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
    hidden, context = torch.tanh(hidden), F.relu(context)
    coords0 = make_coords_grid(batch, h // 8, w // 8).to(fmap1.device)
    coords1 = make_coords_grid(batch, h // 8, w // 8).to(fmap1.device)
    preds = []
    for k in range(num_flow_updates):
        coords1 = coords1.detach()  # as torchvision (and the paper): no gradient through the flow estimate
        corr = model.corr_block.index_pyramid(centroids_coords=coords1)
        hidden, delta = model.update_block(hidden, context, corr, coords1 - coords0)
        coords1 = coords1 + delta
        convex = model.mask_predictor is not None and (convex_all or k == num_flow_updates - 1)
        preds.append(_upsample_flow(coords1 - coords0, model.mask_predictor(hidden) if convex else None))
    return preds


def _upsample_flow(flow: torch.Tensor, up_mask: torch.Tensor | None, factor: int = 8) -> torch.Tensor:
    """torchvision's ``upsample_flow``; its bilinear branch through :func:`resize_bilinear`."""
    from torchvision.models.optical_flow._utils import upsample_flow

    if up_mask is not None:
        return upsample_flow(flow=flow, up_mask=up_mask, factor=factor)
    h, w = flow.shape[-2:]
    return factor * resize_bilinear(flow, (h * factor, w * factor), align_corners=True)
