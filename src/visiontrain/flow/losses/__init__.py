"""Flow losses. Supervised: :func:`sequence_loss`. The unsupervised terms (census, smoothness,
occlusion) live in their own modules next to this one."""

from visiontrain.flow.losses.supervised import sequence_loss

__all__ = ["sequence_loss"]
