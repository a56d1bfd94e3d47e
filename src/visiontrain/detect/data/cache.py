"""The label cache: parsed labels of one split in ``<dataset>/.visiontrain_cache/<layout>_<split>.npz``.

The key is a hash of the dataset's absolute path, the annotation bytes, the image names and sizes, the
class list, the damaged images left out and :data:`READER_VERSION`; any change re-parses. A cache that
cannot be written (read-only dataset) or read (damaged) is simply not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from visiontrain.detect.data.labels import ImageLabels, LabelSet

READER_VERSION = 1
CACHE_DIR = ".visiontrain_cache"
log = logging.getLogger(__name__)


def content_key(parts: list[bytes]) -> str:
    """A 128-bit hash of ``parts`` (length-prefixed, so ``[ab, c]`` and ``[a, bc]`` differ)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def cache_path(cache_dir: str | Path, layout: str, split: str) -> Path:
    return Path(cache_dir) / CACHE_DIR / f"{layout}_{split}.npz"


def write_cache(path: Path, key: str, ls: LabelSet) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recs = ls.records
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, key=np.array(key), paths=np.array([r.path for r in recs], dtype=str),
                 ids=np.array([r.image_id for r in recs], dtype=str),
                 sizes=np.array([(r.height, r.width) for r in recs], np.int64).reshape(-1, 2),
                 counts=np.array([len(r.classes) for r in recs], np.int64),
                 boxes=np.concatenate([r.boxes for r in recs] or [np.zeros((0, 4))]).astype(np.float32),
                 classes=np.concatenate([r.classes for r in recs] or [np.zeros(0)]).astype(np.int64),
                 class_names=np.array(ls.class_names, dtype=str), stats=np.array(json.dumps(ls.stats)))
        os.replace(tmp, path)
    except OSError as e:  # read-only dataset: work without a cache
        log.debug("could not write label cache %s: %s", path, e)


def read_cache(path: Path, key: str, layout: str, split: str, source: str) -> LabelSet | None:
    """The cached :class:`LabelSet`, or ``None`` when there is none, its key differs or it is damaged."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            bounds = np.concatenate([[0], np.cumsum(z["counts"])])
            boxes, classes = z["boxes"], z["classes"]
            records = [ImageLabels(str(p), str(i), int(s[0]), int(s[1]), boxes[a:b], classes[a:b])
                       for p, i, s, a, b in zip(z["paths"], z["ids"], z["sizes"], bounds[:-1], bounds[1:])]
            return LabelSet(records, [str(n) for n in z["class_names"]], layout, split, source,
                            json.loads(str(z["stats"])), from_cache=True)
    except Exception as e:  # a damaged cache is rebuilt
        log.debug("ignoring unreadable label cache %s: %s", path, e)
        return None
