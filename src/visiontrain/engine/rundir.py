"""Output folders: a new run or a new eval/predict output never mixes with an old one.

``runs/detect`` is used when it holds nothing yet; otherwise the next free ``runs/detect2``,
``runs/detect3``… A folder is created only once the inputs have been validated, so a start that fails
leaves no empty folder behind.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _taken(folder: Path, marker: str | None) -> bool:
    if marker is not None:
        return (folder / marker).exists()
    return folder.is_dir() and any(folder.iterdir())


def next_free_dir(out: str | Path, marker: str | None = None) -> Path:
    """``out`` if it is free, else ``out2``, ``out3``… Free means: no ``marker`` inside it (a training run's
    ``checkpoints``), or, without a marker, missing or empty."""
    out = Path(out)
    if not _taken(out, marker):
        return out
    i = 2
    while _taken(out.parent / f"{out.name}{i}", marker):
        i += 1
    return out.parent / f"{out.name}{i}"


def next_run_dir(out: str | Path) -> Path:
    """Where a new training run goes: ``out`` unless it already holds a run (``checkpoints/``)."""
    return next_free_dir(out, "checkpoints")


def fresh_output_dir(out: str | Path) -> Path:
    """Create and return a new folder for an ``eval`` / ``predict`` / ``export`` verb's files: ``out`` when
    missing or empty, else the next free ``outN`` (said on stderr), so old and new files never mix."""
    path = next_free_dir(out)
    if path != Path(out):
        print(f"{out} already holds results; writing to {path}", file=sys.stderr)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_report(path: str | Path, metrics: dict[str, Any], **context: Any) -> Path:
    """``metrics.json``: the metrics at the top level and, under ``"source"``, what produced them
    (``context``: weights, data, split, image size…), the command line, the visiontrain and torch versions
    and the time."""
    import torch

    from visiontrain import __version__

    source = {**context, "command": " ".join(["visiontrain", *sys.argv[1:]]), "visiontrain": __version__,
              "torch": str(torch.__version__), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    record = {**metrics, "source": source}
    path = Path(path)
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
