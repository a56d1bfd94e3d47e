"""Time per optimizer step: visiontrain's Trainer vs a bare PyTorch loop, same model, data and optimizer.

    python benchmarks/engine_overhead.py [--steps 60] [--repeats 3]

Both sides run in this process, alternating, and the best of ``repeats`` is kept for each, so a
busy machine penalises both alike. The Trainer runs with its defaults that cost something per step
(NaN guard: one sync for the loss terms and one fused gradient-norm check; lr schedule; logging every
10 steps; a checkpoint at the end), without evaluation, TensorBoard or progress bar.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

from visiontrain.config import load_config, opt
from visiontrain.engine.config import TrainConfig
from visiontrain.engine.task import Task
from visiontrain.engine.trainer import Trainer


@dataclass
class BenchConfig(TrainConfig):
    n: int = opt(512, "samples")


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 64, 64, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.SiLU())
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class BenchTask(Task):
    name = "bench"
    primary_metric = "loss"

    def build_model(self):
        return make_model()

    def build_datasets(self):
        return Images(self.cfg.n), None

    def training_step(self, model, batch, info):
        x, y = batch
        return {"ce": nn.functional.cross_entropy(model(x), y)}


def bare_loop(steps: int, batch: int, n: int) -> float:
    model = make_model()
    opt_ = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Images(n), batch_size=batch, shuffle=True, drop_last=True)
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt_.step()
            opt_.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - t0) / steps


def trainer_loop(steps: int, batch: int, n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(BenchConfig, None, [f"out={d}/run", f"max_steps={steps}", f"batch_size={batch}",
                                              f"n={n}", "tensorboard=false", "plots=false", "progress=false",
                                              "eval_every=0"])
        trainer = Trainer(BenchTask(cfg))
        t0 = time.perf_counter()
        trainer.fit()
        return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    n = a.batch * 16
    bare, ours = [], []
    for _ in range(a.repeats):
        bare.append(bare_loop(a.steps, a.batch, n))
        ours.append(trainer_loop(a.steps, a.batch, n))
    b, o = min(bare), min(ours)
    print(f"{'':<22}{'s/step':>10}")
    print(f"{'bare PyTorch loop':<22}{b:>10.4f}")
    print(f"{'visiontrain Trainer':<22}{o:>10.4f}")
    print(f"ratio Trainer/bare: {o / b:.3f}  (goal <= 1.05; threads={torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
