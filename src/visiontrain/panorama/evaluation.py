"""Evaluating a panorama model on a loader of samples: the loop the training task and ``eval`` share.

For each batch ``{views [B, 4, 3, s, s], cameras [B, 4, 5], panorama [B, 3, H, 2H]}`` the model's panoramas
(:class:`.inference.Sampler`) and the back-projection baseline (:func:`.baseline.backprojection_baseline`)
are scored against the target over the whole panorama and its seen / unseen regions
(:class:`.metrics.RegionMetrics`); the flow-matching loss on the same batch gives ``val_flow``. One generator
supplies all the noise (loss, then sampling, batch by batch), so the same generator seed gives the same
numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visiontrain.engine.checkpoint import unwrap
from visiontrain.panorama.baseline import backprojection_baseline
from visiontrain.panorama.data import PanoramaDataError
from visiontrain.panorama.flow_matching import flow_matching_loss
from visiontrain.panorama.inference import Sampler
from visiontrain.panorama.metrics import PerceptualMetrics, RegionMetrics, SeamMetric


@torch.no_grad()
def evaluate_panoramas(model: nn.Module, loader: torch.utils.data.DataLoader, sampler: Sampler,
                       generator: torch.Generator, logit_mean: float = 1.0, logit_std: float = 1.0,
                       lpips_weights: str = "", fid_weights: str = "") -> dict[str, float]:
    """PSNR / SSIM / MSE / MAE (``psnr``, ``psnr_seen``, ``psnr_unseen``…) of the sampled panoramas and of
    the baseline (``baseline_*``), the longitude seam of both (``seam``, ``seam_truth``, ``seam_ratio``,
    ``baseline_seam_ratio``: :class:`.metrics.SeamMetric`), the validation flow loss ``val_flow`` (``t`` logit-normal with
    ``logit_mean``, ``logit_std``, as in training), and ``lpips`` / ``fid`` when their local weight files are
    given. ``model`` may be DDP-wrapped; batches are moved to its device."""
    model = unwrap(model)
    device = next(model.parameters()).device
    ours, base = RegionMetrics(), RegionMetrics(prefix="baseline_")
    seams, base_seams = SeamMetric(), SeamMetric(prefix="baseline_")
    perceptual = PerceptualMetrics(lpips_weights, fid_weights, device)
    loss_sum, n = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        target = batch["panorama"]
        cond = model.condition(batch["views"], batch["cameras"])
        loss = flow_matching_loss(model, target, cond, generator, logit_mean, logit_std)
        loss_sum += float(loss) * target.shape[0]
        n += target.shape[0]
        pred = sampler.sample(model, cond, generator)
        baseline, seen = backprojection_baseline(batch["views"], batch["cameras"], model.cfg.pano_size)
        ours.update(pred, target, seen)
        base.update(baseline, target, seen)
        seams.update(pred, target)
        base_seams.update(baseline, target)
        if perceptual.enabled:
            perceptual.update(pred, target)
    if n == 0:
        raise PanoramaDataError("the validation set is empty; nothing to evaluate")
    return {**ours.compute(), **seams.compute(), "val_flow": loss_sum / n, **perceptual.compute(), **base.compute(),
            **base_seams.compute()}
