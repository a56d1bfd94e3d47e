"""Flow matching (rectified flow) between data at ``t = 0`` and Gaussian noise at ``t = 1``.

Sign conventions:

* path ``x_t = (1 − t)·x + t·ε`` with ``ε ~ N(0, I)``; ``t = 0`` is data, ``t = 1`` is noise;
* the network predicts ``v = x − ε``, i.e. **minus** ``dx_t/dt`` — it points from noise towards data;
* sampling integrates from ``t = 1`` down to ``t = 0``: ``x_{t'} = x_t + (t − t')·v(x_t, t)`` with
  ``t > t'``, so every step moves along ``v`` (towards the data); with an exact ``v`` one step from pure
  noise lands on ``ε + v = x``.

``t`` for training is logit-normal: ``t = sigmoid(n)``, ``n ~ N(mean, std²)``. The sampler's grid is
``linspace(1, 0, steps + 1) ** t_pow_shift``: a shift > 1 packs the steps towards ``t = 0`` where detail
forms. The model is called as ``model(x_t, t, cond)`` with ``t`` in [0, 1] of shape ``[B]``; scaling to
``t · 1000`` for a timestep embedding is the model's job.

Randomness: pass a ``torch.Generator`` for reproducible noise. The generator may live on the CPU while the
model runs elsewhere (noise is drawn on the generator's device and moved), so the same seed gives the same
noise on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def sample_logit_normal(n: int, like: Tensor, generator: torch.Generator | None = None, mean: float = 0.0,
                        std: float = 1.0) -> Tensor:
    """``[n]`` times ``sigmoid(N(mean, std²))`` in (0, 1)."""
    return torch.sigmoid(mean + std * _randn((n,), like, generator))


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 − t)·x + t·ε`` with ``t [B]`` broadcast over the other dimensions of ``x [B, ...]``."""
    tb = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (1 - tb) * x + tb * noise


def flow_matching_loss(model: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, cond: Any,
                       generator: torch.Generator | None = None, logit_mean: float = 0.0,
                       logit_std: float = 1.0) -> Tensor:
    """Mean squared error between ``model(x_t, t, cond)`` and the velocity target ``x − ε``.

    ``x [B, ...]`` data; ``cond`` is passed through to the model unchanged.
    """
    return flow_matching_terms(model, x, cond, generator, logit_mean, logit_std)[0]


def flow_matching_terms(model: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, cond: Any,
                        generator: torch.Generator | None = None, logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(loss, x̂)``: :func:`flow_matching_loss` (the same draws) and the clean sample the predicted velocity
    implies, ``x̂ = x_t + t·v̂`` ``[B, ...]`` (with gradients; for auxiliary losses on the clean image)."""
    noise = _randn(tuple(x.shape), x, generator)
    t = sample_logit_normal(x.shape[0], x, generator, logit_mean, logit_std)
    x_t = interpolate(x, noise, t)
    pred = model(x_t, t, cond)
    x_hat = x_t + t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * pred.to(x.dtype)
    return F.mse_loss(pred.float(), (x - noise).float()), x_hat


def time_grid(steps: int, t_pow_shift: float = 2.0) -> Tensor:
    """``[steps + 1]`` times from 1 to 0: ``linspace(1, 0, steps + 1) ** t_pow_shift`` (float64)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: the sampler needs at least one step")
    if t_pow_shift <= 0:
        raise ValueError(f"t_pow_shift={t_pow_shift}: must be positive")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) ** t_pow_shift


@torch.no_grad()
def euler_sample(model: Callable[[Tensor, Tensor, Any], Tensor], cond: Any, shape: tuple[int, ...],
                 steps: int = 12, t_pow_shift: float = 2.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 noise: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Integrate from noise (``t = 1``) to data (``t = 0``) with Euler steps on :func:`time_grid`.

    Returns ``x_0 [shape]``. ``noise`` overrides the initial draw from ``generator``. ``temperature`` scales
    the initial noise (Glow's "temperature"): 1 draws true samples, 0 follows the deterministic path from the
    Gaussian's mode, trading sampled detail for smoothness (higher SSIM, not necessarily higher PSNR).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be ≥ 0")
    ref = torch.empty(0, device=device, dtype=dtype)
    x = _randn(tuple(shape), ref, generator) if noise is None else noise.to(device=device, dtype=dtype)
    x = x * temperature if temperature != 1.0 else x
    ts = time_grid(steps, t_pow_shift).tolist()
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((shape[0],), t_now, device=device, dtype=dtype)
        x = x + (t_now - t_next) * model(x, t, cond).to(dtype)
    return x
