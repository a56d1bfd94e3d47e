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

:func:`check_flow_file` finds the same wrong magic numbers, sizes and truncations without reading the
data (the header and the file length; a KITTI PNG through its chunk structure), so a whole dataset can be
checked before training: a few microseconds per ``.flo``.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from visiontrain.filecheck import check_image_file
from visiontrain.flow.sizes import format_size

FLO_MAGIC = 202021.25
UNKNOWN_FLOW_THRESHOLD = 1e9  # Middlebury: |u| or |v| above this means "unknown"
UNKNOWN_FLOW_VALUE = 1e10  # what write_flo stores for invalid pixels
IMAGE_EXTENSIONS = (".png", ".ppm", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FLOW_EXTENSIONS = (".flo", ".pfm", ".png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PFM_HEADER = re.compile(rb"(PF|Pf)\s+(\d+)\s+(\d+)\s+([-+0-9.eE]+)\s")


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
    problem, width, height = _flo_layout(raw[:12], len(raw))
    if problem:
        raise FlowFileError(f"{path}: {problem}")
    flow = np.frombuffer(raw, "<f4", count=2 * width * height, offset=12).reshape(height, width, 2)
    return _checked_flow(flow, path)


def _flo_layout(header: bytes, size: int) -> tuple[str | None, int, int]:
    """``(problem or None, width, height)`` of a ``.flo`` file from its first 12 bytes and its length."""
    if size < 12:
        return f"truncated .flo file ({size} bytes, the header alone is 12)", 0, 0
    magic = np.frombuffer(header, "<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        return f"not a .flo file (magic {header[:4]!r}, expected b'PIEH' = {FLO_MAGIC} little-endian)", 0, 0
    width, height = (int(v) for v in np.frombuffer(header, "<i4", count=2, offset=4))
    if width <= 0 or height <= 0 or width * height > 1 << 31:
        return f"invalid .flo size {format_size(height, width)} (H×W)", width, height
    expected = 12 + 8 * width * height
    if size < expected:
        return f"truncated .flo file: {size} bytes, a {format_size(height, width)} flow needs {expected}", width, height
    if size > expected:
        return f"{size - expected} unexpected trailing bytes after a {format_size(height, width)} flow", width, height
    return None, width, height


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
    data = _imread(path, "flow file", "cannot decode as PNG (corrupt or not an image)")
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
    problem, layout = _pfm_layout(raw[:256], len(raw))
    if problem:
        raise FlowFileError(f"{path}: {problem}")
    channels, width, height, scale, offset = layout
    dtype = "<f4" if scale < 0 else ">f4"
    count = width * height * channels
    data = np.frombuffer(raw, dtype, count=count, offset=offset).reshape(height, width, channels)
    return np.ascontiguousarray(data[::-1]).astype(np.float32)


def _pfm_layout(head: bytes, size: int) -> tuple[str | None, tuple[int, int, int, float, int]]:
    """``(problem or None, (channels, width, height, scale, data offset))`` of a ``.pfm`` file from its
    first bytes (the header is well under 256) and its length."""
    match = PFM_HEADER.match(head)
    if match is None:
        return f"not a PFM file (expected a 'PF' or 'Pf' header, got {head[:16]!r})", (0, 0, 0, 0.0, 0)
    channels = 3 if match.group(1) == b"PF" else 1
    width, height, offset = int(match.group(2)), int(match.group(3)), match.end()
    try:
        scale = float(match.group(4))
    except ValueError:
        return f"not a PFM file (scale {match.group(4)!r} is not a number)", (0, 0, 0, 0.0, 0)
    layout = (channels, width, height, scale, offset)
    need = 4 * width * height * channels
    if size - offset < need:
        return f"truncated PFM: {size - offset} data bytes, {format_size(height, width)}×{channels} needs {need}", layout
    return None, layout


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


def check_flow_file(path: str | Path) -> str | None:
    """``None`` when ``path`` looks like a complete flow file, else a short reason (without the path).

    Reads only headers: ``.flo`` magic 202021.25, a sane size and length ``12 + 8 * w * h``; ``.pfm`` a
    3-channel header and enough data bytes; KITTI ``.png`` a complete PNG
    (:func:`visiontrain.filecheck.check_image_file`) with 16-bit RGB pixels."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FLOW_EXTENSIONS:
        return f"unknown flow file type '{suffix}' (expected one of {FLOW_EXTENSIONS})"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(256)
    except FileNotFoundError:
        return "file does not exist"
    except OSError as e:
        return f"cannot read flow file ({e.strerror})"
    if suffix == ".flo":
        return _flo_layout(head[:12], size)[0]
    if suffix == ".pfm":
        problem, (channels, *_) = _pfm_layout(head, size)
        if problem is None and channels < 2:
            problem = "a 1-channel PFM holds no flow (need the 3-channel 'PF' variant)"
        return problem
    problem = check_image_file(path)
    if problem is None and (head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR"):
        problem = "not a PNG file (a KITTI flow file is a 16-bit RGB PNG)"
    elif problem is None and (head[24], head[25]) != (16, 2):
        problem = (f"not a KITTI flow PNG (bit depth {head[24]}, colour type {head[25]}; need 16-bit RGB, colour "
                   f"type 2)")
    return problem


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
def _imread(path: Path, what: str, undecodable: str) -> np.ndarray:
    """``cv2.imread(path, IMREAD_UNCHANGED)``; a :class:`FlowFileError` naming the file when it is missing
    (``what`` does not exist) or OpenCV cannot decode it (``undecodable``)."""
    if not path.is_file():
        raise FlowFileError(f"{path}: {what} does not exist")
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise FlowFileError(f"{path}: {undecodable}")
    return data


def read_image(path: str | Path) -> np.ndarray:
    """Read an image (png, ppm, jpg, ...) -> ``[H, W, 3] float32`` RGB in ``[0, 1]``.

    Grey images are repeated to three channels, alpha is dropped, 16-bit images are scaled by 1/65535."""
    path = Path(path)
    image = _imread(path, "image file", "cannot decode image (corrupt, empty or unsupported format)")
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
