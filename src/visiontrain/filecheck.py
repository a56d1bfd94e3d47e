"""Is an image file complete? Cheap checks run on every file of a dataset before training starts.

A JPEG cut to half its bytes still has a valid header, so opening it (or reading its size) succeeds, and
OpenCV decodes it anyway, the missing rows filled in, after printing libjpeg's "Premature end of JPEG
file" without a file name. :func:`check_image_file` finds such files without decoding them where the format allows:

* every file: it exists, is not empty, and PIL can read its header (format and a non-zero size);
* **JPEG**: the file ends with the end-of-image marker ``FF D9``. When it does not, the marker segments
  are walked (skipping the entropy-coded data): no end-of-image marker means truncated;
* **PNG**: the file ends with the ``IEND`` chunk. When it does not, the chunks are walked: a file that
  ends (or stops looking like chunks) before ``IEND`` is truncated or damaged;
* **binary PPM / PGM** (``P6`` / ``P5``): the file length is header + ``w * h * channels * (1 or 2)``;
  shorter is truncated;
* **other formats** (BMP, TIFF, WebP, ...), and the files above that have bytes after their end marker
  or pixels: a full decode with PIL (``ImageFile.LOAD_TRUNCATED_IMAGES`` off) decides, and its error is
  the reason.

So a JPEG followed by padding or trailing bytes is accepted when it decodes completely, and a JPEG cut
and zero-filled to its old length is not. The cheap path reads the header and the last bytes of a file
(about 0.1 ms on a local disk); a full decode costs what loading the image costs. Damage inside the
compressed data of a complete file (bit flips) is not looked for; decoders mostly accept it, as they do
at training time.

:func:`check_files` checks many files in a thread pool and returns the bad ones; :func:`format_bad_files`
turns them into one message that names every file, the reason and what to do.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type IEND, CRC of "IEND"
PROGRESS_MIN_FILES = 2000  # show a progress bar (on a terminal) from this many files
_PNM_HEADER = re.compile(rb"(P[56])(?:\s|#[^\n\r]*[\n\r])+(\d+)(?:\s|#[^\n\r]*[\n\r])+(\d+)"
                         rb"(?:\s|#[^\n\r]*[\n\r])+(\d+)\s")

BadFile = tuple[str, str]  # (path, reason)


def check_image_file(path: str | Path, decode: bool = False) -> str | None:
    """``None`` when ``path`` is a complete image, else a short reason (without the path).

    ``decode=True`` skips the cheap checks and always decodes the whole image (slower; for comparison)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not path.is_file():
        return "not a regular file"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with _strict_decoding(), Image.open(path) as im:
            width, height = im.size
            if width <= 0 or height <= 0:
                return f"image has size {width}x{height}"
            fmt = im.format or "unknown"
            verdict, note = ("decode", "") if decode else _cheap_check(path, fmt, size)
            if verdict == "ok":
                return None
            if verdict == "bad":
                return note
            error = _decode_error(im)
    except UnidentifiedImageError:
        return "not a readable image (PIL cannot identify its format: not an image, or a damaged header)"
    except Exception as e:  # PIL raises several types for damaged headers
        return f"not a readable image ({type(e).__name__}: {e})"
    if error is None:
        return None
    return f"{note}, and decoding fails ({error})" if note else f"{fmt} decoding fails ({error})"


def _cheap_check(path: Path, fmt: str, size: int) -> tuple[str, str]:
    """``("ok", "")`` complete; ``("bad", reason)`` certainly damaged; ``("decode", note)`` a full decode
    decides (``note`` says what the cheap check saw, or is empty for formats without a cheap check)."""
    if fmt in ("JPEG", "MPO"):
        if _tail(path, size, 2) == JPEG_EOI:
            return "ok", ""
        end = _jpeg_end(path.read_bytes())
        if end is None:
            return "bad", "truncated JPEG: the data ends without the end-of-image marker FF D9"
        return "decode", f"{size - end} bytes after the JPEG end-of-image marker"
    if fmt == "PNG":
        if _tail(path, size, len(PNG_IEND)) == PNG_IEND:
            return "ok", ""
        end, problem = _png_end(path, size)
        if end is None:
            return "bad", problem
        return "decode", f"{size - end} bytes after the PNG IEND chunk"
    if fmt == "PPM":
        return _pnm_check(path, size)
    return "decode", ""


def _tail(path: Path, size: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - n))
        return f.read(n)


def _jpeg_end(data: bytes) -> int | None:
    """Offset just past the end-of-image marker of the JPEG in ``data`` (found by walking its marker
    segments and skipping entropy-coded data, so thumbnails and trailing bytes do not fool it), or None
    when the data ends first."""
    i, n = 2, len(data)  # after SOI
    while i + 1 < n:
        if data[i] != 0xFF:
            return None  # lost the marker structure: damaged
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xD9:
            return i + 2
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            if i + 4 > n:
                return None
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
                while True:
                    j = data.find(b"\xff", i)
                    if j < 0 or j + 1 >= n:
                        return None
                    nxt = data[j + 1]
                    if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed byte or restart marker
                        i = j + 2
                    elif nxt == 0xFF:  # fill bytes before a marker
                        i = j + 1
                    else:
                        i = j
                        break
    return None


def _png_end(path: Path, size: int) -> tuple[int | None, str]:
    """``(offset just past IEND, "")`` by walking the chunks (8-byte headers, seeking over the data), or
    ``(None, reason)`` when the file ends first or a chunk header is not one."""
    with open(path, "rb") as f:
        pos = 8  # after the signature
        while pos + 12 <= size:
            f.seek(pos)
            head = f.read(8)
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if not kind.isalpha():
                return None, f"damaged PNG: no chunk header at byte {pos} (got {head!r})"
            pos += 12 + length
            if kind == b"IEND":
                return (pos, "") if pos <= size else (None, "truncated PNG: the IEND chunk is cut")
    return None, f"truncated PNG: the file ends after {size} bytes, before the IEND chunk"


def _pnm_check(path: Path, size: int) -> tuple[str, str]:
    """Binary PPM (``P6``) / PGM (``P5``): the length must be header + pixel bytes."""
    with open(path, "rb") as f:
        head = f.read(1024)
    m = _PNM_HEADER.match(head)
    if m is None:  # ASCII or bitmap variants, or an odd header: decoding decides
        return "decode", ""
    width, height, maxval = int(m.group(2)), int(m.group(3)), int(m.group(4))
    channels = 3 if m.group(1) == b"P6" else 1
    need = m.end() + width * height * channels * (1 if maxval < 256 else 2)
    if size == need:
        return "ok", ""
    if size < need:
        return "bad", (f"truncated {m.group(1).decode()} image: {size} bytes, a {width}x{height} image with "
                       f"maxval {maxval} needs {need}")
    return "decode", f"{size - need} bytes after the pixels of a {width}x{height} {m.group(1).decode()} image"


def _decode_error(im) -> str | None:  # noqa: ANN001 - a PIL image
    try:
        im.load()
    except Exception as e:  # truncated data, bad compressed stream, ...
        return f"{type(e).__name__}: {e}"
    return None


_strict_lock = threading.Lock()
_strict_state = {"depth": 0, "saved": False}


@contextmanager
def _strict_decoding():
    """PIL's ``LOAD_TRUNCATED_IMAGES`` off while checks run (it is a process-wide flag; nested and
    concurrent checks share one save/restore), so a truncated file raises instead of decoding grey."""
    from PIL import ImageFile

    with _strict_lock:
        if _strict_state["depth"] == 0:
            _strict_state["saved"] = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_state["depth"] += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_state["depth"] -= 1
            if _strict_state["depth"] == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_state["saved"]


def check_files(paths: Iterable[str | Path], check: Callable[[str], str | None] = check_image_file,
                workers: int = 0, desc: str = "checking files", progress: bool | None = None) -> list[BadFile]:
    """Run ``check(path) -> reason | None`` on every distinct path; ``[(path, reason)]`` of the bad ones in
    the order given. ``workers``: threads (0 = ``min(8, 2 * cpus)``; file reads and PIL decoding release
    the GIL). ``progress``: a tqdm bar on stderr (``None`` = when stderr is a terminal and there are at
    least :data:`PROGRESS_MIN_FILES` files)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    if progress is None:
        progress = len(unique) >= PROGRESS_MIN_FILES and sys.stderr.isatty()
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    with _strict_decoding():
        if len(unique) < 32 or workers == 1:
            reasons = [check(p) for p in _bar(unique, progress, desc)]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="filecheck") as pool:
                reasons = list(_bar(pool.map(check, unique), progress, desc, total=len(unique)))
    return [(p, r) for p, r in zip(unique, reasons) if r is not None]


def _bar(items: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    if not enabled:
        return items
    import tqdm

    return tqdm.tqdm(items, total=total, desc=desc, unit="file", file=sys.stderr, leave=False)


def check_image_files(paths: Iterable[str | Path], workers: int = 0, progress: bool | None = None,
                      desc: str = "checking images") -> list[BadFile]:
    """:func:`check_files` with :func:`check_image_file`."""
    return check_files(paths, check_image_file, workers, desc, progress)


def format_bad_files(bad: Sequence[BadFile], what: str = "files", fix: str = "Replace or remove them.",
                     groups: Sequence[tuple[str, Sequence[BadFile]]] | None = None) -> str:
    """One message naming every bad file and its reason, then ``fix``::

        Damaged images (2):
          data/JPEGImages/0042.jpg: truncated JPEG: the data ends without the end-of-image marker FF D9
          data/JPEGImages/0077.jpg: empty file (0 bytes)
        Replace or remove them, or set skip_bad_images=true to train without them.

    ``groups``: ``[(title, bad)]`` instead of ``bad``, listed under their titles (e.g. one per split)."""
    groups = [("", bad)] if groups is None else [g for g in groups if g[1]]
    n = sum(len(b) for _, b in groups)
    lines = [f"Damaged {what} ({n}):"]
    for title, items in groups:
        indent = "  "
        if title:
            lines.append(f"  {title} ({len(items)}):")
            indent = "    "
        lines += [f"{indent}{p}: {r}" for p, r in items]
    lines.append(fix)
    return "\n".join(lines)
