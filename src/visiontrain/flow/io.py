"""Reading and writing optical flow files and images.

Formats:

* ``.flo`` (Middlebury): ``b"PIEH"`` (float32 202021.25 little-endian), int32 width, int32 height,
  then ``H * W * 2`` little-endian float32 ``(u, v)`` row-major. Values with ``|u|`` or ``|v|`` above
  ``1e9`` mean "unknown" and come back as invalid pixels.
* KITTI 16-bit PNG: three uint16 channels ``(u, v, valid)`` in RGB order, ``flow = (I - 2**15) / 64``.
  OpenCV reads and writes BGR, so the channel order is reversed here.
* ``.pfm`` (FlyingThings3D): ``PF`` (3 channels) or ``Pf`` (1 channel) header, width height, a scale whose
  sign gives the byte order, rows stored bottom to top.

Every reader returns ``flow [H, W, 2] float32`` and ``valid [H, W] bool`` and raises
:class:`FlowFileError` (a ``ValueError``) naming the file for wrong magic, truncated data or NaN values.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

FLO_MAGIC = 202021.25
UNKNOWN_FLOW_THRESHOLD = 1e9  # Middlebury: |u| or |v| above this means "unknown"
UNKNOWN_FLOW_VALUE = 1e10  # what write_flo stores for invalid pixels
IMAGE_EXTENSIONS = (".png", ".ppm", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FLOW_EXTENSIONS = (".flo", ".pfm", ".png")


class FlowFileError(ValueError):
    """A flow or image file cannot be read as what it claims to be; the message names the file."""


# --------------------------------------------------------------------------------------------- .flo
def read_flo(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Middlebury ``.flo`` file -> ``(flow [H, W, 2] float32, valid [H, W] bool)``.

    Unknown values (``|u|`` or ``|v|`` > 1e9) are invalid and set to 0 in ``flow``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FlowFileError(f"{path}: cannot read flow file ({e.strerror})") from None
    if len(raw) < 12:
        raise FlowFileError(f"{path}: truncated .flo file ({len(raw)} bytes, the header alone is 12)")
    magic = np.frombuffer(raw, "<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise FlowFileError(
            f"{path}: not a .flo file (magic {raw[:4]!r}, expected b'PIEH' = {FLO_MAGIC} little-endian)"
        )
    width, height = (int(v) for v in np.frombuffer(raw, "<i4", count=2, offset=4))
    if width <= 0 or height <= 0 or width * height > 1 << 31:
        raise FlowFileError(f"{path}: invalid .flo size {width}x{height}")
    expected = 12 + 8 * width * height
    if len(raw) < expected:
        raise FlowFileError(
            f"{path}: truncated .flo file: {len(raw)} bytes, a {width}x{height} flow needs {expected}"
        )
    if len(raw) > expected:
        raise FlowFileError(
            f"{path}: {len(raw) - expected} unexpected trailing bytes after a {width}x{height} flow"
        )
    flow = np.frombuffer(raw, "<f4", count=2 * width * height, offset=12).reshape(height, width, 2)
    return _checked_flow(flow, path)


def write_flo(path: str | Path, flow: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Write ``flow [H, W, 2]`` as ``.flo``; pixels where ``valid [H, W]`` is False are stored as
    unknown (1e10)."""
    flow = _as_hw2(flow, "write_flo")
    out = flow.astype("<f4", copy=True)
    if valid is not None:
        out[~np.asarray(valid, bool)] = UNKNOWN_FLOW_VALUE
    height, width = out.shape[:2]
    header = np.array([FLO_MAGIC], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    Path(path).write_bytes(header + out.tobytes())


def _checked_flow(flow: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reject NaN, mark Middlebury unknown values invalid."""
    if np.isnan(flow).any():
        n = int(np.isnan(flow).any(-1).sum())
        raise FlowFileError(f"{path}: {n} pixels have NaN flow values (unknown values must be stored as 1e10)")
    unknown = (np.abs(flow) > UNKNOWN_FLOW_THRESHOLD).any(-1)  # also catches +-inf
    flow = np.array(flow, np.float32)
    flow[unknown] = 0.0
    return flow, ~unknown


def _as_hw2(flow: np.ndarray, who: str) -> np.ndarray:
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{who}: flow must have shape [H, W, 2], got {list(flow.shape)}")
    return flow


# ------------------------------------------------------------------------------------ KITTI PNG
def read_kitti_png(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a KITTI 16-bit flow PNG -> ``(flow [H, W, 2] float32, valid [H, W] bool)``; invalid pixels
    have flow 0."""
    path = Path(path)
    if not path.is_file():
        raise FlowFileError(f"{path}: flow file does not exist")
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise FlowFileError(f"{path}: cannot decode as PNG (corrupt or not an image)")
    if data.dtype != np.uint16 or data.ndim != 3 or data.shape[2] != 3:
        raise FlowFileError(
            f"{path}: not a KITTI flow PNG (need 3 uint16 channels, got dtype {data.dtype} "
            f"shape {list(data.shape)})"
        )
    rgb = data[..., ::-1].astype(np.float32)  # cv2 gives (valid, v, u)
    valid = rgb[..., 2] > 0
    flow = (rgb[..., :2] - 2.0**15) / 64.0
    flow[~valid] = 0.0
    return flow, valid


def write_kitti_png(path: str | Path, flow: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Write ``flow [H, W, 2]`` as a KITTI 16-bit PNG (resolution 1/64 px, range about +-512 px).

    Values outside the representable range raise instead of wrapping around silently."""
    flow = _as_hw2(flow, "write_kitti_png").astype(np.float64)
    valid = np.ones(flow.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    encoded = np.round(flow * 64.0 + 2.0**15)
    encoded[~valid] = 0
    if encoded.min() < 0 or encoded.max() > 65535:
        raise ValueError(f"{path}: flow exceeds the KITTI PNG range of about +-512 px")
    out = np.dstack([encoded, valid.astype(np.float64)]).astype(np.uint16)
    if not cv2.imwrite(str(path), out[..., ::-1].copy()):
        raise FlowFileError(f"{path}: OpenCV could not write the PNG")


# ------------------------------------------------------------------------------------------ .pfm
def read_pfm(path: str | Path) -> np.ndarray:
    """Read a ``.pfm`` file -> ``[H, W, C] float32`` (C is 3 for ``PF``, 1 for ``Pf``), top row first."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FlowFileError(f"{path}: cannot read PFM file ({e.strerror})") from None
    match = re.match(rb"(PF|Pf)\s+(\d+)\s+(\d+)\s+([-+0-9.eE]+)\s", raw)
    if match is None:
        raise FlowFileError(f"{path}: not a PFM file (expected a 'PF' or 'Pf' header, got {raw[:16]!r})")
    channels = 3 if match.group(1) == b"PF" else 1
    width, height = int(match.group(2)), int(match.group(3))
    scale = float(match.group(4))
    dtype = "<f4" if scale < 0 else ">f4"
    count = width * height * channels
    offset = match.end()
    if len(raw) - offset < 4 * count:
        raise FlowFileError(
            f"{path}: truncated PFM: {len(raw) - offset} data bytes, {width}x{height}x{channels} needs {4 * count}"
        )
    data = np.frombuffer(raw, dtype, count=count, offset=offset).reshape(height, width, channels)
    return np.ascontiguousarray(data[::-1]).astype(np.float32)


def write_pfm(path: str | Path, data: np.ndarray) -> None:
    """Write ``[H, W, 3]`` or ``[H, W]`` / ``[H, W, 1]`` float data as little-endian ``.pfm``."""
    data = np.asarray(data, np.float32)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 or data.shape[2] not in (1, 3):
        raise ValueError(f"write_pfm: need [H, W, 3] or [H, W, 1], got {list(data.shape)}")
    header = b"PF\n" if data.shape[2] == 3 else b"Pf\n"
    header += f"{data.shape[1]} {data.shape[0]}\n-1.0\n".encode()
    Path(path).write_bytes(header + np.ascontiguousarray(data[::-1]).astype("<f4").tobytes())


def read_pfm_flow(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Flow from a ``.pfm`` (first two channels, as in FlyingThings3D) -> ``(flow, valid)``."""
    data = read_pfm(path)
    if data.shape[2] < 2:
        raise FlowFileError(f"{path}: a 1-channel PFM holds no flow (need the 3-channel 'PF' variant)")
    return _checked_flow(data[..., :2], Path(path))


def read_flow(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read any supported flow file by extension: ``.flo``, ``.pfm`` or KITTI ``.png``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".flo":
        return read_flo(path)
    if suffix == ".pfm":
        return read_pfm_flow(path)
    if suffix == ".png":
        return read_kitti_png(path)
    raise FlowFileError(f"{path}: unknown flow file type '{suffix}' (expected one of {FLOW_EXTENSIONS})")


# ---------------------------------------------------------------------------------------- images
def read_image(path: str | Path) -> np.ndarray:
    """Read an image (png, ppm, jpg, ...) -> ``[H, W, 3] float32`` RGB in ``[0, 1]``.

    Grey images are repeated to three channels, alpha is dropped, 16-bit images are scaled by 1/65535."""
    path = Path(path)
    if not path.is_file():
        raise FlowFileError(f"{path}: image file does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FlowFileError(f"{path}: cannot decode image (corrupt, empty or unsupported format)")
    if image.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif image.dtype == np.uint16:
        scale = 1.0 / 65535.0
    else:
        raise FlowFileError(f"{path}: unsupported image dtype {image.dtype} (need 8 or 16 bit)")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[..., :3]
    elif image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[..., ::-1].astype(np.float32) * np.float32(scale)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write ``[H, W, 3]`` RGB (float in ``[0, 1]`` or uint8) as an 8-bit image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise FlowFileError(f"{path}: OpenCV could not write the image (check the extension and folder)")
