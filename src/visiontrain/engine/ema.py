"""Exponential moving average of model weights (timm ``ModelEmaV2`` style, with a warmup ramp)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Keeps ``module``, an EMA copy of a model's floating-point parameters and buffers.

    Effective decay after ``n`` updates is ``decay * (1 - exp(-n / warmup))`` (``warmup=0``: constant),
    so early weights, which are far from good ones, are forgotten quickly. Before ``start_step`` the
    EMA simply copies the model. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: float = 2000.0, start_step: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.start_step = start_step
        self.updates = 0
        self._pairs: tuple[list, list, list, list] | None = None

    def decay_at(self, updates: int) -> float:
        if self.warmup <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup))

    def _tensor_pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        if self._pairs is None:
            src = model.state_dict(keep_vars=True)
            dst = self.module.state_dict(keep_vars=True)
            if src.keys() != dst.keys():
                raise RuntimeError("EMA and model have different state keys; build the EMA from this model")
            f_src, f_dst, i_src, i_dst = [], [], [], []
            for k, d in dst.items():
                s = src[k]
                (f_src if d.dtype.is_floating_point else i_src).append(s.detach())
                (f_dst if d.dtype.is_floating_point else i_dst).append(d.detach())
            self._pairs = (f_src, f_dst, i_src, i_dst)
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after each optimizer step with the (unwrapped) model and the new step count."""
        f_src, f_dst, i_src, i_dst = self._tensor_pairs(model)
        if step < self.start_step:
            torch._foreach_copy_(f_dst, f_src)
        else:
            self.updates += 1
            d = self.decay_at(self.updates)
            torch._foreach_lerp_(f_dst, f_src, 1.0 - d)
        if i_dst:
            torch._foreach_copy_(i_dst, i_src)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
