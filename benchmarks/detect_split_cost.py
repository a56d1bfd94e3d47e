"""What a ``distill.frozen_base`` student costs at inference: the teacher's network plus a second class branch.

FLOPs (``torch.utils.flop_counter``) and CPU latency (fused, batch 1, median of ``--runs``, the three models
interleaved) of a plain YOLOv8 with the student's classes against the split student, and the teacher::

    OMP_NUM_THREADS=1 python benchmarks/detect_split_cost.py --scale n --imgsz 640
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from visiontrain.detect.distill import split_classes
from visiontrain.detect.model import YOLOv8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="n")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--base", type=int, default=10, help="the teacher's classes")
    ap.add_argument("--novel", type=int, default=10, help="classes the student adds")
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = [f"c{i}" for i in range(args.base)]
    new = old + [f"n{i}" for i in range(args.novel)]
    models = {"teacher": YOLOv8(args.scale, nc=len(old), names=old).eval()}
    models["plain"] = YOLOv8(args.scale, nc=len(new), names=new).eval()
    models["split"] = split_classes(copy.deepcopy(models["teacher"]), new, old).eval()
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    flops, times = {}, {k: [] for k in models}
    with torch.no_grad():
        for k, m in models.items():
            counter = FlopCounterMode(display=False)
            with counter:
                m(x)
            flops[k] = counter.get_total_flops() / 1e9
            m.fuse()
            m(x)
        for _ in range(args.runs):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    for k in models:
        print(f"{k:8s} {flops[k]:6.2f} GFLOPs  {ms[k]:7.1f} ms")
    print(f"split / plain: FLOPs x{flops['split'] / flops['plain']:.3f}, latency x{ms['split'] / ms['plain']:.2f} "
          f"(YOLOv8{args.scale}, {args.imgsz}², {args.base}+{args.novel} classes, 1 thread, median of {args.runs})")


if __name__ == "__main__":
    main()
