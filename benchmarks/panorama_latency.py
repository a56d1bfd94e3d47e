"""Sampling latency of one-step students against their teacher, on an otherwise idle machine.

The latency figures ``benchmarks/panorama_distill.py`` prints are taken at the end of a training run, while
other jobs may share the cores. This script re-measures them alone: median seconds per panorama at batch 1
(conditioning + Euler steps) over ``--repeats`` runs after one warm-up, and the ratio teacher / student.

    OMP_NUM_THREADS=1 python benchmarks/panorama_latency.py --teacher W/t64/ema.pt \
        --student W/d20cache/student.pt --student W/d20/student.pt synth_dir=W/synth
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from panorama import sampling_latency  # noqa: E402
from panorama_distill import distill_config  # noqa: E402

from visiontrain.panorama.inference import Sampler, load_trained  # noqa: E402
from visiontrain.panorama.task import PanoramaTask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher weights (the distillation run's --teacher)")
    ap.add_argument("--student", action="append", required=True,
                    help="a student.pt of benchmarks/panorama_distill.py (repeat for several)")
    ap.add_argument("--steps", type=int, default=12, help="teacher Euler steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("overrides", nargs="*", help="PanoramaTrainConfig key=value (synth_dir=... of the runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        task = PanoramaTask(distill_config(args.teacher, args.steps, Path(tmp), args.overrides))
        _, val = task.build_datasets()
    teacher, shift = task.distiller.teacher, task.cfg.t_pow_shift
    for path in args.student:
        student = load_trained(path).model.eval()
        s = sampling_latency(task, student, val, Sampler(1, shift, 1.0), repeats=args.repeats)
        t = sampling_latency(task, teacher, val, Sampler(args.steps, shift, 1.0), repeats=args.repeats)
        print(f"{path}: student 1 step {s:.3f} s, teacher {args.steps} steps {t:.3f} s, ratio {t / s:.1f}x")


if __name__ == "__main__":
    main()
