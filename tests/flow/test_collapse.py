"""The mask-collapse guard: warns when the mask keeps almost nothing, stops a run that stays there."""

from __future__ import annotations

import logging

import pytest
import torch

from visiontrain.engine.task import StepInfo
from visiontrain.flow.collapse import MaskCollapseError, MaskCollapseGuard
from visiontrain.flow.config import FlowTrainConfig
from visiontrain.flow.task import FlowTask

from .test_mask_floor import ConstantFlow
from .test_unsupervised import textured_pair


def test_guard_warns_then_stops_after_patience_and_a_good_step_resets_it(caplog) -> None:
    guard = MaskCollapseGuard(min_share=0.05, patience=3)
    with caplog.at_level(logging.WARNING, logger="visiontrain.flow.collapse"):
        guard.update(0.9, 0)
        guard.update(0.01, 1)
        guard.update(0.0, 2)
        guard.update(0.5, 3)  # recovered: the count restarts
        assert "keeps 1.0 %" in caplog.text and "recovered at step 4" in caplog.text
        guard.update(0.0, 4)
        guard.update(0.0, 5)
        with pytest.raises(MaskCollapseError, match=r"less than 5 % of pixels for 3 consecutive steps \(steps 5-7"):
            guard.update(0.02, 6)
    MaskCollapseGuard(patience=0).update(0.0, 0)  # switched off: never raises
    with pytest.raises(ValueError):
        MaskCollapseGuard(min_share=1.0)


def test_training_step_logs_the_kept_share_and_the_guard_stops_a_synthetic_collapse() -> None:
    """A model whose flow points out of the image on every step (a frozen collapse): the task reports
    ``stat/mask_kept`` = 0 and stops on the 3rd step with a message naming the cause and the fixes."""
    cfg = FlowTrainConfig(method="unsupervised", model="pwc", mask_guard_steps=3, device="cpu")
    task = FlowTask(cfg)
    image1, image2 = textured_pair((3, 2))
    batch = {"image1": image1, "image2": image2}
    healthy = task.training_step(ConstantFlow(3.0, 2.0), batch, StepInfo(step=0))
    assert healthy["stat/mask_kept"] > 0.8
    collapsed = ConstantFlow(500.0, 0.0)
    for step in (1, 2):
        terms = task.training_step(collapsed, batch, StepInfo(step=step))
        assert terms["stat/mask_kept"] == 0 and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(MaskCollapseError, match="all-occluded state.*mask_guard_steps=0"):
        task.training_step(collapsed, batch, StepInfo(step=3))
