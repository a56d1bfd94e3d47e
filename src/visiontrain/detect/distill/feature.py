"""Feature distillation on the three neck outputs (P3, P4, P5): ``distill.feature=cwd|l2|mgd|pkd|none``.

Every loss takes per-level lists of ``[B, C, H, W]`` maps (a single map is a one-level list), returns the
**sum over levels** of a per-level loss (so one weight applies to every level alike) and computes in float32
whatever the input dtype (autocast). The student's maps reach the loss through the student-side module of
the method (:func:`make_feature_modules`; trained with the student, saved in its checkpoints under
``distill_adapters``, dropped by every loader and by export):

==========  =========================================================================  =======================
method      per-level loss                                                               student-side module
==========  =========================================================================  =======================
``cwd``     channel-wise KL of spatial softmaxes (Shu et al., ICCV 2021)                 1×1 conv if widths differ
``l2``      score-weighted L2, weights = teacher's top class probability per position     projector 1×1-ReLU-1×1
``mgd``     masked generative: MSE(generator(student · random mask), teacher)            [1×1 align] + 3×3-ReLU-3×3
            (Yang et al., ECCV 2022)
``pkd``     1 − Pearson correlation per channel (Cao et al., NeurIPS 2022)               1×1 conv if widths differ
==========  =========================================================================  =======================

``l2`` is written from the description of Ultralytics' ``distill_model=`` (a score-weighted L2 on the neck
outputs through a 1×1 projector); Ultralytics' code was read to understand it, not copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiontrain.detect.config import FEATURE_METHODS  # one list, checked by the config
from visiontrain.detect.distill.errors import DistillError


def _as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _pairs(name: str, student, teacher) -> list[tuple[Tensor, Tensor]]:
    s_list, t_list = _as_list(student), _as_list(teacher)
    if len(s_list) != len(t_list):
        raise DistillError(f"{name}: {len(s_list)} student maps but {len(t_list)} teacher maps")
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        if s.shape != t.shape or s.ndim != 4:
            raise DistillError(f"{name}: level {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must "
                               "be equal [B, C, H, W] shapes (add a 1×1 adapter when channel counts differ)")
    return list(zip(s_list, t_list))


def cwd_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor], tau: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel of a ``[B, C, H, W]`` map is turned into a distribution over its ``H·W`` positions by a
    softmax with temperature ``tau``; the loss is ``tau² · KL(teacher ‖ student)`` averaged over the
    ``B·C`` channel distributions::

        loss = tau² / (B·C) · Σ_{b,c} Σ_i p_t(i) · (log p_t(i) - log p_s(i)),   p = softmax(x[b, c] / tau)
    """
    pairs = _pairs("cwd_loss", student, teacher)
    total = pairs[0][0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        b, c = s.shape[:2]
        log_ps = F.log_softmax(s.float().flatten(2) / tau, dim=-1)  # [B, C, HW]
        log_pt = F.log_softmax(t.detach().float().flatten(2) / tau, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, C]
        total = total + kl.sum() * (tau * tau) / (b * c)
    return total


def level_scores(teacher_logits: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """``[B, nc, A]`` teacher class logits (levels concatenated, as :func:`flatten_raw` gives them) →
    per level ``[B, H, W]``: the teacher's highest class probability at each position."""
    conf = teacher_logits.detach().float().sigmoid().amax(1)  # [B, A]
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != conf.shape[1]:
        raise DistillError(f"level_scores: {conf.shape[1]} anchors but the levels {list(shapes)} hold {sum(sizes)}")
    return [p.reshape(p.shape[0], h, w) for p, (h, w) in zip(conf.split(sizes, dim=1), shapes)]


def score_weighted_l2_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor],
                           scores: Tensor | Sequence[Tensor]) -> Tensor:
    """Score-weighted L2 (the feature term of Ultralytics' ``distill_model=``).

    ``student`` (already through the projector), ``teacher``: ``[B, C, H, W]`` per level; ``scores``:
    ``[B, H, W]`` per level (:func:`level_scores`). Per level::

        loss = Σ_{b,c,h,w} w_bhw · (s_bchw - t_bchw)² / (C · Σ_{b,h,w} w_bhw)

    a score-weighted mean over positions of the per-position mean squared error over channels, so positions
    where the teacher sees an object dominate and the loss does not depend on the map size.
    """
    pairs = _pairs("score_weighted_l2_loss", student, teacher)
    w_list = _as_list(scores)
    total = pairs[0][0].new_zeros((), dtype=torch.float32)
    for (s, t), w in zip(pairs, w_list):
        if w.shape != (s.shape[0], *s.shape[2:]):
            raise DistillError(f"score_weighted_l2_loss: scores {tuple(w.shape)} must be [B, H, W] of the map "
                               f"{tuple(s.shape)}")
        w = w.detach().float()
        sq = (s.float() - t.detach().float()).pow(2).sum(1)  # [B, H, W]
        total = total + (sq * w).sum() / (w.sum() * s.shape[1]).clamp(min=1e-9)
    return total


def random_masks(feats: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Per level a ``[B, 1, H, W]`` float mask: 0 at a random ``ratio`` of the positions (MGD's λ), else 1.
    Drawn from torch's global generator (the engine saves and restores it, so a resumed run is exact)."""
    return [(torch.rand(f.shape[0], 1, *f.shape[2:], device=f.device) >= ratio).float() for f in feats]


def mgd_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor],
             generators: Sequence[nn.Module], masks: Sequence[Tensor]) -> Tensor:
    """Masked generative distillation (Yang et al., ECCV 2022).

    Per level: the student map ``[B, C_s, H, W]`` (through the generator's 1×1 ``align`` when widths differ)
    is multiplied by the mask ``[B, 1, H, W]`` (0 = masked position, :func:`random_masks`), the generation
    block (3×3 conv, ReLU, 3×3 conv) must rebuild the **whole** teacher map from it, and::

        loss = mean_{b,c,h,w} (G(align(s) · M) - t)²

    (the paper sums over ``C·H·W`` and divides by ``B``; the mean keeps the weight independent of the map
    size: ``α_paper · C·H·W`` ≈ our weight).
    """
    s_list, t_list = _as_list(student), _as_list(teacher)
    if not len(s_list) == len(t_list) == len(generators) == len(masks):
        raise DistillError(f"mgd_loss: {len(s_list)} student maps, {len(t_list)} teacher maps, "
                           f"{len(generators)} generators and {len(masks)} masks; one of each per level")
    total = s_list[0].new_zeros((), dtype=torch.float32)
    for s, t, gen, m in zip(s_list, t_list, generators, masks):
        g = gen(s, m)
        if g.shape != t.shape:
            raise DistillError(f"mgd_loss: generated {tuple(g.shape)} but teacher map {tuple(t.shape)}")
        total = total + (g.float() - t.detach().float()).pow(2).mean()
    return total


def standardize_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``[B, C, H, W]`` → each channel to zero mean and unit (population) standard deviation over ``B·H·W``."""
    x = x.float()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def pkd_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor]) -> Tensor:
    """Pearson-correlation feature distillation (PKD, Cao et al., NeurIPS 2022).

    Both maps are standardised per channel (:func:`standardize_channels`); per level::

        loss = mean_{b,c,h,w} (ŝ - t̂)² / 2 = mean_c (1 - r_c)

    with ``r_c`` the Pearson correlation of channel ``c`` of student and teacher over ``B·H·W`` values: only
    the *pattern* of the teacher's activations is imitated, not their scale or offset (which differ between
    architectures and FPN levels). A constant channel has no pattern; it contributes 1 (``r = 0``).
    """
    total = None
    for s, t in _pairs("pkd_loss", student, teacher):
        term = (standardize_channels(s) - standardize_channels(t.detach())).pow(2).mean() / 2
        total = term if total is None else total + term
    return total


class Projector(nn.Sequential):
    """The ``l2`` student-side module: 1×1 conv (``c_s → c_t``), ReLU, 1×1 conv (``c_t → c_t``)."""

    def __init__(self, c_student: int, c_teacher: int):
        super().__init__(nn.Conv2d(c_student, c_teacher, 1), nn.ReLU(), nn.Conv2d(c_teacher, c_teacher, 1))


class MGDGenerator(nn.Module):
    """The ``mgd`` student-side module: ``[B, c_s, H, W]`` and a mask ``[B, 1, H, W]`` → ``[B, c_t, H, W]``:
    1×1 ``align`` (only when ``c_s != c_t``), mask, then 3×3 conv, ReLU, 3×3 conv."""

    def __init__(self, c_student: int, c_teacher: int):
        super().__init__()
        self.align = nn.Conv2d(c_student, c_teacher, 1) if c_student != c_teacher else None
        self.generation = nn.Sequential(nn.Conv2d(c_teacher, c_teacher, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(c_teacher, c_teacher, 3, padding=1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.align is not None:
            x = self.align(x)
        return self.generation(x * mask.to(x.dtype))


def make_feature_modules(method: str, student_channels: Sequence[int],
                         teacher_channels: Sequence[int]) -> nn.ModuleList | None:
    """The student-side modules of ``method`` per level, or ``None`` when it needs none (``cwd`` / ``pkd``
    with equal widths, ``none``)."""
    if method not in FEATURE_METHODS:
        raise DistillError(f"feature method {method!r}: use one of {', '.join(FEATURE_METHODS)}")
    pairs = list(zip(student_channels, teacher_channels))
    if method == "l2":
        return nn.ModuleList(Projector(cs, ct) for cs, ct in pairs)
    if method == "mgd":
        return nn.ModuleList(MGDGenerator(cs, ct) for cs, ct in pairs)
    if method in ("cwd", "pkd") and any(cs != ct for cs, ct in pairs):
        return nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in pairs)
    return None
