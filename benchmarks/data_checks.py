"""What the damaged-file checks cost: validation time as a fraction of one training epoch (issue 16).

    python benchmarks/data_checks.py [--data DIR] [--images 1000] [--flow-data DIR] [--pairs 1000]
                                     [--steps 20] [--no-flow]

Detection: a synthetic MAR20 set of ``--images`` training images at 320 px (JPEG; written unless
``--data`` holds one) is checked with :func:`visiontrain.filecheck.check_image_files` as training does it,
with the files first dropped from the page cache (``posix_fadvise(DONTNEED)``; "cold-ish": a virtual
disk may still be cached by the host) and again warm, and once with a full decode of every image for
comparison. One epoch of yolov8n (batch 16, the detect task's defaults, no validation) is timed with the
real trainer: ``--steps`` optimizer steps after 5 warm-up steps, read from the trainer's own
``train/steps_per_s`` log, then extrapolated to the epoch's ``images // 16`` steps.

Flow (unless ``--no-flow``): a FlyingChairs-layout set of ``--pairs`` training pairs at 288x352 (the
task's built-in synthetic size; PPM images, ``.flo`` flow; about 160 ms per pair to write) gets the same
treatment with :func:`visiontrain.flow.checks.find_bad_files`, against one epoch of raft_small (batch 4,
crop 256x320, the flow task's defaults) extrapolated from ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path


def evict(paths: list[str]) -> None:
    """Ask the kernel to drop ``paths`` from the page cache (clean pages only; hence the sync)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def seconds_per_step(task, warmup: int, steps: int) -> float:
    """Mean optimizer-step time of ``task`` over ``steps`` steps after ``warmup`` ones, as the trainer
    logs it (``train/steps_per_s`` every ``log_every`` steps)."""
    from visiontrain.engine.logging import read_metrics
    from visiontrain.engine.trainer import fit

    cfg = task.cfg
    cfg.max_steps, cfg.log_every = warmup + steps, warmup
    if steps % warmup:
        raise SystemExit(f"--steps must be a multiple of the {warmup} warm-up steps")
    result = fit(task)
    rates = [(s, r) for s, r in read_metrics(Path(result["out"]) / "metrics.csv")["train/steps_per_s"] if s > warmup]
    return sum(warmup / r for _, r in rates) / steps


def without_validation(task_cls):
    """The task with no validation set, so the timed steps are training steps only."""

    class NoVal(task_cls):
        def build_datasets(self):
            train, _ = super().build_datasets()
            return train, None

    return NoVal


def detect_rows(args, work: Path) -> list[tuple[str, str]]:
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.data import load_labels
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.detect.task import DetectTask
    from visiontrain.filecheck import check_image_files

    root = Path(args.data) if args.data else work / f"mar20-{args.images}"
    if not (root / "ImageSets" / "Main" / "train.txt").is_file():
        print(f"writing {args.images} + 16 synthetic MAR20 images (320 px) to {root} ...", flush=True)
        write_synthetic_mar20(root, train=args.images, val=16, imgsz=320, seed=0)
    labels = load_labels(root, "train")  # builds the label cache
    paths = [r.path for r in labels.records]
    n = len(paths)
    evict(paths)
    cold, bad = timed(check_image_files, paths, progress=False)
    assert not bad, bad
    warm = min(timed(check_image_files, paths, progress=False)[0] for _ in range(3))
    one = min(timed(check_image_files, paths, workers=1, progress=False)[0] for _ in range(2))
    decode, _ = timed(check_files_decoding, paths)
    load, _ = timed(load_labels, root, "train")
    cfg = DetectTrainConfig(data=str(root), out=str(work / "runs" / "detect"), imgsz=320, batch_size=16,
                            model="yolov8n", tensorboard=False, plots=False, progress=False)
    step = seconds_per_step(without_validation(DetectTask)(cfg), args.warmup, args.steps)
    steps_per_epoch = n // 16
    epoch = step * steps_per_epoch
    return [
        ("detect data", f"{n} synthetic MAR20 training images, 320 px JPEG, {root}"),
        ("image checks, cold-ish page cache", f"{cold:.3f} s ({1e3 * cold / n:.2f} ms/image)"),
        ("image checks, warm (best of 3)", f"{warm:.3f} s ({1e3 * warm / n:.2f} ms/image)"),
        ("image checks, warm, 1 thread (best of 2)", f"{one:.3f} s"),
        ("full decode of every image instead (warm)", f"{decode:.3f} s ({1e3 * decode / n:.2f} ms/image)"),
        ("load_labels(train): label cache + checks", f"{load:.3f} s"),
        ("yolov8n step, batch 16 (trainer, fp32)", f"{step:.2f} s (mean of {args.steps} after {args.warmup})"),
        ("one epoch, extrapolated", f"{epoch:.0f} s = {steps_per_epoch} steps x {step:.2f} s"),
        ("checks / epoch (cold-ish, warm)", f"{100 * cold / epoch:.3f} %, {100 * warm / epoch:.3f} %"),
        ("full decode / epoch", f"{100 * decode / epoch:.2f} %"),
    ]


def check_files_decoding(paths: list[str]):
    from visiontrain.filecheck import check_files, check_image_file

    return check_files(paths, lambda p: check_image_file(p, decode=True), progress=False)


def flow_rows(args, work: Path) -> list[tuple[str, str]]:
    from visiontrain.flow.checks import find_bad_files
    from visiontrain.flow.config import FlowTrainConfig
    from visiontrain.flow.data import open_flow_dataset
    from visiontrain.flow.synthetic import write_synthetic_chairs
    from visiontrain.flow.task import FlowTask

    root = Path(args.flow_data) if args.flow_data else work / f"chairs-{args.pairs}"
    if not (root / "FlyingChairs_train_val.txt").is_file():
        print(f"writing {args.pairs} + 4 synthetic chairs-layout pairs (288x352) to {root} ...", flush=True)
        write_synthetic_chairs(root, train=args.pairs, val=4, size=(288, 352), seed=0)
    spec = f"chairs:{root}"
    train = open_flow_dataset(spec, "train")
    files = [str(p) for it in train.items for p in (it.image1, it.image2, it.flow)]
    n = len(train)
    evict(files)
    cold, bad = timed(find_bad_files, train)
    assert not bad, bad
    warm = min(timed(find_bad_files, train)[0] for _ in range(3))
    cfg = FlowTrainConfig(data=spec, out=str(work / "runs" / "flow"), model="raft_small", batch_size=4,
                          tensorboard=False, plots=False, progress=False)
    step = seconds_per_step(without_validation(FlowTask)(cfg), args.warmup, args.steps)
    steps_per_epoch = n // 4
    epoch = step * steps_per_epoch
    return [
        ("flow data", f"{n} synthetic chairs-layout training pairs, 288x352 (2 PPM + 1 .flo each), {root}"),
        ("image + flow checks, cold-ish page cache", f"{cold:.3f} s ({1e3 * cold / n:.2f} ms/pair)"),
        ("image + flow checks, warm (best of 3)", f"{warm:.3f} s ({1e3 * warm / n:.2f} ms/pair)"),
        ("raft_small step, batch 4, crop 256x320", f"{step:.2f} s (mean of {args.steps} after {args.warmup})"),
        ("one epoch, extrapolated", f"{epoch:.0f} s = {steps_per_epoch} steps x {step:.2f} s"),
        ("checks / epoch (cold-ish, warm)", f"{100 * cold / epoch:.4f} %, {100 * warm / epoch:.4f} %"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="", help="a MAR20-layout set to use (default: write one under --work)")
    ap.add_argument("--images", type=int, default=1000, help="training images to write")
    ap.add_argument("--flow-data", default="", help="a FlyingChairs-layout set to use")
    ap.add_argument("--pairs", type=int, default=1000, help="training pairs to write")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (a multiple of 5)")
    ap.add_argument("--no-flow", action="store_true", help="detection only")
    ap.add_argument("--work", default="", help="folder for written data and runs (default: a temporary one)")
    args = ap.parse_args()
    args.warmup = 5
    logging.basicConfig(level=logging.WARNING)
    import torch

    from visiontrain.engine.runtime import cpu_description

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vt-data-checks-") as tmp:
        work = Path(args.work or tmp)
        rows = detect_rows(args, work)
        if not args.no_flow:
            rows += flow_rows(args, work)
    width = max(len(k) for k, _ in rows)
    print(f"\ninput validation cost | {cpu_description()} | {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads | 1-min load average {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end (this script adds up to its thread count; more is other processes)")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
