"""RAFT as the unsupervised objective's model: forward and backward flow, every iteration, in one call.

The unsupervised objective (:class:`visiontrain.flow.unsupervised.UnsupervisedFlowObjective`) calls
``model(image1, image2)`` and needs both directions. :class:`RaftPair` wraps a torchvision RAFT: the
pairs ``(image1, image2)`` and ``(image2, image1)`` run as one batch of ``2B`` through
:func:`~visiontrain.flow.models.raft.raft_forward`, and the result carries every refinement step, so
the objective scores each of them with decaying weights as SMURF does (Stone et al. 2021).
"""

from __future__ import annotations

import torch
from torch import nn

from visiontrain.flow.models.raft import raft_forward


class RaftPair:
    """``RaftPair(raft, num_flow_updates)(image1, image2) -> dict`` for ``[0, 1]`` images ``[B, 3, H, W]``:

    - ``flow_fw``, ``flow_bw``: the last iteration's flows ``[B, 2, H, W]`` in pixels;
    - ``flow_fw_sequence``, ``flow_bw_sequence``: all ``num_flow_updates`` iterations, first to last.
    """

    def __init__(self, model: nn.Module, num_flow_updates: int = 12):
        if num_flow_updates < 1:
            raise ValueError(f"RaftPair: num_flow_updates must be >= 1, got {num_flow_updates}")
        self.model = model
        self.num_flow_updates = num_flow_updates

    def __call__(self, image1: torch.Tensor, image2: torch.Tensor) -> dict:
        batch = image1.shape[0]
        preds = raft_forward(self.model, torch.cat([image1, image2]), torch.cat([image2, image1]),
                             self.num_flow_updates)
        forward = [p[:batch] for p in preds]
        backward = [p[batch:] for p in preds]
        return {"flow_fw": forward[-1], "flow_bw": backward[-1],
                "flow_fw_sequence": forward, "flow_bw_sequence": backward}
