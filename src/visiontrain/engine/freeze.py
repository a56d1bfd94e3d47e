"""Freezing parameters by name prefix (``freeze=[backbone]``, a task's own schedule)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torch import nn

from visiontrain.config import ConfigError


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def set_frozen(model: nn.Module, prefixes: Sequence[str], fixed: Collection[str] = ()) -> int:
    """``requires_grad=False`` for parameters under ``prefixes``, ``True`` for the others — except the
    ``fixed`` ones (built without gradients by design), which stay as they are. Returns how many were
    frozen; a prefix that matches nothing is a :class:`ConfigError` naming the top-level modules."""
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(_under(n, [p]) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"freeze: prefix '{p}' matches no parameter; top-level modules are {tops}")
    frozen = 0
    for name, param in model.named_parameters():
        if name in fixed:
            continue
        param.requires_grad_(not _under(name, prefixes))
        frozen += _under(name, prefixes)
    return frozen


def batchnorm_eval(model: nn.Module, prefixes: Sequence[str]) -> None:
    """Put BatchNorm layers under ``prefixes`` in eval mode (their statistics stay fixed while frozen)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _under(name, prefixes):
            m.eval()
