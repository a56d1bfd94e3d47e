"""The built-in flow generator's settings (``gen.*`` keys of ``synth flow`` and ``train flow``).

Every factor of the layered generator has its own switch, so an ablation can turn one off at a time
(``benchmarks/flow_ablation.py``); ``style=legacy`` selects the original generator
(:mod:`visiontrain.flow.synthetic`: colour-noise textures, translations up to ``max_translation`` px).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from visiontrain.config import ConfigError, opt

STYLES = ("layered", "legacy")
TEXTURES = ("natural", "noise")
LEGACY_MOTION = 0.04  # long_tail=false: translations up to 4 % of the width, ~14 px at 352 (the legacy range)


@dataclass
class FlowGenConfig:
    style: str = opt("layered", "layered (long-tailed motion, natural-image textures, photometric effects) | "
                                "legacy (the generator before issue 18: colour noise, translations <= 14 px)")
    max_motion: float = opt(0.25, "layered: largest translation as a fraction of the image width")
    long_tail: bool = opt(True, "layered: long-tailed magnitudes (most pairs move little, a few up to "
                                "max_motion); false: uniform up to 4 % of the width (the legacy range)")
    rotation_zoom: bool = opt(True, "layered: per-layer rotation and zoom between the frames")
    nonrigid: bool = opt(True, "layered: smooth non-rigid warps of some layers")
    min_layers: int = opt(2, "layered: fewest foreground layers (depth-ordered, they occlude each other)")
    max_layers: int = opt(7, "layered: most foreground layers")
    textures: str = opt("natural", "layered: natural (1/f spectral noise, dead leaves, procedural patterns) | "
                                   "noise (the legacy colour-noise textures)")
    motion_blur: bool = opt(True, "layered: blur some frames along their motion")
    lighting: bool = opt(True, "layered: gain, gamma and smooth shading change between the frames")
    noise: bool = opt(True, "layered: sensor noise (signal-dependent Gaussian)")
    jpeg: bool = opt(True, "layered: JPEG artefacts on some frames")

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ConfigError(f"gen.style={self.style!r} must be one of {', '.join(STYLES)}")
        if self.textures not in TEXTURES:
            raise ConfigError(f"gen.textures={self.textures!r} must be one of {', '.join(TEXTURES)}")
        if not 0 < self.max_motion <= 1:
            raise ConfigError(f"gen.max_motion={self.max_motion} must be in (0, 1] (a fraction of the width)")
        if not 0 <= self.min_layers <= self.max_layers <= 20:
            raise ConfigError(f"gen.min_layers={self.min_layers}, gen.max_layers={self.max_layers}: need "
                              f"0 <= min_layers <= max_layers <= 20")

    @property
    def photometric(self) -> bool:
        """Any effect that changes the images but not the ground truth is on."""
        return self.motion_blur or self.lighting or self.noise or self.jpeg

    def params(self) -> dict[str, Any]:
        """What decides the pairs (for the synthetic-set cache): only ``style`` for ``legacy``."""
        return {"style": "legacy"} if self.style == "legacy" else asdict(self)

    def without_photometric(self) -> FlowGenConfig:
        return FlowGenConfig(**{**asdict(self), "motion_blur": False, "lighting": False, "noise": False,
                                "jpeg": False})
