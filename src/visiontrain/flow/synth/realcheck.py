"""The real-texture check: held-out pairs made of real photographs moved by known layered motion.

Every pair is a :class:`~visiontrain.flow.synth.scene.LayeredScene` whose layers carry *photographs*
(the ones scikit-image ships in ``skimage.data``) instead of generated textures: a background photograph
under camera-like motion and 1-3 shapes cut out of other photographs that move on their own. The flow is
exact as for every layered scene. Its motions have their own fixed distribution (uniform magnitudes, not
the generator's long tail), it adds no camera effects, and it is written with its own seed: it is not
training data, and no generator setting is chosen on it (``benchmarks/flow_supervised.py realcheck``
scores on it; ``benchmarks/flow_ablation.py`` only reports it).

Needs ``scikit-image`` (the ``dev`` and ``bench`` extras).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np

from visiontrain.flow.io import write_flo, write_image
from visiontrain.flow.synth.legacy import SyntheticPair, _affine
from visiontrain.flow.synth.scene import Layer, LayeredScene, random_shape

BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "brick")
OBJECTS = ("grass", "gravel", "moon", "hubble_deep_field", "astronaut", "coffee", "chelsea", "rocket")
CHECK_SIZE, CHECK_PAIRS, CHECK_SEED = (192, 256), 24, 18018


@cache
def photograph(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as ``[H, W, 3] float32`` in ``[0, 1]`` (grey photographs repeated)."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the real-texture check needs scikit-image: pip install scikit-image "
                          "(or pip install -e '.[bench]')") from e
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.float32) / 255.0


def _photo_crop(rng: np.random.Generator, name: str, height: int, width: int, scale: float) -> np.ndarray:
    """A ``height x width`` crop of photograph ``name`` resized by ``scale`` (at least enough to cover it)."""
    photo = photograph(name)
    scale = max(scale, height / photo.shape[0], width / photo.shape[1]) * 1.001
    size = (max(width, round(photo.shape[1] * scale)), max(height, round(photo.shape[0] * scale)))
    resized = cv2.resize(photo, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    y = int(rng.integers(0, resized.shape[0] - height + 1))
    x = int(rng.integers(0, resized.shape[1] - width + 1))
    return np.ascontiguousarray(resized[y:y + height, x:x + width])


def _motion(rng: np.random.Generator, centre: np.ndarray, max_shift: float, max_angle: float,
            max_zoom: float) -> np.ndarray:
    magnitude, direction = rng.uniform(0, max_shift), rng.uniform(-np.pi, np.pi)
    shift = magnitude * np.array([np.cos(direction), np.sin(direction)])
    return _affine(rng.uniform(-max_angle, max_angle), np.exp(rng.uniform(-max_zoom, max_zoom)), centre, shift)


def real_texture_scene(rng: np.random.Generator, size: tuple[int, int] = CHECK_SIZE) -> LayeredScene:
    """A background photograph moving by up to 12 % of the width (rotation <= 3 deg, zoom <= 5 %) and
    1-3 photograph cut-outs (radius 12-30 % of the shorter side) moving by up to 20 % of the width more
    (rotation <= 10 deg, zoom <= 10 %)."""
    height, width = size
    small = min(height, width)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    margin = int(0.2 * width)
    bg_name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_scale = rng.uniform(0.5, 0.9)
    background = _photo_crop(rng, bg_name, height + 2 * margin, width + 2 * margin, bg_scale)
    camera = _motion(rng, centre, 0.12 * width, np.deg2rad(3), 0.05)
    layers = [Layer(background, np.array([[1.0, 0, centre[0]], [0, 1.0, centre[1]]]), camera, "plane", np.zeros(0))]
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.12, 0.30) * small
        shape, params = random_shape(rng, radius)
        pos = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
        own = _motion(rng, pos, 0.2 * width, np.deg2rad(10), 0.1)
        own[:, 2] += camera[:, :2] @ pos + camera[:, 2] - pos  # moves with the camera, and on its own
        tsize = int(2 * radius * 1.6) + 16
        names = [n for n in OBJECTS if n != bg_name]
        texture = _photo_crop(rng, names[int(rng.integers(len(names)))], tsize, tsize, rng.uniform(0.4, 0.8))
        place1 = _affine(rng.uniform(-np.pi, np.pi), 1.0, np.zeros(2), pos)
        layers.append(Layer(texture, place1, own, shape, params))
    return LayeredScene(layers, (height, width))


def real_texture_pair(index: int, size: tuple[int, int] = CHECK_SIZE, seed: int = CHECK_SEED) -> SyntheticPair:
    """Pair ``index`` (1-based) of the check; depends only on ``(seed, index)``."""
    return real_texture_scene(np.random.default_rng([seed, index, 0x4EA1]), size).pair()


def write_real_texture_check(out: str | Path, pairs: int = CHECK_PAIRS, size: tuple[int, int] = CHECK_SIZE,
                             seed: int = CHECK_SEED) -> Path:
    """Write the check in the FlyingChairs layout (every pair in the ``val`` split) and return ``out``;
    score on it with ``data=chairs:OUT`` (``visiontrain eval flow``)."""
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(1, pairs + 1):
        pair = real_texture_pair(i, size, seed)
        write_image(data / f"{i:05d}_img1.ppm", pair.image1)
        write_image(data / f"{i:05d}_img2.ppm", pair.image2)
        write_flo(data / f"{i:05d}_flow.flo", pair.flow)
    (out / "FlyingChairs_train_val.txt").write_text("2\n" * pairs)
    return out
