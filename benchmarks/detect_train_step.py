"""YOLOv8n training step (forward + loss + backward + optimizer step) vs Ultralytics, in one process.

    python benchmarks/detect_train_step.py [--batch 8] [--imgsz 640] [--repeats 5] [--obb]

Same random images and targets for both. Ultralytics: ``DetectionModel('yolov8n.yaml')`` with its own
``v8DetectionLoss`` through ``model.loss(batch)``, fp32 (what its trainer does on CPU). Ours:
``YOLOv8('n')`` + ``DetectionLoss``, fp32 contiguous, fp32 channels-last (the detect task's default),
and bf16 autocast + channels-last. SGD for all. Times are the best of ``repeats`` steps after a warmup
step, alternating between the variants so machine load hits all of them alike.

``--obb``: the oriented-box model instead (issue 19): Ultralytics ``OBBModel('yolov8n-obb.yaml')`` with its
``v8OBBLoss`` against ours ``YOLOv8OBB('n')`` + ``OBBLoss``; the same random rotated targets (any angle).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch


def make_batch(b: int, s: int, nc: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, s, s, generator=g)
    n = 6 * b
    idx = torch.arange(n) // 6  # sorted by image, as Ultralytics batches are
    cls = torch.randint(0, nc, (n,), generator=g).float()
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
    xyxy = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) * s
    ours = torch.cat([idx[:, None].float(), cls[:, None], xyxy], 1)
    ultra = {"img": images, "batch_idx": idx.float(), "cls": cls[:, None], "bboxes": torch.cat([cxcy, wh], 1)}
    return images, ours, ultra


def make_obb_batch(b: int, s: int, nc: int, seed: int = 0):
    """Rotated targets: ours ``[n, 7]`` (image, class, cx, cy, w, h in px, angle in rad), Ultralytics' batch
    (``bboxes`` normalised xywh + angle)."""
    import math

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, s, s, generator=g)
    n = 6 * b
    idx = torch.arange(n) // 6
    cls = torch.randint(0, nc, (n,), generator=g).float()
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
    angle = (torch.rand(n, 1, generator=g) - 0.25) * math.pi
    ours = torch.cat([idx[:, None].float(), cls[:, None], cxcy * s, wh * s, angle], 1)
    ultra = {"img": images, "batch_idx": idx.float(), "cls": cls[:, None], "bboxes": torch.cat([cxcy, wh, angle], 1)}
    return images, ours, ultra


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: visiontrain.engine.runtime.tune_allocator() for the whole process (all variants, "
                         "Ultralytics included, as the visiontrain Trainer does); default: glibc as it comes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--obb", action="store_true", help="YOLOv8n-OBB (oriented boxes) instead of YOLOv8n")
    ap.add_argument("--bf16-anyway", action="store_true", help="time the bf16 row also where bf16 is slower")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (with --threads 1, less sensitive to other processes on a shared machine)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    if a.malloc == "tuned":
        from visiontrain.engine.runtime import tune_allocator

        assert tune_allocator(), "mallopt failed"
    from ultralytics.nn.tasks import DetectionModel, OBBModel

    from visiontrain.detect.loss import DetectionLoss
    from visiontrain.detect.model import YOLOv8
    from visiontrain.detect.obb.loss import OBBLoss
    from visiontrain.detect.obb.model import YOLOv8OBB
    from visiontrain.engine.runtime import cpu_bf16_speedup, cpu_description

    nc = 20
    images, targets, ubatch = (make_obb_batch if a.obb else make_batch)(a.batch, a.imgsz, nc)
    torch.manual_seed(0)
    if a.obb:
        um = OBBModel("yolov8n-obb.yaml", nc=nc, verbose=False).train()
        um.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, angle=1.0)
    else:
        um = DetectionModel("yolov8n.yaml", nc=nc, verbose=False).train()
        um.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    model_cls, loss_cls = (YOLOv8OBB, OBBLoss) if a.obb else (YOLOv8, DetectionLoss)
    u_opt = torch.optim.SGD(um.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def ultra_step():
        loss, _ = um.loss(ubatch)
        loss.sum().backward()
        u_opt.step()
        u_opt.zero_grad(set_to_none=True)

    variants = {"ultralytics fp32": ultra_step}
    rows = [("ours fp32", False, False), ("ours fp32 channels-last", True, False),
            ("ours bf16 channels-last", True, True)]
    if cpu_bf16_speedup() < 1 and not a.bf16_anyway:  # emulated bf16: minutes per step at 640, and no figure
        print(f"bf16 row skipped: bf16 convolutions run at {cpu_bf16_speedup():.2f}x fp32 speed on this CPU "
              f"(--bf16-anyway runs it)")
        rows = rows[:2]
    for name, cl, bf16 in rows:
        m = model_cls("n", nc=nc).train()
        x = images
        if cl:
            m = m.to(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
        crit = loss_cls(nc)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

        def step(m=m, x=x, crit=crit, opt=opt, bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                preds = m(x)
            sum(crit(preds, targets, (a.imgsz, a.imgsz)).values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        variants[name] = step
    for f in variants.values():
        f()  # warmup
    times = {k: [] for k in variants}
    for _ in range(a.repeats):
        for k, f in variants.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    base = min(times["ultralytics fp32"])
    print(f"yolov8n{'-obb' if a.obb else ''} train step, batch {a.batch}, {a.imgsz}x{a.imgsz}, threads {torch.get_num_threads()}, "
          f"malloc {a.malloc}, {a.clock} clock, bf16/fp32 convolution speed on this CPU "
          f"{cpu_bf16_speedup():.2f}x (the bf16 row depends on it)\nCPU: {cpu_description()}")
    print(f"{'variant':<28}{'s/step':>9}{'vs Ultralytics':>16}")
    for k, ts in times.items():
        print(f"{k:<28}{min(ts):>9.3f}{min(ts) / base:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
