"""What synchronised BatchNorm costs under torchrun on CPU (gloo): yolov8n detection training, 2 processes
with ``sync_bn=true`` vs ``false``, and 1 process with the same global batch, on the same synthetic data.

    python benchmarks/ddp_sync_bn.py [--steps 30] [--imgsz 256] [--batch 16]

Each run is the real CLI (``visiontrain train detect``); the step rate is the trainer's own
``train/steps_per_s`` from ``metrics.csv`` averaged over the logs after the first (warm-up) one.
Processes get one OpenMP thread each; the 1-process run gets as many threads as the 2-process runs have
processes, so all use the same cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def steps_per_s(run: Path) -> float:
    from visiontrain.engine.logging import read_metrics

    rates = [v for _, v in read_metrics(run / "metrics.csv")["train/steps_per_s"]][1:]
    return sum(rates) / len(rates)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.engine.runtime import cpu_description

    work = Path(args.work or tempfile.mkdtemp(prefix="ddp_bench_"))
    data = work / "data"
    if not data.exists():
        write_synthetic_mar20(data, train=4 * args.batch, val=4, imgsz=args.imgsz, seed=0)
    common = ["train", "detect", f"data={data}", f"imgsz={args.imgsz}", f"batch_size={args.batch}",
              f"max_steps={args.steps}", "log_every=5", "eval_every=0", "progress=false", "tensorboard=false",
              "plots=false", "device=cpu", "amp=off"]
    rows = []
    for name, nproc, extra in (("1 process, 2 threads", 1, []), ("2 processes, sync_bn=false", 2, ["sync_bn=false"]),
                               ("2 processes, sync_bn=true", 2, ["sync_bn=true"])):
        out = work / name.replace(" ", "_").replace(",", "").replace("=", "")
        shutil.rmtree(out, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ([sys.executable, "-m", "visiontrain"] if nproc == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(port), "-m", "visiontrain"])
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
        subprocess.run([*launcher, *common, *extra, f"out={out}"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append((name, steps_per_s(out)))
    print(cpu_description())
    print(f"yolov8n, imgsz {args.imgsz}, global batch {args.batch}, {args.steps} steps, fp32")
    base = rows[1][1]
    for name, rate in rows:
        print(f"{name:<30} {rate:6.3f} steps/s   {base / rate:5.2f}x the time of sync_bn=false")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
