"""Every file of a flow dataset checked before training starts, and one error naming the bad ones.

Images go through :func:`visiontrain.filecheck.check_image_file` (header, end marker or length; a full
decode only where that is not enough), ground truth through :func:`visiontrain.flow.io.check_flow_file`
(magic number, size and length from the header; no flow data is read). Works for every spec: it looks at
the files a dataset lists (:class:`~visiontrain.flow.data.FlowDataset` items, the frames of a
``frames:DIR`` :class:`~visiontrain.flow.frames.FramesDataset`, the base of a wrapper with ``.base``);
a ``video:FILE`` dataset was decoded when it was built and has nothing left to check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontrain.filecheck import BadFile, check_files, check_image_files, format_bad_files
from visiontrain.flow.data import FlowDataError, FlowDataset
from visiontrain.flow.frames import FramesDataset
from visiontrain.flow.io import check_flow_file

FIX = ("Replace them with complete files, or remove the pairs that use them from the dataset "
       "(a FlyingChairs pair also has a line in FlyingChairs_train_val.txt).")


def _unwrap(dataset: Any) -> Any:
    while not isinstance(dataset, (FlowDataset, FramesDataset)) and hasattr(dataset, "base"):
        dataset = dataset.base
    return dataset


def dataset_files(dataset: Any) -> tuple[list[Path], list[Path]]:
    """``(images, flow files)`` that ``dataset`` reads; a wrapper's ``.base`` is followed."""
    dataset = _unwrap(dataset)
    if isinstance(dataset, FlowDataset):
        images = [p for it in dataset.items for p in (it.image1, it.image2)]
        return images, [it.flow for it in dataset.items if it.flow is not None]
    if isinstance(dataset, FramesDataset):
        return list(dataset.files), []
    return [], []  # a video, decoded when the dataset was built


def find_bad_files(dataset: Any) -> list[BadFile]:
    """``[(path, reason)]`` of the damaged images and flow files of ``dataset`` (images first)."""
    images, flows = dataset_files(dataset)
    bad = check_image_files(images, desc="checking images")
    return bad + check_files(flows, check_flow_file, desc="checking flow files")


def check_flow_datasets(datasets: Sequence[tuple[str, Any]]) -> None:
    """Check every file of each ``(role, dataset)`` (``dataset`` may be None) and raise one
    :class:`FlowDataError` naming every damaged file, grouped by dataset."""
    groups = []
    seen: set[int] = set()
    for role, dataset in datasets:
        if dataset is None or id(dataset) in seen:
            continue
        seen.add(id(dataset))
        inner = _unwrap(dataset)
        name = f"frames:{inner.root}" if isinstance(inner, FramesDataset) else getattr(inner, "name", "")
        groups.append((f"{role} data {name}".rstrip(), find_bad_files(dataset)))
    if any(bad for _, bad in groups):
        raise FlowDataError(format_bad_files([], "images or flow files", FIX, groups=groups))
