"""Flow losses. Supervised: :func:`sequence_loss`. Unsupervised (UFlow): :func:`census_loss`; the
smoothness, occlusion and SSIM terms live in their own modules next to this one."""

from visiontrain.flow.losses.census import census_loss
from visiontrain.flow.losses.supervised import sequence_loss

__all__ = ["census_loss", "sequence_loss"]
