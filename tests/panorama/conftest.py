"""Fixtures of the panorama tests: a tiny training config and a tiny model trained once for the verbs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from visiontrain.config import load_config
from visiontrain.panorama.config import PanoramaTrainConfig

TINY_MODEL = ["pano_size=16", "view_size=32", "encoder_channels=[8,8,8]", "fused_channels=4",
              "unet_channels=[8,16]", "norm_groups=4"]
QUIET = ["tensorboard=false", "plots=false", "progress=false"]


def _tiny_config(tmp_path: Path, *extra: str, schema: type = PanoramaTrainConfig):
    return load_config(schema, None, [
        f"out={tmp_path / 'run'}", f"synth_dir={tmp_path / 'synth'}", "synth_train=8", "synth_val=4",
        "synth_size=32", *TINY_MODEL, "batch_size=4", "sample_steps=2", "device=cpu", *QUIET, *extra])


@pytest.fixture
def tiny_config() -> Callable[..., PanoramaTrainConfig]:
    """``tiny_config(tmp_path, *key=value)``: a training config of a tiny model on 8 + 4 synthetic 32×64
    panoramas in ``tmp_path/synth`` (written when first used), 2 sampler steps, CPU, no logs."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained 3 steps (``xi=0.8``, ``sample_steps=2``; EMA decay 0.999 without warmup, so the
    EMA stays near the initial weights, far from the model): ``cfg``, ``result`` of ``fit``, ``weights``
    (``last.pt``), ``synth`` (the data folder)."""
    from visiontrain.engine.trainer import fit
    from visiontrain.panorama.task import PanoramaTask

    tmp = tmp_path_factory.mktemp("pano_run")
    cfg = _tiny_config(tmp, "max_steps=3", "lr=3e-3", "ema.warmup=0", "xi=0.8")
    result = fit(PanoramaTask(cfg))
    return SimpleNamespace(cfg=cfg, result=result, weights=Path(result["out"]) / "checkpoints" / "last.pt",
                           synth=tmp / "synth")
