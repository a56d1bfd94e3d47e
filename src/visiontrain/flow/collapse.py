"""Watching the photometric mask: a run whose mask keeps almost nothing warns, then stops.

The objective's floor (:mod:`visiontrain.flow.losses.mask_floor`) pulls an all-occluded flow back, so
a run normally *recovers* from a collapsing mask within a few steps. The guard is the check that it
did: every step it sees the share of pixels the mask keeps (``stat/mask_kept``); below ``min_share``
it warns once per episode, and after ``patience`` consecutive such steps it stops the run with
:class:`MaskCollapseError`, whose message says what happened and what to change. A step at or above
``min_share`` ends the episode. ``patience=0`` switches the guard off.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

GUARD_MIN_SHARE = 0.05
GUARD_PATIENCE = 100


class MaskCollapseError(ValueError):
    """The occlusion mask kept almost no pixel for too many consecutive steps (the run stops)."""


class MaskCollapseGuard:
    """``guard.update(share, step)`` once per optimizer step; raises :class:`MaskCollapseError`."""

    def __init__(self, min_share: float = GUARD_MIN_SHARE, patience: int = GUARD_PATIENCE):
        if not 0.0 <= min_share < 1.0:
            raise ValueError(f"mask guard: min_share must be in [0, 1), got {min_share}")
        if patience < 0:
            raise ValueError(f"mask guard: patience must be >= 0, got {patience}")
        self.min_share = min_share
        self.patience = patience
        self.low_steps = 0  # consecutive steps below min_share
        self.first_low_step: int | None = None

    def update(self, share: float, step: int) -> None:
        if self.patience == 0:
            return
        if share >= self.min_share:
            if self.low_steps:
                log.warning("flow: the occlusion mask recovered at step %d (keeps %.1f %% of pixels) after %d "
                            "steps below %.0f %%", step + 1, 100 * share, self.low_steps, 100 * self.min_share)
            self.low_steps, self.first_low_step = 0, None
            return
        self.low_steps += 1
        if self.low_steps == 1:
            self.first_low_step = step
            log.warning("flow: at step %d the occlusion mask keeps %.1f %% of pixels (below %.0f %%): the flow "
                        "points out of the image or everything looks occluded; the objective's floor pulls it "
                        "back (stopping after %d such steps in a row)", step + 1, 100 * share,
                        100 * self.min_share, self.patience)
        if self.low_steps >= self.patience:
            raise MaskCollapseError(
                f"the occlusion mask kept less than {100 * self.min_share:.0f} % of pixels for {self.low_steps} "
                f"consecutive steps (steps {self.first_low_step + 1}-{step + 1}, last {100 * share:.1f} %): the "
                "flow has collapsed into the all-occluded state (pointing out of the image), where photometric "
                "losses see nothing. Lower lr, lengthen warmup_steps, raise mask_floor, or start from weights= "
                "of a run that had not collapsed; mask_guard_steps=0 switches this check off")
