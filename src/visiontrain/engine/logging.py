"""Run logs: ``log.txt`` (what the console shows), ``metrics.csv`` (long format) and TensorBoard.

Only rank 0 writes. ``metrics.csv`` has one row per value — ``step,epoch,key,value`` with keys such as
``train/box``, ``lr`` or ``val/mAP50`` — so new keys never break the file and plotting stays simple.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import sys
import time
from pathlib import Path

import tqdm


class _LogFileHandler(logging.Handler):
    """Library messages (``logging.getLogger("visiontrain.…")``: dataset summaries, skipped files, weight
    loading) go to the run's ``log.txt`` too; the console gets them from the CLI's handler."""

    def __init__(self, run_logger: RunLogger):
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.write(record.getMessage())


class RunLogger:
    """Only rank 0 has one with a folder (``out_dir=None``: everything is a no-op). Files are opened by
    :meth:`open` once the run folder may be created (after the inputs were validated); what
    :meth:`info` says before that is printed, kept, and written to ``log.txt`` when it opens."""

    def __init__(self, out_dir: Path | None, tensorboard: bool = True):
        self.out_dir = out_dir
        self.enabled = out_dir is not None
        self.tensorboard = tensorboard
        self._tb = None
        self._log = None
        self._csv = None
        self._early: list[str] = []
        self.bar_active = False

    def open(self) -> None:
        if not self.enabled or self._log is not None:
            return
        out_dir = self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(out_dir / "log.txt", "a", buffering=1)
        for line in self._early:
            self._log.write(line)
        self._early.clear()
        new = not (out_dir / "metrics.csv").exists()
        self._csv_file = open(out_dir / "metrics.csv", "a", newline="", buffering=1)
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(["step", "epoch", "key", "value"])
        self._handler = _LogFileHandler(self)
        logging.getLogger("visiontrain").addHandler(self._handler)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.info("tensorboard is not installed; TensorBoard events are not written")

    def info(self, msg: str) -> None:
        """Print (above a live progress bar) and append to log.txt."""
        if not self.enabled:
            return
        if self.bar_active:
            tqdm.tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        self.write(msg)

    def write(self, msg: str) -> None:
        """Append ``msg`` to ``log.txt`` only (kept until the file opens)."""
        if not self.enabled:
            return
        line = time.strftime("%H:%M:%S ") + msg + "\n"
        if self._log is not None:
            self._log.write(line)
        else:
            self._early.append(line)

    def error(self, msg: str) -> None:
        """Record what ended the run in ``log.txt`` (the CLI prints it to the console). Before the run
        folder exists there is no log to write to, unless the run resumes in a folder that exists."""
        if not self.enabled:
            return
        if self._log is None and self.out_dir.is_dir():
            self.open()
        self.write(msg)

    def scalars(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if self._csv is None:
            return
        for k, v in values.items():
            self._csv.writerow([step, epoch, k, f"{float(v):.8g}"])
            if self._tb is not None:
                self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if getattr(self, "_handler", None) is not None:
            logging.getLogger("visiontrain").removeHandler(self._handler)
            self._handler = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            self._csv_file.close()
            self._log.close()
            self._log = self._csv = None


class TrainClock:
    """Wall and CPU seconds this process has spent training since it started (evaluation excluded),
    logged with every evaluation as ``time/train_wall_s`` and ``time/train_cpu_s``."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time())
        self.excluded = [0.0, 0.0]

    @contextlib.contextmanager
    def paused(self):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.excluded[0] += time.perf_counter() - t0
            self.excluded[1] += time.process_time() - c0

    def seconds(self) -> dict[str, float]:
        return {"time/train_wall_s": time.perf_counter() - self.start[0] - self.excluded[0],
                "time/train_cpu_s": time.process_time() - self.start[1] - self.excluded[1]}


def format_value(v: float) -> str:
    """A metric for a log line: whole numbers as integers, others to 4 significant digits."""
    v = float(v)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def describe_error(e: BaseException) -> str:
    """What ``log.txt`` records of an error that ended a run: the message of one the user can fix (bad
    config, data or checkpoint), the whole traceback otherwise."""
    from visiontrain.engine.guard import NonFiniteLossError

    if isinstance(e, KeyboardInterrupt):
        return f"interrupted ({e})" if str(e) else "interrupted"
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, NonFiniteLossError)):
        return str(e)
    import traceback

    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{key: [(step, value), ...]}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["key"], []).append((int(row["step"]), float(row["value"])))
    return series
