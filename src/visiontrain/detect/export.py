"""ONNX export of a YOLOv8 (fused, eval) and an ONNX Runtime detector with the same output.

The graph takes ``images [B, 3, H, W]`` (float32, 0..1, ``H, W`` fixed at export, ``B`` dynamic by default)
and returns ``predictions [B, 4 + nc, A]`` (xywh in input pixels, class probabilities), exactly what the
PyTorch model returns in eval mode. Class names, strides and the image size are stored in the ONNX
metadata so :class:`OnnxDetector` (and ``predict`` on an ``.onnx`` file) can use them.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which still ships with
torch 2.14 and exports this convolutional graph in a couple of seconds with a plain ``dynamic_axes``
batch dimension; the dynamo exporter also works (``dynamo=True``, opset >= 18, same outputs) but takes
about ten times longer on a small CPU.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.detect.model import YOLOv8
from visiontrain.engine.runtime import dynamo_exporter_missing

DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18


class ExportError(ValueError):
    """An export request that cannot be satisfied (bad image size, unreadable ONNX file, wrong input)."""


def _check_imgsz(imgsz: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ExportError(f"export image size must be positive multiples of 32, got {h}x{w}")
    return int(h), int(w)


def export_onnx(
    model: YOLOv8,
    path: str | Path,
    imgsz: int | tuple[int, int] = (640, 640),
    dynamic_batch: bool = True,
    opset: int | None = None,
    dynamo: bool = False,
) -> Path:
    """Write ``model`` (copied, fused, eval, float32, CPU) to ``path`` as ONNX. Returns the path.

    Input ``images [B, 3, H, W]``, output ``predictions [B, 4 + nc, A]``; ``B`` is symbolic when
    ``dynamic_batch``. The caller's model is not modified. ``opset`` defaults to 17 (TorchScript
    exporter) or 18 (``dynamo=True``, which needs >= 18: its down-conversion to 17 emits a ``Split``
    that ONNX Runtime rejects).
    """
    h, w = _check_imgsz(imgsz)
    if opset is None:
        opset = DYNAMO_MIN_OPSET if dynamo else DEFAULT_OPSET
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET}, got {opset}")
    if dynamo and (why := dynamo_exporter_missing()):
        raise ExportError(why)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).float().cpu().eval()
    if not net.fused:
        net.fuse()
    dummy = torch.zeros(1, 3, h, w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation / tracer chatter
        if dynamo:
            torch.onnx.export(
                net,
                (dummy,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=["images"],
                output_names=["predictions"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None,
                external_data=False,
            )
        else:
            torch.onnx.export(
                net,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=["images"],
                output_names=["predictions"],
                dynamic_axes={"images": {0: "batch"}, "predictions": {0: "batch"}} if dynamic_batch else None,
            )
    _write_metadata(path, net, (h, w))
    return path


def _write_metadata(path: Path, model: YOLOv8, imgsz: tuple[int, int]) -> None:
    import onnx

    proto = onnx.load(str(path))
    meta = {
        "visiontrain.task": "detect",
        "visiontrain.scale": model.scale,
        "visiontrain.nc": str(model.nc),
        "visiontrain.obb": "1" if hasattr(model.head, "cv4") else "0",  # output [B, 4 + nc + 1, A], angle last
        "visiontrain.stride": json.dumps([int(s) for s in model.stride.tolist()]),
        "visiontrain.imgsz": json.dumps(list(imgsz)),
        "visiontrain.names": json.dumps(
            model.names if model.names is not None else [str(i) for i in range(model.nc)]
        ),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


class OnnxDetector:
    """Runs an exported YOLOv8 with ONNX Runtime: ``images [B, 3, H, W] -> [B, 4 + nc, A]``.

    Accepts a float32 numpy array or a torch tensor and returns the same kind. ``nc``, ``names``,
    ``imgsz`` and ``stride`` come from the file's metadata.
    """

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(
                f"{self.path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})"
            ) from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("visiontrain.task") != "detect":
            raise ExportError(
                f"{self.path}: not a visiontrain detection export (metadata task={meta.get('visiontrain.task')!r})"
            )
        self.nc = int(meta["visiontrain.nc"])
        self.names: list[str] = json.loads(meta["visiontrain.names"])
        self.imgsz: tuple[int, int] = tuple(json.loads(meta["visiontrain.imgsz"]))  # type: ignore[assignment]
        self.stride: list[int] = json.loads(meta["visiontrain.stride"])
        self.obb = meta.get("visiontrain.obb") == "1"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.dynamic_batch = not isinstance(inp.shape[0], int)

    def __call__(self, images: Any) -> Any:
        as_torch = isinstance(images, torch.Tensor)
        x = images.detach().cpu().float().numpy() if as_torch else np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.imgsz:
            raise ExportError(
                f"{self.path}: expects images [B, 3, {self.imgsz[0]}, {self.imgsz[1]}], got {tuple(x.shape)}; "
                "letterbox to the export size"
            )
        if not self.dynamic_batch and x.shape[0] != 1:
            raise ExportError(f"{self.path}: exported with a fixed batch of 1, got a batch of {x.shape[0]}")
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})
        return torch.from_numpy(out) if as_torch else out
