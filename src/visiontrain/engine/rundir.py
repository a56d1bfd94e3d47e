"""Output folders: a new run or a new eval/predict output never mixes with an old one.

``runs/detect`` is used when it holds nothing yet; otherwise the next free ``runs/detect2``,
``runs/detect3``… A folder is created only once the inputs have been validated, so a start that fails
leaves no empty folder behind.
"""

from __future__ import annotations

import json
import os
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


ELASTIC_MARKER = "elastic.json"


def elastic_key() -> str | None:
    """Names this torchrun job across restarts of its workers (``None`` outside torchrun): the rendezvous
    id (``--rdzv-id``; ``--standalone`` makes one up), else the agent's own log folder, which outlives
    its workers' restarts."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    if run_id != "none":
        return run_id
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")  # <agent log dir>/attempt_<n>/<rank>/error.json
    parts = Path(error_file).parts
    if len(parts) >= 4 and parts[-3].startswith("attempt_"):
        return "agent:" + str(Path(*parts[:-3]))
    return f"static:{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (``--max-restarts``); 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def mark_elastic_run(run: Path, key: str | None) -> None:
    if key is not None:
        (run / ELASTIC_MARKER).write_text(json.dumps({"key": key}))


def find_elastic_run(out: str | Path, key: str | None) -> Path | None:
    """The run folder (``out``, ``out2``, …) that this torchrun job started, when a restarted worker
    looks for it; ``None`` if the job had not made one yet."""
    if key is None:
        return None
    out = Path(out)
    candidates = [out, *sorted(out.parent.glob(f"{out.name}[0-9]*"))] if out.parent.is_dir() else []
    for run in candidates:
        marker = run / ELASTIC_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            return run
    return None


def choose_run_dir(out: str | Path, resume: str, elastic: str | None) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint to resume from)`` for a training run (decided on rank 0):

    * ``resume=PATH``: that checkpoint, in ``out``; ``resume=auto``: ``out/checkpoints/last.pt`` if it
      exists, else a new run in exactly ``out`` (a requeued cluster job's first start);
    * a torchrun worker restarted after a failure (``--max-restarts``) continues the run its job started;
    * otherwise a new run in ``out``, or ``out2``, ``out3``… when ``out`` holds one already."""
    from visiontrain.engine.checkpoint import resume_path

    out = Path(out)
    resume_from = resume_path(resume, out)
    if resume_from is not None or resume == "auto":
        return out, resume_from
    restarted = find_elastic_run(out, elastic) if restart_count() > 0 else None
    if restarted is not None and (restarted / "checkpoints" / "last.pt").is_file():
        return restarted, restarted / "checkpoints" / "last.pt"
    return next_run_dir(out), None


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
