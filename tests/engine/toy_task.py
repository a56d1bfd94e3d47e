"""A small real task for engine tests: regress a fixed random linear map with a tiny MLP.

It has what resume has to get right: dropout (global torch RNG), per-sample augmentation noise
(``sample_rng``), BatchNorm buffers, an EMA-able model. Run as a script it trains with ``key=value``
overrides and prints ``step N`` lines, so tests can kill it with SIGKILL mid-run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from visiontrain.config import load_config, opt
from visiontrain.engine.config import TrainConfig
from visiontrain.engine.task import Task, sample_rng
from visiontrain.engine.trainer import Trainer


@dataclass
class ToyConfig(TrainConfig):
    n_train: int = opt(256, "training samples")
    n_val: int = opt(64, "validation samples")
    dim: int = opt(8, "input/output size")
    hidden: int = opt(32, "hidden width")
    dropout: float = opt(0.1, "dropout probability")
    batchnorm: bool = opt(True, "use a BatchNorm layer")
    noise: float = opt(0.05, "per-sample augmentation noise")
    sleep: float = opt(0.0, "seconds to sleep per step (lets a test kill the run mid-way)")
    nan_at_step: int = opt(-1, "make loss term 'reg' NaN on this call of training_step")
    print_steps: bool = opt(False, "print 'step N' after each training_step call")
    die_at_step: int = opt(-1, "rank 1 of a torchrun job's first attempt SIGKILLs itself on this training_step call")


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int, dim: int, seed: int, noise: float, augment: bool):
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(dim, dim, generator=g) / dim**0.5
        self.x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        self.y = torch.tanh(self.x @ self.w)
        self.noise, self.augment, self.seed, self.epoch = noise, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            rng = sample_rng(self.seed, self.epoch, i)
            x = x + torch.from_numpy(rng.normal(0, self.noise, x.shape).astype("float32"))
        return x, self.y[i]


class ToyTask(Task):
    name = "toy"
    primary_metric = "mse"
    primary_mode = "min"

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        self.calls = 0

    def model_signature(self) -> str:
        return f"mlp{self.cfg.dim}x{self.cfg.hidden}"

    def build_model(self) -> nn.Module:
        c = self.cfg
        layers = [nn.Linear(c.dim, c.hidden)]
        if c.batchnorm:
            layers.append(nn.BatchNorm1d(c.hidden))
        layers += [nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.hidden, c.dim)]
        return nn.Sequential(nn.Sequential(*layers[:-1]), layers[-1])

    def build_datasets(self):
        c = self.cfg
        return (ToyData(c.n_train, c.dim, 1, c.noise, True), ToyData(c.n_val, c.dim, 2, 0.0, False))

    def training_step(self, model, batch, info):
        x, y = batch
        self.calls += 1
        if (self.calls == self.cfg.die_at_step and os.environ.get("RANK") == "1"
                and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies (OOM killer, lost GPU, ...)
        if self.cfg.sleep:
            time.sleep(self.cfg.sleep)
        pred = model(x)
        terms = {"mse": nn.functional.mse_loss(pred, y), "reg": 1e-4 * pred.pow(2).mean()}
        if self.calls == self.cfg.nan_at_step:
            terms["reg"] = terms["reg"] * float("nan")
        if self.cfg.print_steps:
            print(f"step {self.calls}", flush=True)
        return terms

    @torch.no_grad()
    def evaluate(self, model, loader):
        se, n = 0.0, 0
        for x, y in loader:
            se += float(((model(x) - y) ** 2).sum())
            n += y.numel()
        return {"mse": se / n}


def main(argv: list[str]) -> int:
    from visiontrain.engine.interrupt import TrainingInterrupted

    cfg = load_config(ToyConfig, None, argv)
    try:
        result = Trainer(ToyTask(cfg)).fit()
    except TrainingInterrupted as e:  # as the CLI does: 130 for SIGINT, 143 for SIGTERM
        return e.exit_code
    print(f"done {result['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
