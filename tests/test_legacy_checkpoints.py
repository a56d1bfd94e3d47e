"""Checkpoints written by visiontrain before the task-layer redesign (commit 5669ed8, made by
tests/fixtures/make_legacy_checkpoints.py) still load for eval and resume on every task."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest
from launch import QUIET, run_cli

from visiontrain.engine.checkpoint import load_checkpoint

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def unpack(name: str, run: Path) -> Path:
    """``run/checkpoints/last.pt`` from the fixture ``<name>_last.pt.xz``."""
    path = run / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(lzma.decompress((LEGACY / f"{name}_last.pt.xz").read_bytes()))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.flow.synthetic import write_synthetic_chairs
    from visiontrain.panorama.synthetic import write_synthetic_panoramas

    root = tmp_path_factory.mktemp("legacy")
    write_synthetic_panoramas(root / "pano", train=4, val=2, size=32, seed=0)
    return {"detect": [f"data={write_synthetic_mar20(root / 'mar20', train=8, val=2, imgsz=64, seed=0)}"],
            "flow_raft": [f"data=chairs:{write_synthetic_chairs(root / 'chairs', 4, 1, (128, 160), 0)}"],
            "flow_pwc": [f"data=chairs:{root / 'chairs'}"],
            "panorama": [f"data={root / 'pano'}"]}


@pytest.mark.parametrize("name", ["detect", "flow_raft", "flow_pwc", "panorama"])
def test_a_legacy_checkpoint_evaluates_and_resumes(data, tmp_path, name):
    task = name.split("_")[0]
    ckpt = unpack(name, tmp_path / "run")
    assert load_checkpoint(ckpt)["step"] == 2
    evaluated = run_cli(["eval", task, f"weights={ckpt}", *data[name], f"out={tmp_path / 'eval'}", "device=cpu"])
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()
    resumed = run_cli(["train", task, "resume=auto", f"out={tmp_path / 'run'}", *data[name], "max_steps=3", *QUIET])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {ckpt} at step 2" in resumed.stdout
    assert load_checkpoint(ckpt)["step"] == 3
