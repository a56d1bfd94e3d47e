"""RAFT from ``torchvision.models.optical_flow`` (not re-implemented here): building, weights, running.

The model *is* torchvision's ``RAFT`` module, so its state dict is torchvision's: a torchvision
checkpoint (``raft_small_C_T_V2-*.pth``) loads as is, and our checkpoints load back into torchvision.

:func:`raft_forward` is the one place that knows RAFT's input convention: images in ``[-1, 1]`` with
``H`` and ``W`` divisible by 8. It takes ``[0, 1]`` images of any size, pads them (edge replication,
centred, to at least 128 x 128, which RAFT's correlation pyramid needs) and crops the predictions
back. The number of refinement steps is an argument, so training and evaluation can use different
counts (``num_flow_updates_train`` / ``_eval``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RAFT_NAMES = ("raft_small", "raft_large")


def build_raft(name: str = "raft_small", weights: str | Path | None = None) -> nn.Module:
    """A torchvision RAFT (``raft_small`` ~1.0 M or ``raft_large`` ~5.3 M parameters), randomly
    initialised or loaded from a local ``weights`` file (see :func:`load_raft_weights`). Never downloads."""
    from torchvision.models import optical_flow

    if name not in RAFT_NAMES:
        raise ValueError(f"model '{name}' is not one of {', '.join(RAFT_NAMES)}")
    model = getattr(optical_flow, name)(weights=None, progress=False)
    if weights:
        load_raft_weights(model, weights)
    return model


def load_raft_weights(model: nn.Module, path: str | Path, prefer_ema: bool = True) -> None:
    """Load a torchvision RAFT state dict (``.pth``) or a visiontrain checkpoint (its EMA weights when
    it has them). Mismatched files raise an error naming the missing / unexpected / mis-shaped keys,
    e.g. a ``raft_large`` file loaded into ``raft_small``."""
    from visiontrain.engine.checkpoint import load_model_weights

    load_model_weights(model, path, task="flow", prefer_ema=prefer_ema)


RAFT_MIN_SIZE = 128  # the 4-level correlation pyramid needs feature maps of at least 16 x 16


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


def raft_forward(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor,
                 num_flow_updates: int = 12) -> list[torch.Tensor]:
    """Run RAFT on ``[0, 1]`` images ``[B, 3, H, W]`` -> ``num_flow_updates`` predictions
    ``[B, 2, H, W]`` (first to last), in pixels of the input images."""
    if image1.shape != image2.shape or image1.ndim != 4 or image1.shape[1] != 3:
        raise ValueError(f"raft_forward: image1 {list(image1.shape)} and image2 {list(image2.shape)} must both "
                         f"be [B, 3, H, W]")
    h, w = image1.shape[-2:]
    both, (left, _, top, _) = pad_to_multiple(torch.cat([image1, image2]) * 2.0 - 1.0)
    first, second = both.chunk(2)
    preds = model(first.contiguous(), second.contiguous(), num_flow_updates=num_flow_updates)
    if both.shape[-2:] != (h, w):
        preds = [p[..., top:top + h, left:left + w] for p in preds]
    return preds
