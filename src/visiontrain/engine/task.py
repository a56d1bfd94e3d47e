"""The protocol between the engine and a task (detect, flow, panorama, or one written in a test).

The engine calls only what is listed here; a task knows nothing about optimizers, checkpoints or
ranks, and never changes the config it is given (settings derived from it live on the task). Where
training stands — the step, the epoch and the plan — comes with each call as a :class:`StepInfo`, so no
task keeps a counter of its own. Randomness a task uses for augmentation must be derived from ``(seed, epoch, index)`` (see
:func:`sample_rng`) rather than from global state, so a resumed or multi-process run sees the same
samples as an uninterrupted single-process one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STAT_PREFIX = "stat/"  # training_step values logged beside the losses, not trained on


@dataclass(frozen=True)
class StepInfo:
    """Where training stands. ``step``: the optimizer step being computed, 0-based (``step`` steps are
    done); ``epoch``: its epoch, 0-based; ``total_steps`` / ``total_epochs`` / ``steps_per_epoch``: the
    plan (with ``max_steps`` set, ``total_epochs`` counts the epochs those steps reach into)."""

    step: int = 0
    epoch: int = 0
    total_steps: int = 1
    total_epochs: int = 1
    steps_per_epoch: int = 1


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A NumPy generator that depends only on ``(seed, epoch, index)``: reproducible per sample."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def stable_hash(*parts: Any) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


class Task:
    """Base class for tasks. Subclasses set ``name``, ``primary_metric`` and ``primary_mode``.

    ``cfg`` is the task's config (a subclass of :class:`visiontrain.engine.config.TrainConfig`).
    """

    name: str = "task"
    primary_metric: str = "loss"
    primary_mode: str = "min"  # "min" or "max"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # --- required ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        """``(train, val)``. A dataset may define ``set_epoch(epoch)``; the engine calls it."""
        raise NotImplementedError

    def collate(self, samples: list) -> Any:
        return torch.utils.data.default_collate(samples)

    def training_step(self, model: nn.Module, batch: Any, info: StepInfo) -> dict[str, torch.Tensor]:
        """Named, already-weighted scalar loss terms; the engine sums them. ``model`` may be DDP-wrapped.
        Entries named ``stat/<name>`` are statistics to watch (a mask's kept share, say): logged and
        averaged like the losses (``train/stat/<name>``), never trained on nor NaN-guarded."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Metrics over the whole ``loader`` (the engine runs it on rank 0 with the full val set).
        Must contain ``primary_metric``."""
        raise NotImplementedError

    # --- optional ---------------------------------------------------------------------------
    def visualize(self, model: nn.Module, batch: Any, out_dir: Path) -> None:
        """Write pictures of predictions for one val batch into ``out_dir``."""

    def on_epoch_start(self, model: nn.Module, info: StepInfo) -> None:
        """Per-epoch switches (e.g. mosaic off for the last epochs); ``info.epoch`` is the epoch starting."""

    def frozen_prefixes(self, info: StepInfo) -> tuple[str, ...]:
        """Parameter-name prefixes this task freezes at ``info.epoch``, besides the engine's ``freeze=``
        (e.g. the backbone for the first epochs of a fine-tuning)."""
        return ()

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Custom optimizer parameter groups; ``None`` = engine default (no decay on biases/norms)."""
        return None

    def load_weights(self, model: nn.Module, path: str) -> None:
        """Load ``cfg.weights`` into a fresh model. Default: an engine checkpoint or a state dict."""
        from visiontrain.engine.checkpoint import load_model_weights

        load_model_weights(model, path, task=self.name)

    def state_dict(self) -> dict:
        """Task facts a checkpoint must carry to be used later (e.g. class names); primitives only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (called when a run resumes)."""

    def model_signature(self) -> str:
        """A string naming the architecture, stored in checkpoints and checked on resume."""
        return getattr(self.cfg, "model", type(self).__name__)
