"""Unlabeled image pairs for unsupervised flow: consecutive frames of a folder or of a video, and the
pairs (of any dataset) fitted to the PWC model's input sizes.

- ``frames:DIR`` -> :class:`FramesDataset`: the images of ``DIR`` (png, jpg, jpeg, bmp, ppm, tif,
  tiff, webp) sorted *naturally* (``img2`` before ``img10``); pair ``i`` is ``(frame i, frame i + 1)``.
- ``video:FILE`` -> :class:`VideoDataset`: frames decoded once with OpenCV into memory (at most
  ``max_frames``, resized on the way if ``size`` is set), pair ``i`` is ``(frame i, frame i + step)``.

A sample is ``{"image1": [3, H, W] float32 in [0, 1], "image2": ..., "flow": None, "valid": None,
"id": str}``. ``default_collate`` cannot stack ``None``; use :func:`collate_pairs`. With
``size=(H, W)`` every frame is resized (area interpolation when shrinking, bilinear otherwise);
without it all frames must share one size, which is checked when the dataset is built.
:class:`UnlabeledPairs` drops the ground truth of any pair dataset and makes its sides multiples of 32.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from visiontrain.flow.models.pwc import PWC_MIN_SIZE, PWC_STRIDE
from visiontrain.flow.sizes import format_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class FramesError(ValueError):
    """An unusable folder of frames or video; the message names the file and the fix."""


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: ``img2 < img10``, ``a1b2 < a1b10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _resize(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    import cv2

    if size is None or image.shape[:2] == tuple(size):
        return image
    height, width = size
    shrinking = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or min(size) < 1:
        raise FramesError(f"size must be (height, width) with positive values, got {size}")
    return int(size[0]), int(size[1])


class FramesDataset(torch.utils.data.Dataset):
    """Consecutive-frame pairs of the images in ``root`` (natural sort). ``len = frames - 1``."""

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None):
        from PIL import Image

        self.root = Path(root)
        self.size = _check_size(size)
        if not self.root.is_dir():
            raise FramesError(f"frames:{root}: not a directory (give a folder of consecutive images)")
        files = [p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        self.files = sorted(files, key=lambda p: natural_key(p.name))
        if len(self.files) < 2:
            raise FramesError(
                f"frames:{root}: found {len(self.files)} image(s) with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                "need at least 2 consecutive frames"
            )
        if self.size is None:  # headers only: every frame must match the first one
            first = None
            for path in self.files:
                try:
                    with Image.open(path) as im:
                        dims = im.size
                except Exception as e:  # PIL raises several types (and libraries may patch Image.open)
                    raise FramesError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
                first = first or (path, dims)
                if dims != first[1]:
                    raise FramesError(
                        f"{path}: size {format_size(dims[1], dims[0])} (H×W) differs from {first[0].name} "
                        f"({format_size(first[1][1], first[1][0])}); pass size=(H, W) to resize all frames"
                    )

    def __len__(self) -> int:
        return len(self.files) - 1

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as an RGB uint8 array ``[H, W, 3]`` (resized if ``size`` is set)."""
        import cv2

        path = self.files[index]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FramesError(f"{path}: OpenCV could not decode this image; re-save it as PNG or JPEG")
        return _resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.size)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range 0..{len(self) - 1}")
        return {
            "image1": _to_tensor(self.read(index)),
            "image2": _to_tensor(self.read(index + 1)),
            "flow": None,
            "valid": None,
            "id": f"{self.files[index].stem}-{self.files[index + 1].stem}",
        }


class VideoDataset(torch.utils.data.Dataset):
    """Pairs ``(frame i, frame i + step)`` of a video decoded once into memory (``max_frames`` cap)."""

    def __init__(self, path: str | Path, size: tuple[int, int] | None = None, max_frames: int = 2000, step: int = 1):
        import cv2

        self.path = Path(path)
        self.size = _check_size(size)
        if step < 1:
            raise FramesError(f"video:{path}: step must be >= 1, got {step}")
        if max_frames < step + 1:
            raise FramesError(f"video:{path}: max_frames={max_frames} is too small for step={step}")
        self.step = step
        if not self.path.is_file():
            raise FramesError(f"video:{path}: file not found")
        capture = cv2.VideoCapture(str(self.path))
        frames = []
        try:
            if not capture.isOpened():
                raise FramesError(f"video:{path}: OpenCV cannot open this file (unknown container or codec); "
                                  "convert it, e.g. `ffmpeg -i IN -c:v mjpeg OUT.avi`, or extract frames to a folder")
            while len(frames) < max_frames:
                ok, bgr = capture.read()
                if not ok:
                    break
                rgb = _resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.size)
                if frames and rgb.shape != frames[0].shape:
                    raise FramesError(f"video:{path}: frame {len(frames)} is {format_size(*rgb.shape[:2])} (H×W), "
                                      f"frame 0 is {format_size(*frames[0].shape[:2])}; pass size=(H, W)")
                frames.append(rgb)
        finally:
            capture.release()
        if len(frames) < step + 1:
            raise FramesError(f"video:{path}: decoded {len(frames)} frame(s), need at least {step + 1}; "
                              "the file may be empty, truncated or use a codec OpenCV lacks")
        self.frames = np.stack(frames)  # [N, H, W, 3] uint8

    def __len__(self) -> int:
        return len(self.frames) - self.step

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range 0..{len(self) - 1}")
        return {
            "image1": _to_tensor(self.frames[index]),
            "image2": _to_tensor(self.frames[index + self.step]),
            "flow": None,
            "valid": None,
            "id": f"{self.path.stem}:{index:06d}",
        }


def unlabeled_dataset(spec: str, size: tuple[int, int] | None = None, max_frames: int = 2000) -> torch.utils.data.Dataset:
    """Build the dataset named by ``frames:DIR`` or ``video:FILE``."""
    kind, sep, location = spec.partition(":")
    if not sep or not location:
        raise FramesError(f"data={spec!r}: expected 'frames:DIR' or 'video:FILE'")
    if kind == "frames":
        return FramesDataset(location, size)
    if kind == "video":
        return VideoDataset(location, size, max_frames=max_frames)
    raise FramesError(f"data={spec!r}: unknown kind {kind!r}; expected 'frames:DIR' or 'video:FILE'")


def collate_pairs(samples: list[dict]) -> dict:
    """Stack samples: ``image1, image2 [B, 3, H, W]``; ``flow [B, 2, H, W]`` and ``valid [B, H, W]``
    only when every sample has them, else ``None``; ``id`` a list of strings."""
    batch = {
        "image1": torch.stack([s["image1"] for s in samples]),
        "image2": torch.stack([s["image2"] for s in samples]),
        "id": [s["id"] for s in samples],
    }
    for key in ("flow", "valid"):
        values = [s.get(key) for s in samples]
        batch[key] = torch.stack(values) if all(v is not None for v in values) else None
    return batch


class UnlabeledPairs(torch.utils.data.Dataset):
    """Image pairs of ``base`` with ground truth dropped and sides made multiples of 32 for PWC.

    ``size=(H, W)``: both images are resized to it (bilinear, antialiased; the user's ``unsup_size``).
    ``None``: both are centre-cropped to the largest multiples of 32; a pair smaller than 64 x 64 is an
    error (the flow task checks every file's size before step 1, so this is a last guard).
    Samples: ``{"image1", "image2": [3, H, W] in [0, 1], "flow": None, "valid": None, "id"}``."""

    def __init__(self, base: torch.utils.data.Dataset, size: tuple[int, int] | None = None):
        self.base = base
        self.size = size

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _fit(self, image: torch.Tensor, ident: str) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.size is not None:
            if (height, width) == self.size:
                return image
            return torch.nn.functional.interpolate(image[None], size=self.size, mode="bilinear",
                                                   align_corners=False, antialias=True)[0].clamp(0, 1)
        new_h, new_w = height // PWC_STRIDE * PWC_STRIDE, width // PWC_STRIDE * PWC_STRIDE
        if min(new_h, new_w) < PWC_MIN_SIZE:
            raise FramesError(f"pair {ident}: image size {format_size(height, width)} (H×W) is smaller than the "
                              f"{format_size(PWC_MIN_SIZE, PWC_MIN_SIZE)} the PWC model needs; use larger frames "
                              f"or unsup_size=HxW (multiples of 32) to resize")
        top, left = (height - new_h) // 2, (width - new_w) // 2
        return image[:, top:top + new_h, left:left + new_w]

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        ident = str(sample.get("id", index))
        return {"image1": self._fit(sample["image1"], ident), "image2": self._fit(sample["image2"], ident),
                "flow": None, "valid": None, "id": ident}
