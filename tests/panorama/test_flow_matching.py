"""Flow-matching path, target sign, time grid and Euler sampler; a toy 2-D distribution is learned."""

from __future__ import annotations

import torch
from torch import nn

from visiontrain.panorama.flow_matching import (
    euler_sample,
    flow_matching_loss,
    interpolate,
    sample_logit_normal,
    time_grid,
)


def test_path_and_time_grid() -> None:
    x, eps = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    assert torch.allclose(interpolate(x, eps, torch.tensor([0.0])), x)
    assert torch.allclose(interpolate(x, eps, torch.tensor([1.0])), eps)
    assert torch.allclose(interpolate(x, eps, torch.tensor([0.25])), 0.75 * x + 0.25 * eps)
    g = time_grid(4, 2.0)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64) ** 2)
    t = sample_logit_normal(20000, torch.empty(0), torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) < 1
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03


class PointMassOracle(nn.Module):
    """The exact velocity x0 − ε for data concentrated at ``x0``: from x_t, ε = (x_t − (1 − t)·x0) / t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        tb = t.reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t - (1 - tb) * self.x0) / tb
        return self.x0 - eps


def test_sign_conventions_with_an_exact_velocity() -> None:
    x0 = torch.tensor([[3.0, -2.0]], dtype=torch.float64).expand(64, 2)
    oracle = PointMassOracle(x0)
    gen = torch.Generator().manual_seed(1)
    assert float(flow_matching_loss(oracle, x0, None, gen)) < 1e-20  # target is x − ε
    for steps in (1, 4, 12):
        out = euler_sample(oracle, None, (64, 2), steps=steps, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
        assert torch.allclose(out, x0, atol=1e-9)  # Euler on a straight path is exact


def test_sampler_is_reproducible_from_its_generator() -> None:
    model = nn.Identity()

    def velocity(x, t, cond):
        return -0.5 * model(x)

    a = euler_sample(velocity, None, (5, 3), generator=torch.Generator().manual_seed(7))
    b = euler_sample(velocity, None, (5, 3), generator=torch.Generator().manual_seed(7))
    c = euler_sample(velocity, None, (5, 3), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


class TinyVelocityMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return self.net(torch.cat((x, t[:, None]), dim=1))


def test_toy_two_mode_distribution_is_learned() -> None:
    torch.manual_seed(0)
    modes = torch.tensor([[-2.0, 1.0], [2.0, -1.0]])
    model = TinyVelocityMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 2, (128,), generator=gen)
        x = modes[idx] + 0.05 * torch.randn(128, 2, generator=gen)
        loss = flow_matching_loss(model, x, None, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = euler_sample(model, None, (2000, 2), steps=12, noise=noise)
    dist = torch.cdist(out, modes)  # [N, 2]
    near = dist.min(1).values < 0.5
    assert near.float().mean() > 0.9, near.float().mean()  # noise (mostly far from both) lands on the modes
    assert (torch.cdist(noise, modes).min(1).values < 0.5).float().mean() < 0.2
    share = (dist.argmin(1) == 0).float().mean()
    assert 0.35 < share < 0.65  # both modes, in proportion
