"""The RAFT sequence loss: an exponentially weighted L1 over every refinement step."""

from __future__ import annotations

import torch


def sequence_loss(
    preds: list[torch.Tensor],
    gt: torch.Tensor,
    valid: torch.Tensor,
    gamma: float = 0.8,
    max_flow: float = 400.0,
) -> torch.Tensor:
    """Weighted L1 between each prediction and the ground truth, averaged over valid pixels.

    Args:
        preds: ``N`` predictions ``[B, 2, H, W]``, first to last refinement.
        gt: ground-truth flow ``[B, 2, H, W]``.
        valid: ``[B, H, W]`` bool; pixels with ``|gt| >= max_flow`` are dropped as well.
        gamma: prediction ``i`` is weighted ``gamma ** (N - 1 - i)`` (the last one gets 1).

    Returns:
        scalar ``sum_i w_i * sum_{valid p} (|du| + |dv|) / 2 / n_valid`` where ``n_valid`` counts valid pixels
        over the whole batch (pooled, so every valid pixel weighs the same).

    Difference to torchvision's reference (``references/optical_flow/train.py``) and the original RAFT
    code: those take the *mean over all pixels* of ``valid * |pred - gt|``, i.e. they divide by every
    pixel, valid or not. On dense data (FlyingChairs, Sintel: all pixels valid) the two agree exactly;
    on sparse data (KITTI, ~20-50 % valid) theirs is smaller by the valid fraction, so the loss scale,
    and in effect the learning rate, varies from batch to batch with the ground-truth density. Ours does
    not. A batch with no valid pixel gives 0 (with a graph, so backward still works).
    """
    if not preds:
        raise ValueError("sequence_loss: preds is empty")
    if gamma > 1:
        raise ValueError(f"sequence_loss: gamma must be <= 1, got {gamma}")
    if gt.ndim != 4 or gt.shape[1] != 2:
        raise ValueError(f"sequence_loss: gt must be [B, 2, H, W], got {list(gt.shape)}")
    if valid.shape != (gt.shape[0], *gt.shape[2:]):
        raise ValueError(f"sequence_loss: valid must be [B, H, W] = {[gt.shape[0], *gt.shape[2:]]}, "
                         f"got {list(valid.shape)}")
    for i, p in enumerate(preds):
        if p.shape != gt.shape:
            raise ValueError(f"sequence_loss: prediction {i} has shape {list(p.shape)}, gt {list(gt.shape)}")
    mask = valid.bool() & (torch.linalg.vector_norm(gt, dim=1) < max_flow)  # [B, H, W]
    n_valid = mask.sum().clamp(min=1).to(gt.dtype)
    mask = mask[:, None].to(gt.dtype)  # [B, 1, H, W]
    gt_safe = torch.where(mask.bool(), gt, torch.zeros_like(gt))  # unknown gt may hold huge values
    n = len(preds)
    loss = gt.new_zeros(())
    for i, pred in enumerate(preds):
        l1 = ((pred - gt_safe).abs() * mask).sum() / (2.0 * n_valid)
        loss = loss + gamma ** (n - 1 - i) * l1
    return loss
