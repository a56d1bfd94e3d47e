"""The unsupervised training objective of UFlow (Jonschkowski et al. 2020), for a flow task's training_step.

No ground truth is used. For a pair ``(image1, image2)`` the model predicts forward and backward
flow in one call; each direction is scored by

- **census** photometric loss between the image and the other image warped back by the flow,
  masked by estimated non-occlusion (``wang`` range map by default) and in-bounds samples;
- **edge-aware smoothness** (first and/or second order) of the 1/4-resolution flow;
- optional **SSIM** photometric loss (same mask);
- **self-supervision** (after ``selfsup_start_step``): the full-image prediction teaches the
  prediction on a central crop (see :mod:`visiontrain.flow.selfsup`);
- **out of frame** (0 unless the mask collapses): below a kept share ``mask_floor`` the photometric
  mask falls back towards all pixels and flow pointing out of the image is pulled back, so the
  all-occluded state is never free (see :mod:`visiontrain.flow.losses.mask_floor`).

``stat/mask_kept`` (logged, not trained) is the share of pixels the final prediction's masks keep.
A model that returns ``flow_fw_sequence`` / ``flow_bw_sequence`` (RAFT through
:class:`~visiontrain.flow.models.raft_pair.RaftPair`) has every iteration scored, weighted
``sequence_gamma^(N-1-i)`` as in SMURF; ``full`` (:class:`~visiontrain.flow.losses.full_frame.FullFrame`)
says the images are a crop of larger frames, which the photometric loss then warps (SMURF's full-image
warping).

Each term is the mean of its forward and backward values times its weight. Defaults are those of
UFlow's public code (``uflow_flags.py``): ``weight_census=1``, ``weight_smooth1=0``,
``weight_smooth2=2``, edge constant 150 (exponential), smoothness at level 2, ``occlusion_estimation
='wang'`` from step 0, ``weight_selfsup=0.6`` after 500k steps with a 100k-step ramp, ``weight_ssim=0``.
Those step counts assume UFlow's 1M-step schedule; shorter runs should scale them.

The teacher of self-supervision is the same forward pass used for the photometric losses, detached
(UFlow runs the teacher on un-augmented images; here the objective sees one version of the pair, so
the two coincide and one forward pass is saved). The occlusion and validity masks are computed from
detached flows: they pass no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visiontrain.flow.losses.census import census_loss
from visiontrain.flow.losses.full_frame import FullFrame, warp_full
from visiontrain.flow.losses.mask_floor import MASK_FLOOR, floored_mask, kept_share, out_of_frame_loss
from visiontrain.flow.losses.occlusion import OCCLUSION_METHODS, estimate_occlusion
from visiontrain.flow.losses.photometric import ssim_loss
from visiontrain.flow.losses.smoothness import (
    EDGE_CONSTANT,
    downsample_image,
    smoothness_first_order,
    smoothness_second_order,
)
from visiontrain.flow.selfsup import (
    SELFSUP_CROP_FRACTION,
    SELFSUP_RAMP_STEPS,
    SELFSUP_START_STEP,
    SELFSUP_WEIGHT,
    self_supervision,
    selfsup_weight_at,
)
from visiontrain.flow.warp import resize_flow, warp, warp_valid_mask


@dataclass
class UnsupervisedFlowObjective:
    """``objective(model, image1, image2, step) -> {"census": t, "smooth2": t, "selfsup": t, ...}``.

    ``model(image1, image2)`` must return a dict with ``flow_fw`` and ``flow_bw`` ``[B, 2, H, W]`` (full
    resolution, pixels) and may return ``flow_fw_pyramid[0]`` / ``flow_bw_pyramid[0]``, the flow at
    1/4 resolution used for smoothness (otherwise the full flow is resized to 1/4). Images are
    ``[B, 3, H, W]`` in [0, 1]. Only terms with a non-zero weight are returned; ``selfsup`` is a
    zero tensor before ``selfsup_start_step`` so the set of names stays the same across steps.
    """

    census_weight: float = 1.0
    smooth1_weight: float = 0.0
    smooth2_weight: float = 2.0
    edge_constant: float = EDGE_CONSTANT
    smoothness_scale: int = 4
    occlusion: str = "wang"
    occlusion_start_step: int = 0
    selfsup_weight: float = SELFSUP_WEIGHT
    selfsup_start_step: int = SELFSUP_START_STEP
    selfsup_ramp_steps: int = SELFSUP_RAMP_STEPS
    selfsup_crop_fraction: float = SELFSUP_CROP_FRACTION
    ssim_weight: float = 0.0
    mask_floor: float = MASK_FLOOR
    out_of_frame_weight: float = 1.0
    sequence_gamma: float = 0.8

    def __post_init__(self) -> None:
        if self.occlusion not in OCCLUSION_METHODS:
            raise ValueError(f"occlusion={self.occlusion!r} is unknown; use one of {', '.join(OCCLUSION_METHODS)}")
        if not 0.0 <= self.mask_floor < 1.0:
            raise ValueError(f"mask_floor must be in [0, 1), got {self.mask_floor}")
        for name in ("census_weight", "smooth1_weight", "smooth2_weight", "selfsup_weight", "ssim_weight",
                     "out_of_frame_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.census_weight == 0 and self.ssim_weight == 0:
            raise ValueError("census_weight and ssim_weight are both 0: nothing ties the flow to the images")

    # --- masks -----------------------------------------------------------------------------------
    def occlusion_masks(self, flow_fw: torch.Tensor, flow_bw: torch.Tensor, step: int | None = None,
                        full: FullFrame | None = None) -> dict[str, torch.Tensor]:
        """Detached ``[B, 1, H, W]`` masks: ``occlusion_fw`` (pixels of image 1 hidden in image 2),
        ``occlusion_bw`` (of image 2 in image 1), ``valid_fw`` / ``valid_bw`` (flow points inside the
        other image), and ``mask_fw`` / ``mask_bw`` = (1 - occlusion) * valid, what the losses use.
        With ``full`` (the flows are a crop's) validity is judged in the full frame, and a pixel whose flow
        leaves the crop is not called occluded (nothing of the crop can land on it; SMURF does the same)."""
        method = self.occlusion
        if step is not None and step < self.occlusion_start_step:
            method = "none"
        occ_fw = estimate_occlusion(flow_fw, flow_bw, method)
        occ_bw = estimate_occlusion(flow_bw, flow_fw, method)
        valid_fw, valid_bw = warp_valid_mask(flow_fw), warp_valid_mask(flow_bw)
        if full is not None:
            occ_fw, occ_bw = occ_fw * valid_fw, occ_bw * valid_bw  # in-crop validity: leaving the crop is fine
            frame_valid = [warp_full(full.image2[:, :1], flow_fw.detach(), full.top, full.left)[1],
                           warp_full(full.image1[:, :1], flow_bw.detach(), full.top, full.left)[1]]
            valid_fw, valid_bw = frame_valid
        return {
            "occlusion_fw": occ_fw, "occlusion_bw": occ_bw, "valid_fw": valid_fw, "valid_bw": valid_bw,
            "mask_fw": ((1.0 - occ_fw) * valid_fw).detach(), "mask_bw": ((1.0 - occ_bw) * valid_bw).detach(),
        }

    # --- terms -----------------------------------------------------------------------------------
    def _quarter(self, flow: torch.Tensor, pyramid: list | None) -> torch.Tensor:
        if pyramid:
            return pyramid[0]
        height, width = flow.shape[-2:]
        return resize_flow(flow, (height // self.smoothness_scale, width // self.smoothness_scale))

    def _direction_terms(self, image_a: torch.Tensor, image_b: torch.Tensor, flow: torch.Tensor,
                         flow_quarter: torch.Tensor, mask: torch.Tensor, source: torch.Tensor | None = None,
                         full: FullFrame | None = None) -> dict[str, torch.Tensor]:
        """Unweighted terms for flow from ``image_a`` to ``image_b``; ``source``: the full image to warp
        (full-image warping, ``full`` gives the offset), else ``image_b``."""
        terms: dict[str, torch.Tensor] = {}
        weight, fallback = floored_mask(mask, self.mask_floor)
        if source is not None and full is not None:
            warped = warp_full(source, flow, full.top, full.left)[0]
            frame, offset = tuple(source.shape[-2:]), (full.top, full.left)
        else:
            warped = warp(image_b, flow)
            frame, offset = None, (0, 0)
        if self.census_weight:
            terms["census"] = census_loss(image_a, warped, weight)
        if self.ssim_weight:
            terms["ssim"] = ssim_loss(image_a, warped, weight)
        if self.smooth1_weight or self.smooth2_weight:
            image_small = downsample_image(image_a, tuple(flow_quarter.shape[-2:]))
            if self.smooth1_weight:
                terms["smooth1"] = smoothness_first_order(image_small, flow_quarter, self.edge_constant)
            if self.smooth2_weight:
                terms["smooth2"] = smoothness_second_order(image_small, flow_quarter, self.edge_constant)
        if self.out_of_frame_weight:
            terms["out_of_frame"] = out_of_frame_loss(flow, fallback, frame, offset)
        return terms

    def pair_terms(self, image1: torch.Tensor, image2: torch.Tensor, flow_fw: torch.Tensor, flow_bw: torch.Tensor,
                   quarter_fw: torch.Tensor, quarter_bw: torch.Tensor, step: int | None,
                   full: FullFrame | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Weighted photometric, smoothness and out-of-frame terms of one forward/backward flow pair (mean of
        the two directions) and the kept share of their masks (a detached scalar)."""
        masks = self.occlusion_masks(flow_fw, flow_bw, step, full)
        sources = (full.image2, full.image1) if full is not None else (None, None)
        fw = self._direction_terms(image1, image2, flow_fw, quarter_fw, masks["mask_fw"], sources[0], full)
        bw = self._direction_terms(image2, image1, flow_bw, quarter_bw, masks["mask_bw"], sources[1], full)
        weights = {"census": self.census_weight, "ssim": self.ssim_weight, "smooth1": self.smooth1_weight,
                   "smooth2": self.smooth2_weight, "out_of_frame": self.out_of_frame_weight}
        share = (kept_share(masks["mask_fw"]).mean() + kept_share(masks["mask_bw"]).mean()) / 2.0
        return {name: weights[name] * (fw[name] + bw[name]) / 2.0 for name in fw}, share

    def __call__(self, model: Callable[..., dict], image1: torch.Tensor, image2: torch.Tensor, step: int,
                 full: FullFrame | None = None) -> dict[str, torch.Tensor]:
        if image1.shape != image2.shape or image1.dim() != 4 or image1.shape[1] != 3:
            raise ValueError(f"objective: need image1, image2 [B, 3, H, W] of one shape, got "
                             f"{tuple(image1.shape)} and {tuple(image2.shape)}")
        prediction = model(image1, image2)
        if "flow_bw" not in prediction:
            raise ValueError("objective: the model returned no 'flow_bw'; unsupervised training needs both "
                             "directions (call a model that predicts forward and backward flow)")
        sequence_fw = prediction.get("flow_fw_sequence") or [prediction["flow_fw"]]
        sequence_bw = prediction.get("flow_bw_sequence") or [prediction["flow_bw"]]
        single = len(sequence_fw) == 1
        terms: dict[str, torch.Tensor] = {}
        share = image1.new_zeros(())
        for i, (flow_fw, flow_bw) in enumerate(zip(sequence_fw, sequence_bw)):
            decay = self.sequence_gamma ** (len(sequence_fw) - 1 - i)  # SMURF: every RAFT iteration, 0.8^(N-1-i)
            quarter_fw = self._quarter(flow_fw, prediction.get("flow_fw_pyramid") if single else None)
            quarter_bw = self._quarter(flow_bw, prediction.get("flow_bw_pyramid") if single else None)
            pair, share = self.pair_terms(image1, image2, flow_fw, flow_bw, quarter_fw, quarter_bw, step, full)
            for name, value in pair.items():
                terms[name] = terms[name] + decay * value if name in terms else decay * value
        if self.selfsup_weight:
            weight = selfsup_weight_at(step, self.selfsup_weight, self.selfsup_start_step, self.selfsup_ramp_steps)
            if weight > 0:
                terms["selfsup"] = weight * self_supervision(
                    model, image1, image2, sequence_fw[-1].detach(), sequence_bw[-1].detach(),
                    self.selfsup_crop_fraction, self.sequence_gamma)
            else:
                terms["selfsup"] = sequence_fw[-1].new_zeros(())
        terms["stat/mask_kept"] = share.detach()  # of the final prediction's masks
        return terms


def save_mask_png(mask: torch.Tensor, path: str | Path) -> Path:
    """Write one mask ``[1, H, W]`` or ``[H, W]`` in [0, 1] (e.g. an occlusion mask) as an 8-bit PNG."""
    import cv2

    array = mask.detach().float().cpu().squeeze().clamp(0, 1).numpy()
    if array.ndim != 2:
        raise ValueError(f"save_mask_png: expected one mask [1, H, W] or [H, W], got {tuple(mask.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.round(array * 255).astype(np.uint8)):
        raise OSError(f"could not write {path}")
    return path
