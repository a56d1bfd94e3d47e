"""The learning-rate schedule: a pure function of the optimizer step, so resume needs nothing else."""

from __future__ import annotations

import math
from typing import Any

from visiontrain.config import ConfigError


def lr_factor(step: int, total: int, warmup: int, cfg: Any, start: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup from ``start``, then the
    schedule (``cfg.schedule``: cosine, linear, step or constant) over the remaining steps."""
    if warmup > 0 and step < warmup:
        return start + (1.0 - start) * step / warmup
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    if cfg.schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * p
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(p >= m for m in cfg.step_milestones)
    if cfg.schedule == "constant":
        return 1.0
    raise ConfigError(f"schedule must be cosine, linear, step or constant, got '{cfg.schedule}'")
