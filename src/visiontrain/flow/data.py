"""Flow datasets selected by a spec string, and their collate.

Specs (``data=`` / ``val_data=``):

===================  ===========================================================================
``chairs:DIR``       FlyingChairs (also the output of ``visiontrain synth flow``); splits train / val
``sintel-clean:DIR`` MPI Sintel training set, clean pass (``sintel-final:DIR``: final pass)
``kitti:DIR``        KITTI 2015 flow training set (sparse ground truth)
``things:DIR``       FlyingThings3D, clean pass, left camera; splits TRAIN / TEST (used as val)
``hd1k:DIR``         HD1K (sparse ground truth)
``pairs:DIR``        a folder of ``<name>_img1.*``, ``<name>_img2.*`` and optional ``<name>_flow.flo``
``pair:A,B[,GT]``    one image pair with optional ground truth (paths must not contain commas)
===================  ===========================================================================

The public datasets' file lists (layouts, pairing and split rules) come from ``torchvision.datasets``
(FlyingChairs, Sintel, KittiFlow, FlyingThings3D, HD1K); the files are decoded by
:mod:`visiontrain.flow.io`, which validates them and names the file in every error. ``DIR`` may be the
dataset folder itself (``.../FlyingChairs``) or its parent, as torchvision expects.

Every sample is a dict ``{image1 [3, H, W] float32 in [0, 1], image2, flow [2, H, W] float32 or None,
valid [H, W] bool or None, id}``. Ground truth with ``|u|`` or ``|v|`` >= 1000 (and unknown values) is
invalid, as in torchvision's reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visiontrain.engine.task import sample_rng
from visiontrain.flow.io import FLOW_EXTENSIONS, IMAGE_EXTENSIONS, read_flow, read_image
from visiontrain.flow.sizes import format_size

MAX_VALID_FLOW = 1000.0


class FlowDataError(ValueError):
    """A dataset spec or folder does not hold what it should; the message says what was expected."""


@dataclass(frozen=True)
class FlowItem:
    image1: Path
    image2: Path
    flow: Path | None
    id: str


# torchvision dataset folder name, a file or folder that marks DIR as the dataset folder itself,
# the torchvision split used for our "train" and "val", and the expected layout for error messages.
_TORCHVISION_KINDS: dict[str, dict] = {
    "chairs": dict(folder="FlyingChairs", marker="FlyingChairs_train_val.txt", splits={"train": "train", "val": "val"},
                   layout="FlyingChairs/data/NNNNN_img1.ppm, NNNNN_img2.ppm, NNNNN_flow.flo and "
                          "FlyingChairs/FlyingChairs_train_val.txt"),
    "sintel-clean": dict(folder="Sintel", marker="training", splits={"train": "train"},
                         layout="Sintel/training/clean/<scene>/*.png and Sintel/training/flow/<scene>/*.flo"),
    "sintel-final": dict(folder="Sintel", marker="training", splits={"train": "train"},
                         layout="Sintel/training/final/<scene>/*.png and Sintel/training/flow/<scene>/*.flo"),
    "kitti": dict(folder="KittiFlow", marker="training", splits={"train": "train"},
                  layout="KittiFlow/training/image_2/*_10.png, *_11.png and KittiFlow/training/flow_occ/*_10.png"),
    "things": dict(folder="FlyingThings3D", marker="optical_flow", splits={"train": "train", "val": "test"},
                   layout="FlyingThings3D/frames_cleanpass/{TRAIN,TEST}/<A|B|C>/<seq>/left/*.png and "
                          "FlyingThings3D/optical_flow/{TRAIN,TEST}/.../into_{future,past}/left/*.pfm"),
    "hd1k": dict(folder="hd1k", marker="hd1k_input", splits={"train": "train"},
                 layout="hd1k/hd1k_input/image_2/*.png and hd1k/hd1k_flow_gt/flow_occ/*.png"),
}
DATASET_KINDS = (*_TORCHVISION_KINDS, "pairs", "pair")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"kind:ARG"`` -> ``(kind, ARG)`` with a clear error for unknown kinds."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg or kind not in DATASET_KINDS:
        raise FlowDataError(
            f"dataset spec '{spec}' is not KIND:PATH with KIND one of {', '.join(DATASET_KINDS)} "
            f"(e.g. chairs:/data/FlyingChairs, pair:a.png,b.png)")
    return kind, arg


def has_split(spec: str, split: str) -> bool:
    """Whether the dataset named by ``spec`` has a ``split`` (``pairs``/``pair`` have every split)."""
    kind, _ = parse_spec(spec)
    return kind in ("pairs", "pair") or split in _TORCHVISION_KINDS[kind]["splits"]


def list_flow_items(spec: str, split: str = "train") -> list[FlowItem]:
    """The ``(image1, image2, flow)`` files of ``spec``'s ``split`` (``train`` or ``val``)."""
    kind, arg = parse_spec(spec)
    if kind == "pair":
        return _pair_items(arg)
    if kind == "pairs":
        return _folder_items(Path(arg))
    return _torchvision_items(kind, Path(arg), split)


def _pair_items(arg: str) -> list[FlowItem]:
    parts = [p for p in arg.split(",") if p]
    if len(parts) not in (2, 3):
        raise FlowDataError(f"pair:{arg}: expected pair:IMAGE1,IMAGE2[,GT_FLOW] (2 or 3 comma-separated paths)")
    paths = [Path(p) for p in parts]
    for p in paths:
        if not p.is_file():
            raise FlowDataError(f"pair:{arg}: file {p} does not exist")
    return [FlowItem(paths[0], paths[1], paths[2] if len(paths) == 3 else None, paths[0].stem)]


def _folder_items(folder: Path) -> list[FlowItem]:
    if not folder.is_dir():
        raise FlowDataError(f"pairs:{folder}: folder does not exist (expected <name>_img1.*, <name>_img2.* "
                            f"and optional <name>_flow.flo files)")
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    firsts = sorted(p for name, p in files.items()
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem.endswith("_img1"))
    if not firsts:
        raise FlowDataError(f"pairs:{folder}: no <name>_img1.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}> files "
                            f"(expected <name>_img1.*, <name>_img2.* and optional <name>_flow.flo triples)")
    items = []
    for first in firsts:
        stem = first.stem[: -len("_img1")]
        second = next((files[stem + "_img2" + e] for e in _case_variants(IMAGE_EXTENSIONS)
                       if stem + "_img2" + e in files), None)
        if second is None:
            raise FlowDataError(f"pairs:{folder}: {first.name} has no partner {stem}_img2.<ext>")
        flow = next((files[stem + "_flow" + e] for e in _case_variants(FLOW_EXTENSIONS)
                     if stem + "_flow" + e in files), None)
        items.append(FlowItem(first, second, flow, stem))
    with_gt = [it for it in items if it.flow is not None]
    if with_gt and len(with_gt) != len(items):
        missing = next(it for it in items if it.flow is None)
        raise FlowDataError(f"pairs:{folder}: {len(with_gt)} of {len(items)} pairs have ground truth; "
                            f"{missing.id}_flow.flo is missing (give all pairs a flow or none)")
    return items


def _case_variants(exts: tuple[str, ...]) -> list[str]:
    return [v for e in exts for v in (e, e.upper())]


def _torchvision_items(kind: str, folder: Path, split: str) -> list[FlowItem]:
    from torchvision import datasets

    info = _TORCHVISION_KINDS[kind]
    spec = f"{kind}:{folder}"
    if split not in info["splits"]:
        raise FlowDataError(f"{spec}: this dataset has no '{split}' split (it has {sorted(info['splits'])})")
    if not folder.is_dir():
        raise FlowDataError(f"{spec}: folder does not exist (expected {info['layout']})")
    tv_split = info["splits"][split]
    builders: dict[str, Callable] = {
        "chairs": lambda r: datasets.FlyingChairs(r, split=tv_split),
        "sintel-clean": lambda r: datasets.Sintel(r, split=tv_split, pass_name="clean"),
        "sintel-final": lambda r: datasets.Sintel(r, split=tv_split, pass_name="final"),
        "kitti": lambda r: datasets.KittiFlow(r, split=tv_split),
        "things": lambda r: datasets.FlyingThings3D(r, split=tv_split, pass_name="clean", camera="left"),
        "hd1k": lambda r: datasets.HD1K(r, split=tv_split),
    }
    # torchvision wants the parent of <folder name>; accept the dataset folder itself through a link
    link_dir = None
    dataset_dir = folder / info["folder"]
    if dataset_dir.is_dir():
        root = folder
    elif (folder / info["marker"]).exists():
        dataset_dir = folder
        link_dir = Path(tempfile.mkdtemp(prefix="visiontrain_flow_"))
        os.symlink(folder.resolve(), link_dir / info["folder"])
        root = link_dir
    else:
        raise FlowDataError(f"{spec}: neither {folder / info['folder']} nor {folder / info['marker']} exists "
                            f"(expected {info['layout']})")
    try:
        tv_dataset = builders[kind](str(root))
    except (FileNotFoundError, NotADirectoryError, OSError, IndexError, ValueError) as e:
        detail = _chairs_counts(dataset_dir) if kind == "chairs" else f"{type(e).__name__}: {e}"
        raise FlowDataError(f"{spec}: cannot list the {split} split ({detail}); "
                            f"expected {info['layout']}") from None
    finally:
        if link_dir is not None:
            shutil.rmtree(link_dir, ignore_errors=True)
    images, flows = tv_dataset._image_list, tv_dataset._flow_list  # the lists torchvision built
    if not images:
        raise FlowDataError(f"{spec}: the {split} split is empty (expected {info['layout']})")
    if len(flows) != len(images):
        raise FlowDataError(f"{spec}: {len(images)} image pairs but {len(flows)} flow files (expected {info['layout']})")
    base = str(root / info["folder"])
    real = dataset_dir.resolve() if link_dir is not None else dataset_dir

    def fix(p: str) -> Path:
        return real / os.path.relpath(p, base)

    items = []
    for (a, b), f in zip(images, flows):
        item = FlowItem(fix(a), fix(b), fix(f), os.path.relpath(a, base))
        if kind == "chairs":
            _check_chairs_names(spec, item)
        items.append(item)
    return items


def _chairs_counts(folder: Path) -> str:
    ppm = len(list((folder / "data").glob("*.ppm")))
    flo = len(list((folder / "data").glob("*.flo")))
    split_file = folder / "FlyingChairs_train_val.txt"
    lines = len(split_file.read_text().split()) if split_file.is_file() else 0
    return (f"{ppm} .ppm images, {flo} .flo flows, {lines} lines in {split_file.name}; "
            f"every flow needs two images and one line")


def _check_chairs_names(spec: str, item: FlowItem) -> None:
    """FlyingChairs pairs files by sorted position; make sure the names agree (NNNNN_img1/img2/flow)."""
    stem = item.image1.name.rsplit("_", 1)[0]
    if (item.image2.name.rsplit("_", 1)[0] != stem or item.flow is None
            or item.flow.name.rsplit("_", 1)[0] != stem):
        raise FlowDataError(f"{spec}: files out of step: {item.image1.name}, {item.image2.name}, "
                            f"{item.flow.name if item.flow else None} (every NNNNN needs _img1.ppm, _img2.ppm "
                            f"and _flow.flo)")


# ------------------------------------------------------------------------------------------ dataset
class FlowDataset(torch.utils.data.Dataset):
    """Reads :class:`FlowItem` files, optionally augments them, and returns sample dicts.

    ``augment(sample_np, rng)`` gets NumPy ``[H, W, C]`` arrays and a generator from
    ``sample_rng(seed, epoch, index)``; the engine calls :meth:`set_epoch`."""

    def __init__(self, items: list[FlowItem], name: str = "", augment: Callable | None = None, seed: int = 0):
        self.items = items
        self.name = name
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_flow(self) -> bool:
        return bool(self.items) and self.items[0].flow is not None

    def load(self, index: int) -> dict:
        """The raw sample as NumPy arrays (``[H, W, 3]``, ``[H, W, 2]``, ``[H, W]``)."""
        item = self.items[index]
        image1, image2 = read_image(item.image1), read_image(item.image2)
        if image1.shape != image2.shape:
            raise FlowDataError(f"{item.image1} is {format_size(*image1.shape[:2])} (H×W) but {item.image2} is "
                                f"{format_size(*image2.shape[:2])}; both images of a pair need the same size")
        flow = valid = None
        if item.flow is not None:
            flow, valid = read_flow(item.flow)
            if flow.shape[:2] != image1.shape[:2]:
                raise FlowDataError(f"{item.flow} is {format_size(*flow.shape[:2])} (H×W) but {item.image1} is "
                                    f"{format_size(*image1.shape[:2])}; a flow file needs its image's size")
            valid = valid & (np.abs(flow) < MAX_VALID_FLOW).all(-1)
        return {"image1": image1, "image2": image2, "flow": flow, "valid": valid, "id": item.id}

    def __getitem__(self, index: int) -> dict:
        sample = self.load(index)
        if self.augment is not None:
            sample = self.augment(sample, sample_rng(self.seed, self.epoch, index))
        return to_tensors(sample)


def to_tensors(sample: dict) -> dict:
    """NumPy ``[H, W, C]`` sample -> torch ``[C, H, W]`` sample dict."""
    def chw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))

    flow, valid = sample.get("flow"), sample.get("valid")
    return {
        "image1": chw(sample["image1"]),
        "image2": chw(sample["image2"]),
        "flow": None if flow is None else chw(flow),
        "valid": None if valid is None else torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)),
        "id": sample.get("id", ""),
    }


def open_flow_dataset(spec: str, split: str = "train", augment: Callable | None = None, seed: int = 0) -> FlowDataset:
    """The dataset named by ``spec`` (see the module doc), ``split`` ``train`` or ``val``."""
    return FlowDataset(list_flow_items(spec, split), name=spec, augment=augment, seed=seed)


# ------------------------------------------------------------------------------------------ collate
def collate_flow(samples: list[dict], pad: bool = False) -> dict:
    """Stack sample dicts into a batch ``{image1 [B, 3, H, W], image2, flow [B, 2, H, W] | None,
    valid [B, H, W] | None, id: list[str], sizes: list[(h, w)]}``.

    Samples must have equal sizes (training crops guarantee it) unless ``pad=True``: then every sample
    is padded at the bottom/right to the largest size, images by edge replication, flow with 0 and
    ``valid`` False, and ``sizes`` keeps the original sizes. Padding changes what the network sees near
    the padded border; evaluate with batch size 1 for exact per-image numbers on mixed-size data."""
    if not samples:
        raise ValueError("collate_flow: empty batch")
    sizes = [tuple(s["image1"].shape[-2:]) for s in samples]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if len(set(sizes)) > 1 and not pad:
        shown = ", ".join(format_size(*hw) for hw in sorted(set(sizes)))
        raise FlowDataError(f"collate_flow: samples of different sizes ({shown}, H×W) in one batch; set a "
                            f"training crop (crop=HxW) or use batch size 1 / padding for evaluation")
    has_flow = [s["flow"] is not None for s in samples]
    if any(has_flow) and not all(has_flow):
        raise FlowDataError("collate_flow: some samples have ground-truth flow and some do not")

    def padded(t: torch.Tensor, value: float | None) -> torch.Tensor:
        dh, dw = height - t.shape[-2], width - t.shape[-1]
        if dh == 0 and dw == 0:
            return t
        if value is None:  # replicate
            return torch.nn.functional.pad(t[None], (0, dw, 0, dh), mode="replicate")[0]
        return torch.nn.functional.pad(t, (0, dw, 0, dh), value=value)

    batch = {
        "image1": torch.stack([padded(s["image1"], None) for s in samples]),
        "image2": torch.stack([padded(s["image2"], None) for s in samples]),
        "flow": None,
        "valid": None,
        "id": [s.get("id", "") for s in samples],
        "sizes": sizes,
    }
    if all(has_flow):
        batch["flow"] = torch.stack([padded(s["flow"], 0.0) for s in samples])
        valids = [s["valid"] if s["valid"] is not None else torch.ones(s["flow"].shape[-2:], dtype=torch.bool)
                  for s in samples]
        batch["valid"] = torch.stack([padded(v, False) for v in valids])
    return batch
