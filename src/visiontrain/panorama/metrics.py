"""Image metrics over the whole panorama and over its seen / unseen regions.

All metrics are computed on images mapped from [−1, 1] to [0, 1] (``data_range = 1``), per image, then
averaged over images (:class:`RegionMetrics`). For a region mask ``M``:

* ``mse``, ``mae``: mean over the pixels in ``M`` (all three channels);
* ``psnr`` = ``10·log10(1 / mse)`` of that image's masked MSE (MSE floored at 1e-10), averaged over images;
* ``ssim``: torchmetrics' SSIM *map* (Gaussian window 11, σ = 1.5, reflection padding, so the map has
  the image's size) averaged over the channels and over the pixels in ``M``. Windows near the region border
  see pixels of the other region, so the seen/unseen SSIM values are "SSIM at pixels of the region".

An image whose mask is empty for a region (e.g. nothing unseen) contributes nothing to that region.

The seam (:class:`SeamMetric`): mean ``|first column − last column|`` of the generated panoramas divided by the
same for the ground truth (``seam_ratio``; 1 = the 360° edges meet as in a real panorama).

LPIPS and FID need pretrained networks that torchmetrics would download; here they are computed only from
local weight files the user names (:class:`PerceptualMetrics`), never downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

REGIONS = ("whole", "seen", "unseen")
BASIC = ("psnr", "ssim", "mse", "mae")


class MetricWeightsError(ValueError):
    """A perceptual metric was asked for without (or with unusable) local weights."""


def metric_key(name: str, region: str, prefix: str = "") -> str:
    """``psnr`` (whole), ``psnr_seen``, ``psnr_unseen``; with ``prefix`` e.g. ``baseline_psnr_seen``."""
    return prefix + (name if region == "whole" else f"{name}_{region}")


def masked_image_metrics(pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-image ``mse, mae, psnr, ssim`` ``[B]`` inside ``mask [B, H, W]`` for ``pred, target [B, C, H, W]``
    in [−1, 1]. Images with an empty mask get NaN."""
    p = ((pred.float() + 1) / 2).clamp(0, 1)
    g = ((target.float() + 1) / 2).clamp(0, 1)
    m = mask[:, None].float()  # [B, 1, H, W]
    count = m.sum(dim=(1, 2, 3)) * p.shape[1]  # pixel-channels in the mask
    empty = count == 0
    denom = count.clamp_min(1)
    mse = ((p - g) ** 2 * m).sum(dim=(1, 2, 3)) / denom
    mae = ((p - g).abs() * m).sum(dim=(1, 2, 3)) / denom
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    _, ssim_map = structural_similarity_index_measure(p, g, data_range=1.0, return_full_image=True)
    ssim = (ssim_map * m).sum(dim=(1, 2, 3)) / denom
    nan = torch.full_like(mse, math.nan)
    return {k: torch.where(empty, nan, v) for k, v in (("mse", mse), ("mae", mae), ("psnr", psnr), ("ssim", ssim))}


class RegionMetrics:
    """Accumulates per-image metrics for whole / seen / unseen regions; :meth:`compute` gives the means."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, pred: Tensor, target: Tensor, seen: Tensor) -> None:
        """``pred, target [B, C, H, W]`` in [−1, 1], ``seen [B, H, W]`` bool."""
        masks = {"whole": torch.ones_like(seen), "seen": seen, "unseen": ~seen}
        for region, mask in masks.items():
            for name, values in masked_image_metrics(pred, target, mask).items():
                ok = ~torch.isnan(values)
                key = metric_key(name, region, self.prefix)
                self.sums[key] = self.sums.get(key, 0.0) + float(values[ok].double().sum())
                self.counts[key] = self.counts.get(key, 0) + int(ok.sum())

    def compute(self) -> dict[str, float]:
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] else math.nan) for k in self.sums}


# ---- the longitude seam ---------------------------------------------------------------------------------------

def seam_difference(images: Tensor) -> Tensor:
    """Per-image mean ``|first column − last column|`` ``[B]`` of ``images [B, C, H, W]`` in [−1, 1], on the
    [0, 1] scale. The two columns are neighbours on the sphere (longitude ±180°), so a true panorama has the
    difference of any two adjacent columns; a generator that ignores the wrap-around has more."""
    p = ((images.float() + 1) / 2).clamp(0, 1)
    return (p[..., 0] - p[..., -1]).abs().mean(dim=(1, 2))


class SeamMetric:
    """The seam of generated panoramas relative to that of the ground truth, over a whole set:
    ``<prefix>seam`` (mean :func:`seam_difference` of the predictions), ``seam_truth`` (the same for the
    targets) and ``<prefix>seam_ratio`` = their quotient (1: the edges meet as well as a real panorama's;
    above 1: a visible seam)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.pred_sum, self.truth_sum, self.n = 0.0, 0.0, 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred, target [B, C, H, W]`` in [−1, 1]."""
        self.pred_sum += float(seam_difference(pred).double().sum())
        self.truth_sum += float(seam_difference(target).double().sum())
        self.n += pred.shape[0]

    def compute(self) -> dict[str, float]:
        if not self.n:
            return {}
        pred, truth = self.pred_sum / self.n, self.truth_sum / self.n
        return {f"{self.prefix}seam": pred, "seam_truth": truth,
                f"{self.prefix}seam_ratio": pred / truth if truth > 0 else math.nan}


# ---- LPIPS and FID from local weight files -----------------------------------------------------------------

def _load_local_state(path: str, what: str, option: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise MetricWeightsError(f"{option}={path}: no such file. {what}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricWeightsError(f"{option}={path}: cannot be read with weights_only=True ({type(e).__name__}: "
                                 f"{e}). {what}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MetricWeightsError(f"{option}={path}: expected a state dict. {what}")
    return state


LPIPS_HELP = ("LPIPS needs torchvision's ImageNet AlexNet weights as a local file (the file torchvision "
              "names alexnet-owt-7be5be79.pth); point lpips_weights= at it. Nothing is downloaded.")
FID_HELP = ("FID needs torchvision's ImageNet Inception-v3 weights as a local file (the file torchvision "
            "names inception_v3_google-0cc3c7bd.pth); point fid_weights= at it. Nothing is downloaded.")


def build_lpips(weights: str) -> nn.Module:
    """LPIPS (AlexNet) from a local torchvision AlexNet state dict; the linear heads ship with torchmetrics.

    torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` downloads the backbone; we build its network
    with a random backbone (``pnet_rand=True``, no download) and load the user's file into it.
    """
    if not weights:
        raise MetricWeightsError(LPIPS_HELP)
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    state = _load_local_state(weights, LPIPS_HELP, "lpips_weights")
    alex = torchvision.models.alexnet(weights=None)
    try:
        alex.load_state_dict(state)
    except RuntimeError as e:
        raise MetricWeightsError(f"lpips_weights={weights}: not an AlexNet state dict ({str(e)[:200]}). "
                                 f"{LPIPS_HELP}") from None
    net = _NoTrainLpips(net="alex", pnet_rand=True)
    for slice_ in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
        for name, module in slice_.named_children():
            module.load_state_dict(alex.features[int(name)].state_dict())
    return net.eval()


LPIPS_MIN_HEIGHT = 64  # AlexNet's five LPIPS layers need about 32 pixels; 64 keeps a few cells per layer


def lpips_distance(net: nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    """Per-image LPIPS ``[B]`` of ``pred, target [B, 3, H, W]`` in [−1, 1], differentiable in ``pred`` (the
    network's own parameters are frozen). Images lower than :data:`LPIPS_MIN_HEIGHT` are first upsampled
    (bilinear, by a whole factor) so AlexNet's pooling does not run out of pixels."""
    h = pred.shape[-2]
    if h < LPIPS_MIN_HEIGHT:
        factor = math.ceil(LPIPS_MIN_HEIGHT / h)
        pred, target = (torch.nn.functional.interpolate(x.float(), scale_factor=factor, mode="bilinear",
                                                        align_corners=False) for x in (pred, target))
    return net(pred.float(), target.float()).reshape(-1)


class InceptionPoolFeatures(nn.Module):
    """torchvision Inception-v3 → 2048-d pool features ``[N, 2048]`` from images ``[N, 3, h, w]`` in [0, 1]."""

    num_features = 2048

    def __init__(self, weights: str):
        super().__init__()
        import torchvision

        state = _load_local_state(weights, FID_HELP, "fid_weights")
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise MetricWeightsError(f"fid_weights={weights}: not an Inception-v3 state dict ({str(e)[:200]}). "
                                     f"{FID_HELP}") from None
        net.fc = nn.Identity()
        net.aux_logits, net.AuxLogits = False, None
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


class PerceptualMetrics:
    """LPIPS and FID over whole panoramas, each only when its local weights file is given.

    FID here uses torchvision's Inception-v3 weights, so its values are not comparable to published FIDs
    (which use the TF-Inception port); with a few dozen validation images it is noisy anyway.
    """

    def __init__(self, lpips_weights: str = "", fid_weights: str = "", device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.lpips = build_lpips(lpips_weights).to(self.device) if lpips_weights else None
        self.fid = None
        if fid_weights:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.fid = FrechetInceptionDistance(feature=InceptionPoolFeatures(fid_weights), normalize=True)
            self.fid = self.fid.to(self.device)
        self.lpips_sum, self.lpips_n = 0.0, 0

    @property
    def enabled(self) -> bool:
        return self.lpips is not None or self.fid is not None

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred, target [B, 3, H, W]`` in [−1, 1]."""
        pred, target = pred.clamp(-1, 1).to(self.device), target.clamp(-1, 1).to(self.device)
        if self.lpips is not None:
            scores = self.lpips(pred.float(), target.float()).reshape(-1)
            self.lpips_sum += float(scores.double().sum())
            self.lpips_n += scores.numel()
        if self.fid is not None:
            self.fid.update((target.float() + 1) / 2, real=True)
            self.fid.update((pred.float() + 1) / 2, real=False)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.lpips is not None and self.lpips_n:
            out["lpips"] = self.lpips_sum / self.lpips_n
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        return out
