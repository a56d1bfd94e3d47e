"""Shared flow fixtures: a tiny synthetic FlyingChairs-layout set and torchvision-style RAFT weights."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.optical_flow import raft_small

from visiontrain.flow.synthetic import write_synthetic_chairs


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """4 training and 1 validation pair, 128×128 (tests read it, never change it)."""
    return write_synthetic_chairs(tmp_path_factory.mktemp("flow") / "chairs", 4, 1, (128, 128), seed=0)


@pytest.fixture(scope="session")
def tv_weights(tmp_path_factory):
    """A randomly initialised raft_small saved as torchvision would save it (plain state dict)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "raft_small_tv.pth"
    torch.save(raft_small().state_dict(), path)
    return path
