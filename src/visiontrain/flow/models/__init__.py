"""Flow networks. RAFT (supervised) comes from torchvision through :mod:`.raft`; UFlow's PWC network is in
:mod:`.pwc`. Loading a trained model from a file: :mod:`visiontrain.flow.inference`."""

from visiontrain.flow.models.raft import RAFT_NAMES, build_raft, raft_forward

__all__ = ["RAFT_NAMES", "build_raft", "raft_forward"]
