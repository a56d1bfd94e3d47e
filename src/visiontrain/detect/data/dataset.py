"""The torch Dataset of a detection split, and its collate function.

:class:`DetectionDataset` serves ``(image uint8 [3, S, S] RGB, labels [n, 5] (cls, x1, y1, x2, y2) in
letterboxed pixels, meta)``; :func:`collate` batches them into ``images [B, 3, S, S]`` in [0, 1] and
``targets [N, 6] (batch_idx, cls, x1, y1, x2, y2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.detect.augment import augment_train, pad_to_square, resize_long_side, scale_labels
from visiontrain.detect.config import AugmentConfig
from visiontrain.detect.data.cache import CACHE_DIR
from visiontrain.detect.data.labels import DatasetError, LabelSet, read_image
from visiontrain.detect.data.load import load_labels
from visiontrain.engine.task import sample_rng


class DetectionDataset(torch.utils.data.Dataset):
    """Images and labels of one split, letterboxed to ``imgsz`` (and augmented when ``augment``).

    ``__getitem__`` returns ``(image [3, S, S] uint8 RGB, labels [n, 5] float32 (cls, x1, y1, x2, y2)
    in the S x S frame, meta)`` with meta ``image_id, path, orig_size (h, w), ratio (rx, ry),
    pad (px, py), mosaic``. For a mosaic sample, ratio/pad describe no single image (``mosaic=True``).
    Set ``dataset.mosaic = False`` to switch mosaic off (last epochs); the engine calls
    :meth:`set_epoch` so augmentation depends only on ``(seed, epoch, index)``."""

    def __init__(self, source: str | Path | LabelSet, split: str = "train", imgsz: int = 640, augment: bool = False,
                 hyp: AugmentConfig | None = None, seed: int = 0, class_names: Sequence[str] | None = None,
                 keep_classes: Sequence[str] | None = None, cache: bool = True, cache_images: bool = False,
                 obb: bool = False):
        if isinstance(source, LabelSet):
            self.labels = source.keep_classes(keep_classes) if keep_classes is not None else source
        else:
            self.labels = load_labels(source, split, class_names, keep_classes, cache, obb=obb)
        # oriented labels are [n, 9] (cls, x1, y1, …, x4, y4), transformed corner by corner
        self.obb = bool(obb)
        if self.obb and any(r.polygons is None for r in self.labels.records[:1]):
            raise DatasetError(f"{self.labels.source}: labels were read without oriented boxes (load with obb=True)")
        self.label_cols = 9 if self.obb else 5
        if len(self.labels) == 0:
            raise DatasetError(f"{self.labels.source}: split {split!r} has no images")
        if imgsz % 32:
            raise DatasetError(f"imgsz={imgsz} must be a multiple of 32 (the largest stride)")
        self.imgsz, self.augment, self.seed = int(imgsz), bool(augment), int(seed)
        self.hyp = hyp or AugmentConfig()
        self.mosaic = self.augment and self.hyp.mosaic > 0
        self.epoch = 0
        self._images: list[np.ndarray | None] | None = [None] * len(self.labels) if cache_images else None

    @property
    def class_names(self) -> list[str]:
        return self.labels.class_names

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def load_resized(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """Image ``index`` (BGR) with its longer side ``imgsz``, its ``[n, 5]`` labels scaled alike, ``(rx, ry)``."""
        rec = self.labels.records[index]
        img = self._images[index] if self._images is not None else None
        if img is None:
            raw = read_image(rec.path)
            if raw.shape[:2] != (rec.height, rec.width):
                raise DatasetError(f"{rec.path}: image is {raw.shape[1]}x{raw.shape[0]} but was indexed as "
                                   f"{rec.width}x{rec.height}; delete the {CACHE_DIR} folder to re-read labels")
            img, _ = resize_long_side(raw, self.imgsz, augment=self.augment)
            if self._images is not None:
                self._images[index] = img
        ratio = (img.shape[1] / rec.width, img.shape[0] / rec.height)
        geometry = rec.polygons.reshape(-1, 8) if self.obb else rec.boxes
        labels = np.concatenate([rec.classes[:, None].astype(np.float32), geometry], 1)
        return img, scale_labels(labels, ratio), ratio

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        rec = self.labels.records[index]
        img, labels, ratio = self.load_resized(index)
        meta: dict[str, Any] = {"image_id": rec.image_id, "path": rec.path, "orig_size": (rec.height, rec.width),
                                "ratio": ratio, "pad": (0.0, 0.0), "mosaic": False}
        if self.augment:
            rng = sample_rng(self.seed, self.epoch, index)
            use_mosaic = self.mosaic and rng.random() < self.hyp.mosaic
            images, labs = [img], [labels]
            if use_mosaic:
                for j in rng.integers(0, len(self), 3):
                    im_j, lab_j, _ = self.load_resized(int(j))
                    images.append(im_j)
                    labs.append(lab_j)
            else:
                meta["pad"] = ((self.imgsz - img.shape[1]) // 2, (self.imgsz - img.shape[0]) // 2)
            img, labels = augment_train(images, labs, self.imgsz, rng, self.hyp, use_mosaic)
            meta["mosaic"] = use_mosaic
        else:
            img, pad = pad_to_square(img, self.imgsz)
            labels = scale_labels(labels, (1.0, 1.0), pad)
            meta["pad"] = pad
        chw = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR -> RGB, HWC -> CHW
        return torch.from_numpy(chw), torch.from_numpy(labels.reshape(-1, self.label_cols).astype(np.float32)), meta


def collate_obb(samples: list[tuple[torch.Tensor, torch.Tensor, dict]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Oriented samples (labels ``[n, 9]`` corners) -> ``(images, targets [N, 7] (batch_idx, cls, cx, cy, w, h,
    angle), metas)``: each polygon becomes its minimum-area rectangle (canonical: ``w >= h``, angle in
    ``[-pi/4, 3pi/4)``), as Ultralytics does with ``cv2.minAreaRect``."""
    from visiontrain.detect.obb.geometry import corners_to_xywhr

    images, corners, metas = collate(samples)
    rbox = torch.from_numpy(corners_to_xywhr(corners[:, 2:10].double().numpy().reshape(-1, 4, 2))).float()
    return images, torch.cat([corners[:, :2], rbox.reshape(-1, 5)], 1), metas


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(images [B, 3, S, S] float in [0, 1], targets [N, 6] (batch_idx, cls, x1, y1, x2, y2), metas)``."""
    images = torch.stack([s[0] for s in samples]).float().div_(255)
    targets = [torch.cat([torch.full((len(s[1]), 1), float(i)), s[1]], 1) for i, s in enumerate(samples)]
    cols = samples[0][1].shape[1] + 1 if samples else 6
    return images, torch.cat(targets) if targets else torch.zeros(0, cols), [s[2] for s in samples]
