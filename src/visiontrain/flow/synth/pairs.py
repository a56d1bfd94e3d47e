"""One random pair of the built-in generator, in the style its :class:`FlowGenConfig` selects."""

from __future__ import annotations

import numpy as np

from visiontrain.flow.synth.config import FlowGenConfig
from visiontrain.flow.synth.legacy import SyntheticPair, render_pair
from visiontrain.flow.synth.photometric import camera_effects
from visiontrain.flow.synth.scene import random_layered_scene


def flow_pair(rng: np.random.Generator, size: tuple[int, int], cfg: FlowGenConfig | None = None,
              max_translation: float = 14.0) -> SyntheticPair:
    """A pair at ``size = (H, W)`` with exact flow. ``legacy``: :func:`visiontrain.flow.synthetic.render_pair`
    (``max_translation`` px). ``layered``: scene and camera effects draw from two streams split off ``rng``
    first, so switching effects off leaves the scene (and its flow) as it was."""
    cfg = cfg or FlowGenConfig()
    if cfg.style == "legacy":
        return render_pair(rng, size, max_translation)
    scene_seed, effects_seed = rng.integers(1 << 62, size=2)
    pair = random_layered_scene(np.random.default_rng(scene_seed), size, cfg).pair()
    if cfg.photometric:
        pair.image1, pair.image2 = camera_effects(np.random.default_rng(effects_seed), pair.image1, pair.image2,
                                                  pair.flow, cfg)
    return pair
