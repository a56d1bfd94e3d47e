"""Folders of equirectangular panoramas → samples of four fisheye views and the panorama to generate.

A sample is a dict:

* ``views [4, 3, s, s]`` float32 in [−1, 1]: front, right, back, left (see :mod:`.camera`), rendered from
  the source image;
* ``panorama [3, H, 2H]`` float32 in [−1, 1]: the target;
* ``cameras [4, 5]`` float32 rows ``(xi, f, yaw, pitch, roll)`` the views were rendered with (the model
  needs them to place what each view sees on the sphere);
* ``index`` int64.

**Cameras.** Evaluation uses fixed cameras: ``xi = 0.85``, ``f = 220 px`` *for 128-pixel views*, zero
pitch/roll. ``f`` scales with the view size (``f = focal · size / 128``) so the field of view stays the same
when the views are made smaller or larger. Training jitters each view independently with
``sample_rng(seed, epoch, index)``: ``xi × U(1 ± 0.4)``, ``f × U(1 ± 0.1)``, yaw / pitch / roll ``± 5°``, and
augments the panorama (random rotation about the vertical axis, left-right mirror); views are rendered
after the augmentation, so they stay consistent with the target.

**Where views are rendered.** Here, per sample on the CPU, from the source image at up to
``4 × view size`` rows (a 128-pixel view resolves ~0.5° per pixel at its centre, finer than a 64-row
target panorama's 2.8°). Rendering on the batch in the task would only have the downsampled target to
sample from (collating full-resolution sources of different sizes is not possible without resizing them
anyway), giving blurred views; per-sample rendering costs ~1 ms per sample and runs in DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from visiontrain.engine.task import sample_rng, stable_hash
from visiontrain.filecheck import check_files, check_image_file, check_image_files, format_bad_files
from visiontrain.panorama.camera import VIEW_YAWS, render_views
from visiontrain.panorama.synthetic import ensure_synthetic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
REFERENCE_VIEW_SIZE = 128


class PanoramaDataError(ValueError):
    """A panorama file or folder cannot be used; the message names it and says what to do."""


@dataclass
class CameraSpec:
    """The evaluation camera and the training jitter around it."""

    xi: float = 0.85
    focal: float = 220.0  # pixels at REFERENCE_VIEW_SIZE; scaled with the view size
    view_size: int = 128
    jitter_xi: float = 0.4  # relative, xi × U(1 − j, 1 + j)
    jitter_focal: float = 0.1  # relative
    jitter_rotation_deg: float = 5.0  # yaw, pitch and roll of each view, ± degrees

    @property
    def f(self) -> float:
        """Focal length in pixels at ``view_size``."""
        return self.focal * self.view_size / REFERENCE_VIEW_SIZE

    def fixed(self) -> np.ndarray:
        """The four evaluation cameras ``[4, 5]``."""
        return np.array([[self.xi, self.f, yaw, 0.0, 0.0] for yaw in VIEW_YAWS], dtype=np.float64)

    def jittered(self, rng: np.random.Generator) -> np.ndarray:
        """Four training cameras ``[4, 5]``, each view jittered independently."""
        cams = self.fixed()
        cams[:, 0] *= rng.uniform(1 - self.jitter_xi, 1 + self.jitter_xi, 4)
        cams[:, 1] *= rng.uniform(1 - self.jitter_focal, 1 + self.jitter_focal, 4)
        cams[:, 2:] += np.deg2rad(rng.uniform(-self.jitter_rotation_deg, self.jitter_rotation_deg, (4, 3)))
        return cams


def list_panoramas(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted). Raises :class:`PanoramaDataError` when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PanoramaDataError(f"{folder}: no such folder of panoramas")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PanoramaDataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return paths


def split_panoramas(folder: str | Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """``(train, val)`` image lists: ``folder/train`` and ``folder/val`` when both exist, else the images in
    ``folder`` split by a stable hash of the file name (``val_fraction`` of them to val)."""
    folder = Path(folder)
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        return list_panoramas(folder / "train"), list_panoramas(folder / "val")
    paths = list_panoramas(folder)
    if not 0 < val_fraction < 1:
        raise PanoramaDataError(f"{folder}: has no train/ and val/ subfolders, so val_fraction must be in (0, 1) "
                                f"to split it (got {val_fraction})")
    is_val = [(stable_hash("panorama-split", p.name) % 10_000) < val_fraction * 10_000 for p in paths]
    train = [p for p, v in zip(paths, is_val) if not v]
    val = [p for p, v in zip(paths, is_val) if v]
    if not train or not val:
        raise PanoramaDataError(f"{folder}: {len(paths)} images are too few to split with val_fraction="
                                f"{val_fraction}; add images or make train/ and val/ subfolders")
    return train, val


def data_root(cfg: Any) -> Path:
    """The folder of panoramas a train or eval config names: ``data``, or, when it is empty, the synthetic set
    its ``synth_*`` keys describe (written once, :func:`.synthetic.ensure_synthetic`)."""
    return Path(cfg.data) if cfg.data else ensure_synthetic(cfg)


def config_images(cfg: Any) -> tuple[list[Path], list[Path]]:
    """``(train, val)`` image lists of :func:`data_root` (:func:`split_panoramas` by ``val_fraction``), val cut
    to the first ``eval_images`` when that is > 0. The files are not checked here."""
    train, val = split_panoramas(data_root(cfg), cfg.val_fraction)
    return train, (val[: cfg.eval_images] if cfg.eval_images > 0 else val)


FIX = "Replace them with complete 2:1 images, or remove them."


def _panorama_problem(path: str | Path, tolerance: float = 0.02) -> tuple[str | None, tuple[int, int]]:
    """``(problem or None, (height, width))``: the file must be a complete image
    (:func:`visiontrain.filecheck.check_image_file`: header, end marker or length, a full decode only
    where needed) with a 2:1 aspect ratio (within ``tolerance``)."""
    problem = check_image_file(path)
    if problem is not None:
        return problem, (0, 0)
    with Image.open(path) as im:
        width, height = im.size
    if height < 2 or abs(width / height - 2.0) > 2.0 * tolerance:
        return (f"{width}×{height} is not an equirectangular panorama (width must be 2 × height); crop or pad "
                f"it to 2:1"), (height, width)
    return None, (height, width)


def check_panorama_file(path: Path, tolerance: float = 0.02) -> tuple[int, int]:
    """``(height, width)`` from the file header; errors name the file when it is unreadable, damaged
    (truncated, empty) or not 2:1."""
    problem, size = _panorama_problem(path, tolerance)
    if problem is not None:
        raise PanoramaDataError(f"{path}: {problem}; remove it or replace it with a valid file")
    return size


def check_panorama_files(*splits: tuple[str, Sequence[Path]], tolerance: float = 0.02) -> None:
    """Check every file of each ``(title, paths)`` split and raise one :class:`PanoramaDataError` naming
    every unreadable, damaged or non-2:1 image (grouped under the titles; an empty title lists plainly)."""
    groups = [(title, check_files(paths, lambda p: _panorama_problem(p, tolerance)[0], desc="checking panoramas"))
              for title, paths in splits]
    if any(bad for _, bad in groups):
        raise PanoramaDataError(format_bad_files([], "panoramas", FIX, groups=groups))


def read_panorama(path: Path, max_height: int) -> np.ndarray:
    """RGB float32 ``[h, 2h, 3]`` in [−1, 1] with ``h = min(file height, max_height)`` (area downsampling)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise PanoramaDataError(f"{path}: cannot be decoded (truncated or not an image); remove or replace it")
    h = min(bgr.shape[0], max_height)
    if bgr.shape[:2] != (h, 2 * h):
        bgr = cv2.resize(bgr, (2 * h, h), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb.astype(np.float32) / 127.5 - 1.0


class PanoramaDataset(torch.utils.data.Dataset):
    """Equirectangular images → ``{views, panorama, cameras, index}`` (see the module docstring).

    Args:
        paths: 2:1 images; all are checked here (header, completeness, aspect), so a bad file fails before
            training, in one error naming every bad one (``check=False``: the caller checked them).
        pano_size: target height ``H`` (width ``2H``).
        camera: evaluation camera and jitter.
        train: jitter cameras and augment; otherwise fixed cameras, no augmentation.
        seed: base of ``sample_rng(seed, epoch, index)``.
    """

    def __init__(self, paths: list[Path], pano_size: int, camera: CameraSpec, train: bool, seed: int = 0,
                 augment_yaw: bool = True, augment_flip: bool = True, check: bool = True):
        if pano_size < 8 or pano_size % 8:
            raise PanoramaDataError(f"pano_size={pano_size}: use a multiple of 8 (the model works at 1/8 scale)")
        self.paths = [Path(p) for p in paths]
        if check:
            check_panorama_files(("", self.paths))
        self.pano_size = pano_size
        self.camera = camera
        self.train = train
        self.seed = seed
        self.augment_yaw = augment_yaw
        self.augment_flip = augment_flip
        self.epoch = 0
        self.render_height = max(pano_size, 4 * camera.view_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        src = read_panorama(self.paths[index], self.render_height)  # [h, 2h, 3]
        if self.train:
            rng = sample_rng(self.seed, self.epoch, index)
            if self.augment_flip and rng.uniform() < 0.5:
                src = src[:, ::-1]  # lon → −lon: still a valid panorama
            if self.augment_yaw:
                src = np.roll(src, int(rng.integers(src.shape[1])), axis=1)  # turn the world about the vertical
            cams = self.camera.jittered(rng)
        else:
            cams = self.camera.fixed()
        src_t = torch.from_numpy(np.ascontiguousarray(src)).permute(2, 0, 1)[None]  # [1, 3, h, 2h]
        cams_t = torch.from_numpy(cams).float()
        views, _ = render_views(src_t, cams_t[None], self.camera.view_size)
        h = self.pano_size
        if src.shape[0] != h:
            interp = cv2.INTER_AREA if src.shape[0] > h else cv2.INTER_LINEAR
            src = cv2.resize(src, (2 * h, h), interpolation=interp)
        pano = torch.from_numpy(np.ascontiguousarray(src)).permute(2, 0, 1)
        return {"views": views[0].clamp(-1, 1), "panorama": pano.clamp(-1, 1), "cameras": cams_t,
                "index": torch.tensor(index)}


def read_view_images(paths: list[str | Path], size: int) -> torch.Tensor:
    """Four square view images (front, right, back, left) → ``[4, 3, size, size]`` in [−1, 1]."""
    if len(paths) != 4:
        raise PanoramaDataError(f"views: expected 4 images (front,right,back,left), got {len(paths)}: {paths}")
    bad = check_image_files(paths)
    if bad:
        raise PanoramaDataError(format_bad_files(bad, "view images", "Replace them with complete images."))
    out = []
    for p in paths:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise PanoramaDataError(f"{p}: cannot be read as an image")
        if abs(bgr.shape[0] - bgr.shape[1]) > 1:
            raise PanoramaDataError(f"{p}: {bgr.shape[1]}×{bgr.shape[0]} is not a square fisheye view")
        if bgr.shape[0] != size:
            interp = cv2.INTER_AREA if bgr.shape[0] > size else cv2.INTER_LINEAR
            bgr = cv2.resize(bgr, (size, size), interpolation=interp)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(rgb).permute(2, 0, 1))
    return torch.stack(out)
