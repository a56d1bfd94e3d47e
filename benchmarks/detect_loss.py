"""Loss + assignment cost, ours vs Ultralytics' ``v8DetectionLoss``, side by side in one run.

    .venv/bin/python benchmarks/detect_loss.py [--targets 10 100 400] [--batch 8] [--size 640] [--threads 1]

Workload: fixed random head outputs for a batch of ``--batch`` images at ``--size`` (8400 anchors at 640),
nc=20, and ``T`` random boxes per image (centres uniform, sides 1-31% of the image, so boxes overlap a
lot at 400). One measurement = loss forward + backward w.r.t. the predictions. Each implementation gets
its natural input: our loss the head's three ``[B, 84, H, W]`` maps, Ultralytics its ``{'boxes',
'scores', 'feats'}`` dict; both include their assignment.

Time: median over ``--repeats`` calls (after one warm-up call) of the process's CPU time
(``time.process_time``, all threads) and, for reference, of the wall time. On a shared, oversubscribed
machine the wall time mostly measures how long the process waited for a core; with one thread the CPU
time is the work done, so the ratios use it.

Peak memory: measured by the kernel, not by a Python tracer (``tracemalloc`` does not see torch's
allocations). Every (implementation, T) pair runs in its own fresh subprocess; after the inputs are
built, the process's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), one cold loss
forward+backward runs, and the reported figure is ``VmHWM - VmRSS before``: the extra resident memory
the call needed at its peak, allocator overhead included. The call is the process's first, so no
memory freed by an earlier call can be silently reused. The page-level figure varies by some MiB from
run to run, so each pair runs in ``--processes`` fresh processes and the medians are reported. Linux only.

Threads: the default is one intra-op thread, because on a shared machine a second thread that has to
wait for a busy core makes timings swing by several times; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

NC = 20
STRIDES = (8, 16, 32)


def build_inputs(batch: int, size: int, per_image: int, seed: int = 0):
    """Head maps ``[B, 64 + NC, size/s, size/s]`` and targets (normalised xywh, Ultralytics' form)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, 64 + NC, size // s, size // s, generator=g) for s in STRIDES]
    n = batch * per_image
    img = torch.arange(batch).repeat_interleave(per_image).float()
    cls = torch.randint(0, NC, (n,), generator=g).float()
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.01
    return maps, torch.cat((img[:, None], cls[:, None], xy, wh), 1)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def worker(impl: str, per_image: int, batch: int, size: int, repeats: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    maps, targets_norm = build_inputs(batch, size, per_image)

    if impl == "ours":
        from visiontrain.detect.loss import DetectionLoss

        xywh = targets_norm[:, 2:6] * size
        targets = torch.cat(
            (targets_norm[:, :2], xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1
        )
        loss = DetectionLoss(NC)
        inputs = [m.clone().requires_grad_() for m in maps]

        def step():
            for m in inputs:
                m.grad = None
            sum(loss(inputs, targets, size).values()).backward()

    else:
        from torch import nn
        from ultralytics.utils.loss import v8DetectionLoss

        class StandIn(nn.Module):
            def __init__(self):
                super().__init__()
                self.dummy = nn.Parameter(torch.zeros(1))
                self.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
                self.model = [SimpleNamespace(stride=torch.tensor([8.0, 16.0, 32.0]), nc=NC, reg_max=16)]

        criterion = v8DetectionLoss(StandIn())
        boxes = torch.cat([m[:, :64].flatten(2) for m in maps], 2).requires_grad_()
        scores = torch.cat([m[:, 64:].flatten(2) for m in maps], 2).requires_grad_()
        preds = {"boxes": boxes, "scores": scores, "feats": maps}
        batch_dict = {
            "batch_idx": targets_norm[:, 0],
            "cls": targets_norm[:, 1:2],
            "bboxes": targets_norm[:, 2:6],
        }

        def step():
            boxes.grad = scores.grad = None
            criterion(preds, batch_dict)[0].sum().backward()

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
    before = rss_kib("VmRSS")
    step()
    peak_mib = (rss_kib("VmHWM") - before) / 1024

    step()  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "impl": impl,
        "targets": per_image,
        "cpu_s": statistics.median(cpu),
        "wall_s": statistics.median(wall),
        "peak_mib": peak_mib,
    }


def run_in_subprocess(impl: str, per_image: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--targets",
        str(per_image),
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    runs = []
    for _ in range(args.processes):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in ("cpu_s", "wall_s", "peak_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[10, 100, 400], help="boxes per image")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--worker", choices=["ours", "ultralytics"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(
            json.dumps(
                worker(args.worker, args.targets[0], args.batch, args.size, args.repeats, args.threads)
            )
        )
        return

    import torch

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    print(
        f"loss + assignment, forward + backward; batch {args.batch}, {args.size}x{args.size}, nc={NC}, "
        f"{threads} thread(s); medians over {args.processes} processes x {args.repeats} calls; "
        "peak = extra resident memory of one cold call"
    )
    header = (
        f"{'targets/img':>11} | {'ours cpu s':>10} {'ultra cpu s':>11} {'ratio':>6} | {'wall ratio':>10} | "
        f"{'ours MiB':>9} {'ultra MiB':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for per_image in args.targets:
        ours = run_in_subprocess("ours", per_image, args)
        theirs = run_in_subprocess("ultralytics", per_image, args)
        print(
            f"{per_image:>11} | {ours['cpu_s']:>10.3f} {theirs['cpu_s']:>11.3f} {ours['cpu_s'] / theirs['cpu_s']:>6.2f} | "
            f"{ours['wall_s'] / theirs['wall_s']:>10.2f} | {ours['peak_mib']:>9.1f} {theirs['peak_mib']:>9.1f} "
            f"{ours['peak_mib'] / max(theirs['peak_mib'], 1e-9):>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
