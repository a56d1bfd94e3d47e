"""The NaN guard: finds a non-finite loss term or gradient, names it, and applies the policy."""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteLossError(RuntimeError):
    """Raised under ``nan_policy=stop`` (or after too many skipped steps); the message names the term."""


def nonfinite_grads(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) parameters whose gradient has a NaN or inf."""
    bad = []
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def nonfinite_reason(bad_terms: list[str], grads_are_finite: bool, model: nn.Module) -> str:
    """What made a step non-finite, for the log: the loss terms, else the parameters with such gradients,
    else another rank (DDP ranks skip a step together)."""
    if bad_terms:
        return f"loss term {', '.join(repr(t) for t in bad_terms)} is not finite"
    if not grads_are_finite:
        return f"gradient of {', '.join(nonfinite_grads(model)) or 'some parameter'} is not finite"
    return "a non-finite loss on another rank"


def grads_finite(params: list[torch.Tensor]) -> bool:
    """True when every gradient is finite (a single fused norm and one sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


class NaNGuard:
    """Counts consecutive non-finite steps; ``skip`` tolerates ``max_skips`` in a row, ``stop`` none."""

    def __init__(self, policy: str = "skip", max_skips: int = 10):
        if policy not in ("skip", "stop"):
            raise ValueError(f"nan_policy must be 'skip' or 'stop', got '{policy}'")
        self.policy = policy
        self.max_skips = max_skips
        self.consecutive = 0
        self.total_skipped = 0

    def ok(self) -> None:
        self.consecutive = 0

    def bad(self, step: int, what: str) -> str:
        """Record a non-finite step; returns the message. Raises when the run must stop."""
        self.consecutive += 1
        self.total_skipped += 1
        msg = f"step {step}: {what}"
        if self.policy == "stop":
            raise NonFiniteLossError(msg)
        if self.consecutive > self.max_skips:
            raise NonFiniteLossError(
                f"{msg} — {self.consecutive} non-finite steps in a row (nan_max_skips={self.max_skips})"
            )
        return msg + f" — step skipped ({self.consecutive} in a row, {self.total_skipped} in total)"
