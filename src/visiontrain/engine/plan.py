"""The plan of a run: how many batches, optimizer steps and epochs, from the config and the data size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from visiontrain.config import ConfigError


@dataclass(frozen=True)
class Plan:
    batches_per_epoch: int  # global batches (one per rank at a time)
    steps_per_epoch: int  # optimizer steps: batches // accumulate, the last one may have fewer batches
    total_steps: int
    epochs: int  # epochs the steps reach into (max_steps may end one part-way)
    warmup_steps: int


def make_plan(cfg: Any, n_train: int, world: int) -> Plan:
    """``batch_size`` is global (split over ``world`` ranks); ``max_steps`` > 0 wins over ``epochs``;
    ``warmup_steps`` > 0 wins over ``warmup_epochs``."""
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {world} ranks")
    batches = n_train // cfg.batch_size
    if batches == 0:
        raise ConfigError(f"the training set has {n_train} samples, fewer than one batch "
                          f"(batch_size={cfg.batch_size}); lower batch_size or add data")
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    if cfg.max_steps > 0:
        total, epochs = cfg.max_steps, math.ceil(cfg.max_steps / steps_per_epoch)
    else:
        total, epochs = cfg.epochs * steps_per_epoch, cfg.epochs
    warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * steps_per_epoch))
    return Plan(batches, steps_per_epoch, total, epochs, warmup)
