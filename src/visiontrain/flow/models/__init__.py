"""Flow networks. RAFT (supervised) comes from torchvision through :mod:`.raft`."""

from visiontrain.flow.models.raft import RAFT_NAMES, build_raft, load_raft_weights, raft_forward

__all__ = ["RAFT_NAMES", "build_raft", "load_raft_weights", "raft_forward"]
