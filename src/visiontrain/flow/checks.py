"""Every file of a flow dataset checked before training starts, and one error naming the bad ones.

Images go through :func:`visiontrain.filecheck.check_image_file` (header, end marker or length; a full
decode only where that is not enough), ground truth through :func:`visiontrain.flow.io.check_flow_file`
(magic number, size and length from the header; no flow data is read). Works for every spec: it looks at
the files a dataset lists (:class:`~visiontrain.flow.data.FlowDataset` items, the frames of a
``frames:DIR`` :class:`~visiontrain.flow.frames.FramesDataset`, the base of a wrapper with ``.base``);
a ``video:FILE`` dataset was decoded when it was built and has nothing left to check.

:func:`check_image_sizes` then reads every image's size from its header and names the images smaller
than what training needs (the supervised crop, or the PWC model's 64×64), so a run never stops mid-epoch
on an image it could have measured, and nothing is ever upscaled to fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from visiontrain.filecheck import BadFile, check_files, check_image_files, format_bad_files
from visiontrain.flow.data import FlowDataError, FlowDataset
from visiontrain.flow.frames import FramesDataset, VideoDataset
from visiontrain.flow.io import check_flow_file
from visiontrain.flow.sizes import format_size

MAX_LISTED = 10  # images named per dataset in a size error (a whole dataset may be too small)

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


def _titled(datasets: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """``(title, dataset)`` for each distinct non-None dataset of ``(role, dataset)``: "train data chairs:DIR"."""
    seen: set[int] = set()
    for role, dataset in datasets:
        if dataset is None or id(dataset) in seen:
            continue
        seen.add(id(dataset))
        inner = _unwrap(dataset)
        name = f"frames:{inner.root}" if isinstance(inner, FramesDataset) else getattr(inner, "name", "")
        yield f"{role} data {name}".rstrip(), dataset


def check_flow_datasets(datasets: Sequence[tuple[str, Any]]) -> None:
    """Check every file of each ``(role, dataset)`` (``dataset`` may be None) and raise one
    :class:`FlowDataError` naming every damaged file, grouped by dataset."""
    groups = [(title, find_bad_files(dataset)) for title, dataset in _titled(datasets)]
    if any(bad for _, bad in groups):
        raise FlowDataError(format_bad_files([], "images or flow files", FIX, groups=groups))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image, from its header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def find_small_images(dataset: Any, minimum: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
    """``[(path, (H, W))]`` of the images of ``dataset`` lower or narrower than ``minimum = (H, W)``; a video
    (decoded when its dataset was built) is one entry ``video:FILE``."""
    inner = _unwrap(dataset)
    if isinstance(inner, VideoDataset):
        height, width = inner.frames.shape[1:3]
        small = height < minimum[0] or width < minimum[1]
        return [(f"video:{inner.path}", (height, width))] if small else []
    sizes: dict[str, tuple[int, int]] = {}

    def too_small(path: str) -> str | None:
        sizes[path] = image_size(path)
        return "small" if sizes[path][0] < minimum[0] or sizes[path][1] < minimum[1] else None

    images, _ = dataset_files(dataset)
    return [(p, sizes[p]) for p, _ in check_files(images, too_small, desc="reading image sizes")]


def check_image_sizes(datasets: Sequence[tuple[str, Any]], minimum: tuple[int, int], needs: str,
                      fix: Callable[[tuple[int, int]], str]) -> None:
    """Read the size of every image of each ``(role, dataset)`` and raise one :class:`FlowDataError` naming
    those smaller than ``minimum = (H, W)``, which ``needs`` (e.g. "crop=256x320") asks for; ``fix(smallest)``
    says what to do, given the smallest height and width among them. Run it after :func:`check_flow_datasets`."""
    groups = [(title, small) for title, dataset in _titled(datasets) if (small := find_small_images(dataset, minimum))]
    if not groups:
        return
    count = sum(len(small) for _, small in groups)
    lines = [f"{count} images are smaller than {format_size(*minimum)} (H×W), which {needs} needs; images are "
             f"never upscaled to fit:"]
    for title, small in groups:
        lines.append(f"  {title} ({len(small)}):")
        lines += [f"    {path}: {format_size(*size)}" for path, size in small[:MAX_LISTED]]
        if len(small) > MAX_LISTED:
            lines.append(f"    ... and {len(small) - MAX_LISTED} more")
    smallest = (min(size[0] for _, small in groups for _, size in small),
                min(size[1] for _, small in groups for _, size in small))
    lines.append(fix(smallest))
    raise FlowDataError("\n".join(lines))
