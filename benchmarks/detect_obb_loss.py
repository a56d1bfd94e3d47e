"""OBB loss + rotated assignment cost, ours (``OBBLoss``) vs Ultralytics' ``v8OBBLoss``, side by side in one run.

    .venv/bin/python benchmarks/detect_obb_loss.py [--targets 10 100 400] [--batch 8] [--size 640] [--threads 1]

Workload: fixed random OBB head outputs (``[B, 64 + nc + 1, H, W]`` per level, nc=15) for ``--batch`` images at
``--size`` and ``T`` random oriented boxes per image (centres uniform, sides 1-31 % of the image, any angle, so
boxes overlap a lot at 400). One measurement = loss forward + backward w.r.t. the predictions, assignment
included; each implementation gets its natural input (our three maps; Ultralytics' ``{boxes, scores, angle,
feats}`` dict). Time: median CPU time (``time.process_time``) over ``--repeats`` calls after a warm-up, and wall
time for reference; peak memory: ``VmHWM - VmRSS`` around one cold call in a fresh process (peak mark reset via
``/proc/self/clear_refs``), median over ``--processes`` processes — the method of ``detect_loss.py``. Linux only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

NC = 15
STRIDES = (8, 16, 32)
R = 64


def build_inputs(batch: int, size: int, per_image: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, R + NC + 1, size // s, size // s, generator=g) for s in STRIDES]
    n = batch * per_image
    img = torch.arange(batch).repeat_interleave(per_image).float()
    cls = torch.randint(0, NC, (n,), generator=g).float()
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.01
    angle = (torch.rand(n, 1, generator=g) - 0.25) * math.pi
    return maps, torch.cat((img[:, None], cls[:, None], xy, wh, angle), 1)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def worker(impl: str, per_image: int, batch: int, size: int, repeats: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    maps, t_norm = build_inputs(batch, size, per_image)
    if impl == "ours":
        from visiontrain.detect.obb.loss import OBBLoss

        targets = torch.cat((t_norm[:, :2], t_norm[:, 2:6] * size, t_norm[:, 6:]), 1)
        loss = OBBLoss(NC)
        inputs = [m.clone().requires_grad_() for m in maps]

        def step():
            for m in inputs:
                m.grad = None
            sum(loss(inputs, targets, size).values()).backward()
    else:
        from torch import nn
        from ultralytics.utils.loss import v8OBBLoss

        class StandIn(nn.Module):
            def __init__(self):
                super().__init__()
                self.dummy = nn.Parameter(torch.zeros(1))
                self.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, angle=1.0)
                self.model = [SimpleNamespace(stride=torch.tensor([8.0, 16.0, 32.0]), nc=NC, reg_max=16)]

        criterion = v8OBBLoss(StandIn())
        flat = torch.cat([m.flatten(2) for m in maps], 2)
        boxes = flat[:, :R].clone().requires_grad_()
        scores = flat[:, R:R + NC].clone().requires_grad_()
        logit = flat[:, R + NC:].clone().requires_grad_()
        batch_dict = {"batch_idx": t_norm[:, 0], "cls": t_norm[:, 1:2], "bboxes": t_norm[:, 2:7]}

        def step():
            boxes.grad = scores.grad = logit.grad = None
            preds = {"boxes": boxes, "scores": scores, "angle": (logit.sigmoid() - 0.25) * math.pi, "feats": maps}
            criterion.loss(preds, batch_dict)[0].sum().backward()

    open("/proc/self/clear_refs", "w").write("5")
    before = rss_kib("VmRSS")
    step()
    peak_mib = (rss_kib("VmHWM") - before) / 1024
    step()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "peak_mib": peak_mib}


def measure(impl: str, per_image: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--targets", str(per_image), "--batch", str(args.batch),
           "--size", str(args.size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(args.processes)]
    return {k: statistics.median(r[k] for r in runs) for k in ("cpu_s", "wall_s", "peak_mib")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", type=int, nargs="+", default=[10, 100, 400])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=["ours", "ultralytics"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.targets[0], args.batch, args.size, args.repeats, args.threads)))
        return
    print(f"OBB loss + rotated assignment, forward + backward; batch {args.batch}, {args.size}x{args.size}, nc={NC}, "
          f"{args.threads} thread(s); medians over {args.processes} processes x {args.repeats} calls")
    head = (f"{'targets/img':>11} | {'ours cpu s':>10} {'ultra cpu s':>11} {'ratio':>6} | {'wall ratio':>10} | "
            f"{'ours MiB':>9} {'ultra MiB':>9} {'ratio':>6}")
    print(head + "\n" + "-" * len(head))
    for t in args.targets:
        a, b = measure("ours", t, args), measure("ultralytics", t, args)
        print(f"{t:>11} | {a['cpu_s']:>10.3f} {b['cpu_s']:>11.3f} {a['cpu_s'] / b['cpu_s']:>6.2f} | "
              f"{a['wall_s'] / b['wall_s']:>10.2f} | {a['peak_mib']:>9.1f} {b['peak_mib']:>9.1f} "
              f"{a['peak_mib'] / max(b['peak_mib'], 1e-9):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
