"""Damaged images of a detection dataset: found when a split's labels are loaded, before training.

:func:`visiontrain.detect.data.load_labels` checks every image of the split with
:func:`visiontrain.filecheck.check_image_file` (header, end marker or length; a full decode only where
that is not enough) and, by ``bad_images``:

* ``"raise"`` (default): one error naming every damaged image and why;
* ``"skip"``: leaves them out of the :class:`LabelSet`, logs one warning with the count and the files;
* ``"drop"``: leaves them out quietly (``LabelSet.bad_images`` lists them); the caller reports, as the
  detection task does for its training and validation splits together (:func:`report_bad_images`).

The check runs at every load, label cache or not: on 1000 images it takes a fraction of a second against
minutes for one epoch (BENCHMARKS.md, "Input validation cost"), so its result is not cached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontrain.filecheck import BadFile, check_image_files, format_bad_files

BAD_IMAGE_MODES = ("raise", "skip", "drop")
FIX = ("Replace or remove them (and their labels), or set skip_bad_images=true to train or evaluate "
       "without them.")
log = logging.getLogger(__name__)


def screen_images(paths: Sequence[str | Path], mode: str, where: str, error: type[Exception]) -> list[BadFile]:
    """Check ``paths`` (the images of the split ``where``); ``[(path, reason)]`` of the damaged ones.

    ``mode="raise"`` raises ``error`` naming them all; ``"skip"`` logs one warning; ``"drop"`` is quiet."""
    if mode not in BAD_IMAGE_MODES:
        raise ValueError(f"bad_images={mode!r}: expected one of {', '.join(BAD_IMAGE_MODES)}")
    bad = check_image_files(paths, desc=f"checking {where} images")
    if bad and mode == "raise":
        raise error(f"{where}: " + format_bad_files(bad, "images", FIX))
    if bad and mode == "skip":
        log_skipped(where, bad, len(paths))
    return bad


def log_skipped(where: str, bad: Sequence[BadFile], total: int) -> None:
    """One warning line: how many of ``total`` images were skipped, and which (with the reasons)."""
    files = "; ".join(f"{p}: {r}" for p, r in bad)
    log.warning("%s: skipped %d damaged image(s) of %d (skip_bad_images=true): %s", where, len(bad), total, files)


def report_bad_images(label_sets: Sequence[Any], skip: bool, error: type[Exception]) -> None:
    """After loading splits with ``bad_images="drop"``: raise one ``error`` naming the damaged images of
    every split (``skip=False``), or log one warning line per split that lost images (``skip=True``).

    ``label_sets``: :class:`~visiontrain.detect.data.LabelSet` objects (a split listed twice counts once)."""
    seen: dict[tuple[str, str], Any] = {}
    for ls in label_sets:
        seen.setdefault((ls.source, ls.split), ls)
    groups = [(f"{ls.layout} {ls.split} ({ls.source})", ls.bad_images) for ls in seen.values()]
    if not any(bad for _, bad in groups):
        return
    if not skip:
        raise error(format_bad_files([], "images", FIX, groups=groups))
    for (title, bad), ls in zip(groups, seen.values()):
        if bad:
            log_skipped(title, bad, len(ls.records) + len(bad))
