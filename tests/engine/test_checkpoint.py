"""Checkpoint files: atomic under SIGKILL, weights_only, unwrapped keys, clear mismatch reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from visiontrain.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_model_weights,
    load_state_dict_checked,
    unwrap,
)
from visiontrain.engine.ema import ModelEMA


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


WRITER = """
import sys, torch
from visiontrain.engine.checkpoint import atomic_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_save({"format_version": 1, "i": i, "w": torch.full((2_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_kill_during_write_leaves_loadable_last(tmp_path):
    path = tmp_path / "last.pt"
    for delay in (0.15, 0.4, 0.9):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one complete write
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["i"])))
    leftovers = [f.name for f in tmp_path.iterdir() if f.name != "last.pt"]
    assert all(f.endswith(".tmp") for f in leftovers)  # only torn temp files, never a torn last.pt


def test_module_prefix_accepted_and_problems_named():
    src = net()
    ddp_style = {f"module.{k}": v for k, v in src.state_dict().items()}
    dst = net()
    load_state_dict_checked(dst, ddp_style)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))

    bad = dict(src.state_dict())
    bad["2.weight"] = torch.zeros(3, 8)
    bad["extra.bias"] = torch.zeros(1)
    del bad["0.bias"]
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(net(), bad)
    msg = str(e.value)
    assert "missing keys: 0.bias" in msg and "unexpected keys: extra.bias" in msg
    assert "2.weight (3, 8)≠(2, 8)" in msg
    missing, unexpected, mismatched = load_state_dict_checked(net(), bad, strict=False)
    assert missing == ["0.bias"] and unexpected == ["extra.bias"] and mismatched[0][0] == "2.weight"


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_load_model_weights_checks_task(tmp_path):
    m = net()
    atomic_save({"format_version": 1, "task": "flow", "model": m.state_dict(), "ema": None}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"is a flow checkpoint \(from `visiontrain train flow`\); detect needs"):
        load_model_weights(net(), tmp_path / "c.pt", task="detect")
    load_model_weights(net(), tmp_path / "c.pt", task="flow")
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    load_model_weights(net(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unwrap_ddp_and_compile_names():
    m = net()

    class FakeCompiled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap(FakeCompiled(m)) is m


def test_ema_matches_formula_and_warmup():
    torch.manual_seed(0)
    m = net()
    ema = ModelEMA(m, decay=0.9, warmup=4.0, start_step=2)
    w0 = ema.module[0].weight.clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update(m, step=1)  # before start_step: a copy
    assert torch.equal(ema.module[0].weight, m[0].weight) and ema.updates == 0
    prev = ema.module[0].weight.clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
        m[1].num_batches_tracked += 5
    ema.update(m, step=2)
    d = 0.9 * (1 - torch.exp(torch.tensor(-1 / 4.0))).item()
    assert torch.allclose(ema.module[0].weight, d * prev + (1 - d) * m[0].weight, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == int(m[1].num_batches_tracked)
    assert not torch.equal(w0, ema.module[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
