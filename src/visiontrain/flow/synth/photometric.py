"""Camera effects on a rendered pair that leave its ground truth unchanged, in the order a camera applies
them: motion blur, lighting (gain, gamma, smooth shading), sensor noise, JPEG compression.

They change the images only; the flow still says where each scene point of image 1 is in image 2 (at the
middle of the exposure for a blurred frame). Each takes and returns ``[H, W, 3] float32`` in ``[0, 1]``.
"""

from __future__ import annotations

import cv2
import numpy as np

from visiontrain.flow.synth.config import FlowGenConfig
from visiontrain.flow.synth.textures import pink_noise


def motion_blur(image: np.ndarray, flow: np.ndarray, length: float, taps: int = 7) -> np.ndarray:
    """Average of ``image`` sampled at ``x + t * flow(x)``, ``t`` in ``[-length/2, length/2]`` (a box
    exposure of ``length`` frame intervals along each pixel's own motion; image 1's flow also stands
    in for image 2's, which is smooth inside every layer)."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    acc = np.zeros_like(image)
    for t in np.linspace(-length / 2, length / 2, taps, dtype=np.float32):
        acc += cv2.remap(image, x + t * flow[..., 0], y + t * flow[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)
    return acc / taps


def lighting(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Per-channel gain ~exp(N(0, 0.1)), offset N(0, 0.03), gamma ~exp(N(0, 0.15)) and a smooth shading
    field (1/f^2 noise, +-15 %)."""
    h, w = image.shape[:2]
    gain = np.exp(rng.normal(0, 0.1)) * np.exp(rng.normal(0, 0.03, 3))
    shade = 1.0 + rng.uniform(0.0, 0.15) * np.tanh(pink_noise(rng, h, w, 2.0))
    out = np.clip(image * gain * shade + rng.normal(0, 0.03), 0.0, 1.0)
    return (out ** np.exp(rng.normal(0, 0.15))).astype(np.float32)


def sensor_noise(rng: np.random.Generator, image: np.ndarray, read: float, shot: float) -> np.ndarray:
    """Gaussian noise with variance ``read^2 + shot * I``."""
    std = np.sqrt(read ** 2 + shot * image)
    return np.clip(image + std * rng.standard_normal(image.shape).astype(np.float32), 0.0, 1.0)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through an 8-bit JPEG at ``quality``."""
    bgr = cv2.cvtColor((image * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def camera_effects(rng: np.random.Generator, image1: np.ndarray, image2: np.ndarray, flow: np.ndarray,
                   cfg: FlowGenConfig) -> tuple[np.ndarray, np.ndarray]:
    """The switched-on effects, each drawn per pair: blur (p 0.3 per frame, exposure <= 0.6 frame),
    lighting change (p 0.8; frame 2 only, or both), noise (p 0.7, both frames, read std <= 0.02, shot <= 0.0015 I), JPEG
    (p 0.4, quality 30-95, per frame)."""
    images = [image1, image2]
    if cfg.motion_blur:
        images = [motion_blur(im, flow, rng.uniform(0.1, 0.6)) if rng.random() < 0.3 else im for im in images]
    if cfg.lighting and rng.random() < 0.8:
        images[1] = lighting(rng, images[1])
        if rng.random() < 0.5:
            images[0] = lighting(rng, images[0])
    if cfg.noise and rng.random() < 0.7:
        read, shot = rng.uniform(0, 0.02), rng.uniform(0, 0.0015)  # one camera: same levels in both frames
        images = [sensor_noise(rng, im, read, shot) for im in images]
    if cfg.jpeg and rng.random() < 0.4:
        images = [jpeg(im, int(rng.integers(30, 96))) for im in images]
    return images[0], images[1]
