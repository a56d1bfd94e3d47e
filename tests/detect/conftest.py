"""Fixtures for the YOLOv8 model / weights / export tests.

Ultralytics is a test-only oracle: it is imported inside these helpers, never by ``visiontrain``.
"""

from __future__ import annotations

import datetime
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics, and every conv bias
    (the head's output convs) a spread, so class probabilities are not all ~0 and a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None and m.weight.requires_grad:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)


def build_ultralytics(cfg: str = "yolov8n.yaml", nc: int = 20, seed: int = 0) -> torch.nn.Module:
    """An Ultralytics model with random weights and randomised BatchNorm statistics."""
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, SegmentationModel

    torch.manual_seed(seed)
    if "-seg" in cfg:
        model = SegmentationModel(cfg, nc=nc, verbose=False)
    elif "-cls" in cfg:
        model = ClassificationModel(cfg, nc=nc, verbose=False)
    else:
        model = DetectionModel(cfg, nc=nc, verbose=False)
    model.names = {i: f"class{i}" for i in range(nc)}
    randomise_batchnorm(model, seed)
    return model


def save_like_ultralytics(model: torch.nn.Module, path: Path, trainer_style: bool = False) -> Path:
    """Write ``model`` the way Ultralytics does: the pickled module in fp16 under ``model`` (final weights,
    as ``strip_optimizer`` leaves them) or under ``ema`` with optimizer state and metrics (``last.pt``)."""
    from ultralytics import __version__

    date = datetime.datetime.now().isoformat()
    if trainer_style:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ckpt = {
            "epoch": 3,
            "best_fitness": np.float64(0.25),
            "model": None,
            "ema": deepcopy(model).half(),
            "updates": 120,
            "optimizer": opt.state_dict(),
            "train_args": {"model": "yolov8n.yaml", "imgsz": 640, "lr0": 0.01, "save_dir": Path("runs/x")},
            "train_metrics": {"metrics/mAP50(B)": np.float64(0.5), "fitness": np.float32(0.3)},
            "date": date,
            "version": __version__,
        }
    else:
        ckpt = {
            "model": deepcopy(model).half(),
            "ema": None,
            "train_args": {},
            "date": date,
            "version": __version__,
        }
    torch.save(ckpt, path)
    return path


def ultralytics_oracle(path: Path) -> torch.nn.Module:
    """The Ultralytics model from a (trusted, test-written) checkpoint, float32, eval."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return (ckpt.get("ema") or ckpt["model"]).float().eval()


@pytest.fixture(scope="session")
def yolov8n_checkpoint(tmp_path_factory) -> Path:
    """``yolov8n.yaml``, nc=20, random weights, saved like Ultralytics."""
    return save_like_ultralytics(
        build_ultralytics("yolov8n.yaml", 20), tmp_path_factory.mktemp("u") / "yolov8n.pt"
    )


@pytest.fixture(scope="session")
def yolov8s_checkpoint(tmp_path_factory) -> Path:
    return save_like_ultralytics(
        build_ultralytics("yolov8s.yaml", 20, seed=1), tmp_path_factory.mktemp("u") / "yolov8s.pt"
    )


class UltralyticsHelpers:
    """The helpers above, handed to tests as the ``ultra`` fixture (test dirs are not packages)."""

    build = staticmethod(build_ultralytics)
    save = staticmethod(save_like_ultralytics)
    oracle = staticmethod(ultralytics_oracle)
    randomise_batchnorm = staticmethod(randomise_batchnorm)


@pytest.fixture(scope="session")
def ultra() -> UltralyticsHelpers:
    return UltralyticsHelpers()
