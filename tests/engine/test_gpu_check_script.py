"""``benchmarks/gpu_check.py`` is run only where a GPU is lent, so its own code is checked here, on the
CPU: a broken check found on a GPU costs a lease."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_for_one_task(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--tasks", "detect", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "VISIONTRAIN_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = (tmp_path / "gpu_check.txt").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("steps", "resume"))]
    assert [r.split()[:2] for r in rows] == [["steps", "detect"]] * 2 + [["resume", "detect"]]  # --tasks filters
    assert "bit-identical" in rows[-1]


def test_explain_difference_tells_resume_error_from_rerun_noise(tmp_path, monkeypatch):
    """The resume row's diagnosis: a resumed run that differs is compared with a second straight run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check
    import torch

    def ckpt(path: Path, w: float) -> Path:
        path.mkdir(parents=True)
        torch.save({"model": {"w": torch.full((3,), w), "n": torch.tensor(1)}, "optimizer": {"state": {}}},
                   path / "last.pt")
        return path.parent

    straight, split = ckpt(tmp_path / "s" / "checkpoints", 2.0), ckpt(tmp_path / "p" / "checkpoints", 2.5)

    def fake_train(task, args, out, device):  # the second straight run reproduces the first
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"model": {"w": torch.full((3,), 2.0), "n": torch.tensor(1)}, "optimizer": {"state": {}}},
                   out / "checkpoints" / "last.pt")
        return {}

    monkeypatch.setattr(gpu_check, "train", fake_train)
    note = gpu_check.explain_difference("flow", ["max_steps=6"], tmp_path, straight, split, "cpu", 0)
    assert note.startswith("DIFFERENT: resumed vs straight 2.5e-01, straight vs straight 0.0e+00"), note


def test_nondeterministic_ops_names_every_refused_op_forward_and_backward(monkeypatch):
    """The op finder names ops torch refuses under strict determinism, in forward and backward, even with
    the process in warn-only mode (the trainer's setting) and lets the step finish."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check
    import torch

    class PutBackward(torch.autograd.Function):  # a backward that calls an op with no deterministic kernel
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g.clone().put_(torch.tensor([0]), torch.tensor([7.0]))

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with gpu_check.NondeterministicOps() as forward:
            y = torch.zeros(3).put_(torch.tensor([1]), torch.tensor([1.0]))
        x = torch.ones(3, requires_grad=True)
        with gpu_check.NondeterministicOps() as backward:
            z = PutBackward.apply(x)
            assert not backward.ops
            z.sum().backward()
        with gpu_check.NondeterministicOps() as clean:
            (x * 3).sum().backward()
        assert forward.ops == {"put_"} and backward.ops == {"put_"} and not clean.ops
        assert y.tolist() == [0.0, 1.0, 0.0] and x.grad.tolist() == [7.0 + 3, 1.0 + 3, 1.0 + 3]
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
