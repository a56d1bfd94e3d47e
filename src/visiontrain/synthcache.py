"""Built-in synthetic data, written once and shared: by every rank of a torchrun job, by runs started side by
side, by later runs.

:func:`synthesize_once` writes a data set into a temporary sibling folder and renames it into place
under a file lock, so whoever comes first writes and everyone else waits for it and reuses it, on one
machine or on several that share the folder (each node writes its own copy when they do not). A
half-written set is never seen: an interrupted writer leaves only a temporary folder, removed by the
next writer. This needs no process group, so it works before the trainer initialises one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

MARKER = ".visiontrain_synth.json"


def cache_root() -> Path:
    """``$VISIONTRAIN_CACHE``, else ``~/.cache/visiontrain``: where data sets synthesised for a run go."""
    return Path(os.environ.get("VISIONTRAIN_CACHE", "~/.cache/visiontrain")).expanduser()


def is_complete(folder: Path, params: dict[str, Any] | None = None) -> bool:
    """``folder`` holds a finished set (written with ``params``, when given)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    return params is None or json.loads(marker.read_text()) == json.loads(json.dumps(params))


def _check_replaceable(folder: Path) -> None:
    """Only a set we wrote (our marker, or anything under the cache root) or an empty folder is replaced."""
    ours = (folder / MARKER).is_file() or cache_root().resolve() in folder.resolve().parents
    if not ours and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not a synthetic set written by visiontrain; it is left "
                              f"alone. Choose another folder for the synthetic data, or empty this one.")


def synthesize_once(folder: str | Path, params: dict[str, Any], write: Callable[[Path], Any],
                    what: str = "synthetic data") -> Path:
    """Return ``folder`` holding the set ``write(tmp_folder)`` writes for ``params``; write it first if
    it is missing or was written with other ``params`` (then it is replaced). Safe under concurrency."""
    folder = Path(folder)
    if is_complete(folder, params):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if is_complete(folder, params):  # another process wrote it while we waited
            return folder
        print(f"writing {what} to {folder} (once; later runs reuse it)", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            write(tmp)
            (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
            if folder.exists():
                _check_replaceable(folder)
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
