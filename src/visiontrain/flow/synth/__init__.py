"""The built-in flow generator (issue 18): layered scenes with long-tailed motion, natural-image textures
and camera effects, exact ground truth. ``style=legacy`` keeps :mod:`visiontrain.flow.synthetic`'s."""

from visiontrain.flow.synth.config import FlowGenConfig
from visiontrain.flow.synth.pairs import flow_pair

__all__ = ["FlowGenConfig", "flow_pair"]
