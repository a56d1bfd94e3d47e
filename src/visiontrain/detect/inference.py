"""The one way to load a trained detector from any accepted file, and to run it on images.

Accepted files (:data:`~visiontrain.detect.config.WEIGHT_FILES`):

* our checkpoint (``best.pt`` / ``last.pt``: EMA weights when present, a distilled student's adapters
  dropped, class names and training image size from it);
* an Ultralytics ``.pt``, read by the restricted unpickler (:mod:`visiontrain.detect.unpickle`): no pickled
  code runs and ultralytics is never imported;
* a plain state dict (our keys or Ultralytics', ``module.`` prefixes allowed);
* an ``.onnx`` export, for ``predict`` and ``eval`` (:class:`visiontrain.detect.export.OnnxDetector`).

Every user of weights goes through here: ``eval``, ``predict`` and ``export`` (:func:`load_detector`), the
distillation teacher (:func:`build_detector`), ``weights=`` of a training run (:func:`load_weights_into`,
which grows the class branch by name and can load the backbone only) and class-name lookup
(:func:`weights_class_names`). A file of the wrong kind (say, a flow checkpoint) gets one message:
``X is a flow checkpoint (from `visiontrain train flow`); detect needs …``.
"""

from __future__ import annotations

import logging
import pickle
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.config import ConfigError
from visiontrain.detect.augment import letterbox
from visiontrain.detect.config import WEIGHT_FILES
from visiontrain.detect.data import read_image
from visiontrain.detect.distill import expand_classes
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.postprocess import postprocess
from visiontrain.detect.unpickle import restricted_pickle_module
from visiontrain.detect.weights import (
    ADAPTERS,
    CheckpointWeights,
    checkpoint_weights,
    infer_architecture,
    load_state_into,
)
from visiontrain.engine.checkpoint import CheckpointError

#: what may initialise a training run, teach a student or be exported (no ONNX)
TORCH_WEIGHT_FILES = "a detect checkpoint, an Ultralytics .pt or a state dict"
log = logging.getLogger(__name__)


# ---- reading ----------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    """``torch.load`` safely: ``weights_only=True`` first, the restricted unpickler if that refuses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # pickled objects (an Ultralytics model): retry with inert stubs below
    except Exception as e:
        raise _not_a_checkpoint(path, e) from e
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle_module(str(path)),
                          weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise _not_a_checkpoint(path, e) from e


def _not_a_checkpoint(path: Path, e: Exception) -> CheckpointError:
    kind = "zip" if zipfile.is_zipfile(path) else "non-zip"
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({kind} file; {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})")


def read_weights(path: str | Path, needs: str = TORCH_WEIGHT_FILES) -> CheckpointWeights:
    """The weights in a PyTorch file of any accepted kind, with our key names (see the module docstring).
    ``needs`` names what the caller accepts, for the message about a file of the wrong kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".onnx":
        raise CheckpointError(f"{path} is an ONNX export (predict and eval run it); this needs {needs}, e.g. the "
                              f"checkpoint it was exported from")
    return checkpoint_weights(_torch_load(path), path, needs)


def weights_class_names(path: str | Path) -> list[str] | None:
    """The class names a weights file declares (our checkpoint, an Ultralytics .pt), ``None`` for a state dict."""
    return read_weights(path).names


def _detector_from(weights: CheckpointWeights, path: str | Path) -> YOLOv8:
    """A YOLOv8 of the weights' own architecture holding them (names set when the file has them)."""
    arch = infer_architecture(weights.state, path)
    names = weights.names if weights.names is not None and len(weights.names) == arch.nc else None
    model = model_class(arch)(arch.scale, nc=arch.nc, reg_max=arch.reg_max, names=names)
    load_state_into(model, weights, arch, path)
    return model


def model_class(arch) -> type[YOLOv8]:
    """:class:`YOLOv8` or, for an oriented-box checkpoint, :class:`~visiontrain.detect.obb.model.YOLOv8OBB`."""
    if getattr(arch, "obb", False):
        from visiontrain.detect.obb.model import YOLOv8OBB

        return YOLOv8OBB
    return YOLOv8


def build_detector(path: str | Path, needs: str = TORCH_WEIGHT_FILES) -> YOLOv8:
    """The YOLOv8 stored in ``path`` (scale and classes from the tensors, names from the file), float32, eval."""
    return _detector_from(read_weights(path, needs), path).eval()


def load_ultralytics(path: str | Path, nc: int | None = None, backbone_only: bool = False,
                     model: YOLOv8 | None = None) -> YOLOv8:
    """A YOLOv8 with the weights of ``path`` (any accepted PyTorch file; the name is historical); a
    :class:`~visiontrain.detect.obb.model.YOLOv8OBB` when the file holds an oriented-box (OBB) model.

    ``nc``: classes of the returned model (default: the file's, or ``model.nc`` when ``model`` is given); a
    different nc re-initialises the class branch and warns (:class:`~visiontrain.detect.weights.ClassBranchResetWarning`).
    ``backbone_only``: load only ``backbone.*``; neck and head keep their fresh initialisation.
    ``model``: load into this model instead of building one (its scale must match the file's)."""
    weights = read_weights(path)
    arch = infer_architecture(weights.state, path)
    if model is None:  # a YOLOv8OBB for an Ultralytics OBBModel
        model = model_class(arch)(arch.scale, nc=nc if nc is not None else arch.nc, reg_max=arch.reg_max)
    elif nc is not None and nc != model.nc:
        model.head.reset_class_branch(nc)
    load_state_into(model, weights, arch, path, backbone_only)
    if weights.names is not None and len(weights.names) == model.nc and not backbone_only:
        model.names = weights.names
    return model


def load_weights_into(model: YOLOv8, path: str | Path, names: Sequence[str], backbone_only: bool = False) -> None:
    """``weights=`` of a training run: load ``path`` into the freshly built ``model`` (classes ``names``).

    Weights whose class names are a strict subset of ``names`` are **grown by name**
    (:func:`~visiontrain.detect.distill.expand_classes`): their classes keep their rows, the others start
    fresh (fine-tuning from a teacher). Other class lists re-initialise the class branch (with a warning);
    ``backbone_only`` loads the backbone only. The model's ``distill_adapters`` keep their initialisation."""
    names = [str(n) for n in names]
    weights = read_weights(path)
    arch = infer_architecture(weights.state, path)
    adapters = model._modules.pop(ADAPTERS, None)  # not part of the detector's weights
    try:
        known = weights.names if weights.names is not None and len(weights.names) == arch.nc else None
        if known is not None and not backbone_only and known != names and set(known) < set(names):
            grown = expand_classes(_detector_from(weights, path), names, known)
            weights = replace(weights, state=grown.state_dict(), names=names)
            arch = replace(arch, nc=len(names))
            log.info("%s: loaded with the class branch grown from %d to %d classes (%s kept by name)",
                     path, len(known), len(names), ", ".join(known))
        load_state_into(model, weights, arch, path, backbone_only)
    finally:
        if adapters is not None:
            model._modules[ADAPTERS] = adapters


# ---- a detector for eval, predict and export ---------------------------------------------------


@dataclass
class Detector:
    """A callable ``images [B, 3, S, S] -> [B, 4 + nc, A]`` (``[B, 4 + nc + 1, A]`` with the angle for an
    oriented-box model, ``obb``) with its class names and input size ``S``."""

    model: Any
    names: list[str]
    imgsz: int
    kind: str  # "torch" | "onnx"
    obb: bool = False

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()


def load_detector(path: str | Path, device: str = "cpu", imgsz: int = 0, needs: str = WEIGHT_FILES) -> Detector:
    """Any accepted file, ready to run: fused, eval mode, on ``device``. ``imgsz`` 0 = the file's (our
    checkpoint's training size, an export's input size, else 640)."""
    p = Path(path)
    if p.suffix == ".onnx":
        from visiontrain.detect.export import OnnxDetector

        if not p.is_file():
            raise CheckpointError(f"{p}: weights file not found")
        d = OnnxDetector(p)
        if imgsz and imgsz != d.imgsz[0]:
            raise ConfigError(f"{p} was exported for {d.imgsz[0]}×{d.imgsz[1]} inputs; drop imgsz= or re-export")
        return Detector(d, d.names, d.imgsz[0], "onnx", obb=d.obb)
    weights = read_weights(p, needs)
    model = _detector_from(weights, p)
    names = list(model.names) if model.names else [str(i) for i in range(model.nc)]
    return Detector(model.to(device).prepare_for_inference(), names, imgsz or weights.imgsz or 640, "torch",
                    obb=hasattr(model.head, "cv4"))


# ---- running it ---------------------------------------------------------------------------------


def preprocess_image(image_bgr: np.ndarray, imgsz: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """One BGR ``[H, W, 3]`` image as the model sees it: ``[3, S, S]`` float in [0, 1] (RGB) and its meta
    (``orig_size (h, w)``, ``ratio (rx, ry)``, ``pad (px, py)``)."""
    img, ratio, pad = letterbox(image_bgr, imgsz)
    t = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float().div_(255)
    return t, {"orig_size": image_bgr.shape[:2], "ratio": ratio, "pad": pad}


def boxes_to_original(boxes: np.ndarray | torch.Tensor, ratio: tuple[float, float], pad: tuple[float, float],
                      orig_size: tuple[int, int] | None = None) -> np.ndarray | torch.Tensor:
    """Map ``[n, >=4]`` xyxy boxes from letterboxed to original pixels: ``x = (x' - pad_x) / rx``.

    Columns past 4 (score, class) are kept; with ``orig_size = (h, w)`` boxes are clipped to it."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / ratio[0]
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / ratio[1]
    if orig_size is not None:
        h, w = orig_size
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def predict_paths(det: Detector, paths: dict[str, str], batch_size: int, conf: float, iou: float, max_det: int,
                  device: str, keep_images: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``det`` over ``{image_id: path}``: ``({image_id: [n, 6] (x1, y1, x2, y2, score, cls)}`` in original
    pixels — ``[n, 7] (cx, cy, w, h, angle, score, cls)`` for an oriented-box detector — and ``{image_id: BGR
    image}`` when ``keep_images``)."""
    from tqdm import tqdm

    out: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    ids = list(paths)
    for i in tqdm(range(0, len(ids), batch_size), desc="predict", unit="batch", disable=not sys.stderr.isatty()):
        chunk = ids[i:i + batch_size]
        tensors, metas = [], []
        for image_id in chunk:
            img = read_image(paths[image_id])
            t, meta = preprocess_image(img, det.imgsz)
            tensors.append(t)
            metas.append(meta)
            if keep_images:
                images[image_id] = img
        batch = torch.stack(tensors)
        raw = det(batch.to(device) if det.kind == "torch" else batch)
        if det.obb:
            from visiontrain.detect.obb.evaluation import rboxes_to_original
            from visiontrain.detect.obb.nms import postprocess_obb

            for image_id, d, meta in zip(chunk, postprocess_obb(raw, conf=conf, iou=iou, max_det=max_det), metas):
                out[image_id] = rboxes_to_original(d.cpu().numpy(), meta["ratio"], meta["pad"])
            continue
        for image_id, d, meta in zip(chunk, postprocess(raw, conf=conf, iou=iou, max_det=max_det), metas):
            out[image_id] = boxes_to_original(d.cpu(), meta["ratio"], meta["pad"], meta["orig_size"]).numpy()
    return out, images
