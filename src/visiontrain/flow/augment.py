"""Training augmentation for flow pairs that keeps the ground truth exact.

A sample here is a dict of NumPy arrays: ``image1``, ``image2`` ``[H, W, 3] float32`` in ``[0, 1]``,
``flow [H, W, 2] float32`` (or ``None``) and ``valid [H, W] bool`` (or ``None``). Pixel centres sit at
integer coordinates, so a resize from ``W`` to ``W'`` maps ``x -> (x + 0.5) W'/W - 0.5`` and a
displacement ``u -> u W'/W`` exactly.

* photometric jitter (brightness, contrast, saturation, hue): one pointwise colour map applied to both
  images (*symmetric*), or, with probability ``asymmetric_prob``, an independent map per image;
* random rescale with optional independent x/y stretch: images and flow resized bilinearly, flow
  multiplied by the per-axis factors. Bilinear resampling of a locally affine flow is exact inside each
  moving region. Sparse flow (KITTI-style, some pixels invalid) is resampled from valid pixels only:
  a new pixel is valid only if all four of its bilinear neighbours are valid;
* horizontal / vertical flips (``u`` / ``v`` change sign);
* random crop to ``crop = (h, w)``. Images must be at least the crop (the flow task checks every training
  image's size before step 1); the crop never resizes them. The random rescale may enlarge an image as
  an augmentation; its factor is only kept from shrinking the image below the crop (as in RAFT).

All randomness comes from the ``numpy.random.Generator`` passed in (``sample_rng(seed, epoch, index)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from visiontrain.config import ConfigError, opt
from visiontrain.flow.sizes import format_size

Sample = dict  # {"image1", "image2", "flow", "valid", ...}


@dataclass
class FlowAugmentConfig:
    enabled: bool = opt(True, "augment training samples (validation is never augmented)")
    min_scale: float = opt(-0.2, "log2 of the smallest random rescale factor")
    max_scale: float = opt(0.5, "log2 of the largest random rescale factor")
    scale_prob: float = opt(0.8, "probability of a random rescale")
    stretch_prob: float = opt(0.8, "probability of an extra independent x/y stretch when rescaling")
    max_stretch: float = opt(0.2, "log2 bound of the x/y stretch")
    hflip_prob: float = opt(0.5, "probability of a horizontal flip")
    vflip_prob: float = opt(0.1, "probability of a vertical flip")
    photometric: bool = opt(True, "colour jitter (false: images keep their colours; with scale_prob=0 this is "
                                  "the short-budget recipe in BENCHMARKS.md)")
    brightness: float = opt(0.4, "brightness jitter: factor in [1-b, 1+b]")
    contrast: float = opt(0.4, "contrast jitter: factor in [1-c, 1+c]")
    saturation: float = opt(0.4, "saturation jitter: factor in [1-s, 1+s]")
    hue: float = opt(0.16, "hue jitter: rotation in [-h, h] turns")
    asymmetric_prob: float = opt(0.2, "probability of jittering the two images independently")

    def __post_init__(self) -> None:
        limits = {"scale_prob": 1, "stretch_prob": 1, "hflip_prob": 1, "vflip_prob": 1, "asymmetric_prob": 1,
                  "brightness": 1, "contrast": 1, "saturation": 1, "hue": 0.5, "max_stretch": 2}
        for key, high in limits.items():
            if not 0 <= getattr(self, key) <= high:
                raise ConfigError(f"aug.{key}={getattr(self, key)} must be in [0, {high}]")
        if self.min_scale > self.max_scale:
            raise ConfigError(f"aug.min_scale={self.min_scale} is above aug.max_scale={self.max_scale} (log2 factors)")


# ------------------------------------------------------------------------------------ photometric
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def color_jitter_params(rng: np.random.Generator, cfg: FlowAugmentConfig) -> dict[str, float]:
    """Random ``brightness``, ``contrast``, ``saturation`` factors and ``hue`` turns."""
    return {
        "brightness": float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)),
        "contrast": float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)),
        "saturation": float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)),
        "hue": float(rng.uniform(-cfg.hue, cfg.hue)),
    }


def color_jitter(image: np.ndarray, params: dict[str, float], gray_mean: float) -> np.ndarray:
    """Apply one pointwise colour map to ``image [H, W, 3]`` in ``[0, 1]``: brightness (scale), contrast
    (about ``gray_mean``), saturation (about the pixel's luma), hue (rotation of the YIQ chroma)."""
    out = image * params["brightness"]
    out = (out - gray_mean * params["brightness"]) * params["contrast"] + gray_mean * params["brightness"]
    yiq = out @ _RGB_TO_YIQ.T
    angle = 2 * np.pi * params["hue"]
    c, s = np.cos(angle), np.sin(angle)
    chroma_rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32) * np.array(
        [[1], [params["saturation"]], [params["saturation"]]], np.float32)
    out = yiq @ (chroma_rot.T @ _YIQ_TO_RGB.T)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _gray_mean(image: np.ndarray) -> float:
    return float((image @ _RGB_TO_YIQ[0]).mean())


def photometric(sample: Sample, rng: np.random.Generator, cfg: FlowAugmentConfig) -> Sample:
    """Symmetric jitter (one map for both images, centred on image 1's mean) or, with probability
    ``cfg.asymmetric_prob``, asymmetric (an independent map per image)."""
    out = dict(sample)
    if rng.random() < cfg.asymmetric_prob:
        for key in ("image1", "image2"):
            out[key] = color_jitter(sample[key], color_jitter_params(rng, cfg), _gray_mean(sample[key]))
    else:
        params = color_jitter_params(rng, cfg)
        mean = _gray_mean(sample["image1"])
        out["image1"] = color_jitter(sample["image1"], params, mean)
        out["image2"] = color_jitter(sample["image2"], params, mean)
    return out


# ---------------------------------------------------------------------------------------- spatial
def resize(sample: Sample, height: int, width: int) -> Sample:
    """Resize to ``height x width``; flow scaled by ``(width / W, height / H)``; sparse ``valid`` handled
    (a pixel stays valid only if all its bilinear neighbours are valid)."""
    h0, w0 = sample["image1"].shape[:2]
    out = dict(sample)
    size = (int(width), int(height))
    for key in ("image1", "image2"):
        out[key] = cv2.resize(sample[key], size, interpolation=cv2.INTER_LINEAR)
    flow, valid = sample.get("flow"), sample.get("valid")
    if flow is None:
        return out
    factor = np.array([width / w0, height / h0], np.float32)
    if valid is None or valid.all():
        out["flow"] = cv2.resize(flow, size, interpolation=cv2.INTER_LINEAR) * factor
        out["valid"] = None if valid is None else np.ones((height, width), bool)
        return out
    weight = cv2.resize(valid.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    new_valid = weight > 1.0 - 1e-4
    summed = cv2.resize(flow * valid[..., None], size, interpolation=cv2.INTER_LINEAR)
    new_flow = np.zeros((height, width, 2), np.float32)
    new_flow[new_valid] = summed[new_valid] / weight[new_valid][:, None] * factor
    out["flow"], out["valid"] = new_flow, new_valid
    return out


def hflip(sample: Sample) -> Sample:
    """Mirror left-right: ``x -> W - 1 - x``, ``u -> -u``."""
    out = {k: (v[:, ::-1].copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}
    if out.get("flow") is not None:
        out["flow"][..., 0] *= -1
    return out


def vflip(sample: Sample) -> Sample:
    """Mirror top-bottom: ``y -> H - 1 - y``, ``v -> -v``."""
    out = {k: (v[::-1].copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}
    if out.get("flow") is not None:
        out["flow"][..., 1] *= -1
    return out


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """The window ``[top:top+height, left:left+width]`` of every array."""
    return {k: (v[top:top + height, left:left + width].copy() if isinstance(v, np.ndarray) else v)
            for k, v in sample.items()}


class FlowAugment:
    """The training augmentation: photometric jitter, rescale (+stretch), flips, random crop.

    ``crop = (h, w)`` or ``None``. Without a crop the output size varies with the rescale, so the
    rescale is skipped (samples keep their size). A sample smaller than the crop is an error."""

    def __init__(self, cfg: FlowAugmentConfig, crop_size: tuple[int, int] | None):
        self.cfg = cfg
        self.crop_size = crop_size

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        cfg = self.cfg
        h, w = sample["image1"].shape[:2]
        if self.crop_size is not None:
            check_covers(sample, self.crop_size)
        if cfg.enabled:
            if cfg.photometric:
                sample = photometric(sample, rng, cfg)
            if self.crop_size is not None and rng.random() < cfg.scale_prob:
                ch, cw = self.crop_size
                scale = 2.0 ** rng.uniform(cfg.min_scale, cfg.max_scale)
                sx = sy = scale
                if rng.random() < cfg.stretch_prob:
                    sx *= 2.0 ** rng.uniform(-cfg.max_stretch, cfg.max_stretch)
                    sy *= 2.0 ** rng.uniform(-cfg.max_stretch, cfg.max_stretch)
                new_h = max(int(round(h * sy)), ch)  # shrink no further than the crop (h >= ch: never
                new_w = max(int(round(w * sx)), cw)  # an upscale the random factor did not ask for)
                if (new_h, new_w) != (h, w):
                    sample = resize(sample, new_h, new_w)
            if rng.random() < cfg.hflip_prob:
                sample = hflip(sample)
            if rng.random() < cfg.vflip_prob:
                sample = vflip(sample)
        if self.crop_size is not None:
            sample = random_crop(sample, self.crop_size, rng)
        return sample


def check_covers(sample: Sample, crop_size: tuple[int, int]) -> None:
    """A ``ValueError`` naming the sample, its size and the crop when the images are smaller than the crop."""
    h, w = sample["image1"].shape[:2]
    if h < crop_size[0] or w < crop_size[1]:
        raise ValueError(f"sample {sample.get('id', '?')}: images are {format_size(h, w)} (H×W), smaller than "
                         f"the crop {format_size(*crop_size)}; images are never upscaled to fit a crop: set a "
                         f"smaller crop= (multiples of 8) or leave it empty to train on whole images")


def random_crop(sample: Sample, crop_size: tuple[int, int], rng: np.random.Generator) -> Sample:
    """A uniformly placed ``crop_size`` window; images smaller than the crop are an error (never resized)."""
    check_covers(sample, crop_size)
    ch, cw = crop_size
    h, w = sample["image1"].shape[:2]
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return crop(sample, top, left, ch, cw)
