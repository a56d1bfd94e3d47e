"""Inference + NMS throughput: visiontrain YOLOv8 vs Ultralytics, side by side in one run (CPU), and ONNX
Runtime latency at batch 1.

Both models hold the same weights: an Ultralytics ``DetectionModel('yolov8n.yaml')`` with random weights is
saved the way Ultralytics saves, and ours is loaded from that file with ``load_ultralytics``. The class
biases are shifted so that about 1% of the anchors pass ``conf=0.25`` (a random network would otherwise
give NMS nothing to do). Both are fused (Ultralytics' predictor fuses too); timings exclude image
decoding and letterboxing, which are the same work for both.

Pipelines timed per batch (median of interleaved repeats):
  ultralytics    DetectionModel.fuse(), forward, ultralytics.utils.nms.non_max_suppression
  ours           YOLOv8.fuse(), forward, visiontrain.detect.postprocess.postprocess
  ours-cl        the same with channels-last weights (YOLOv8.prepare_for_inference())
  ours-cl-bf16   channels-last under torch.autocast('cpu', bfloat16), NMS in float32
  onnxruntime    the exported model (fused, float32) in ONNX Runtime + our NMS

Usage: python benchmarks/detect_infer.py [--scale n] [--imgsz 640] [--batches 8 1] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _nms_fn() -> Callable:
    try:
        from visiontrain.detect.postprocess import postprocess

        return postprocess
    except ImportError:  # TODO: drop once detect/postprocess.py has landed
        from torchvision.ops import batched_nms

        def postprocess(preds, conf=0.25, iou=0.7, max_det=300, agnostic=False):
            out = []
            for p in preds.transpose(1, 2):
                score, cls = p[:, 4:].max(1)
                keep = score > conf
                b, score, cls = p[keep, :4], score[keep], cls[keep]
                xyxy = torch.cat((b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2), 1)
                k = batched_nms(xyxy, score, cls, iou)[:max_det]
                out.append(torch.cat((xyxy[k], score[k, None], cls[k, None].float()), 1))
            return out

        return postprocess


def build_models(scale: str, imgsz: int, workdir: Path):
    from ultralytics import __version__
    from ultralytics.nn.tasks import DetectionModel

    from visiontrain.detect.inference import load_ultralytics

    torch.manual_seed(0)
    um = DetectionModel(f"yolov8{scale}.yaml", nc=80, verbose=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in um.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        # shift class biases so that ~1% of anchors score above 0.25 on random images
        x = torch.rand(2, 3, imgsz, imgsz, generator=g)
        best = um(x)[0][:, 4:].max(1).values.flatten()
        logit = torch.logit(best.double().clamp(1e-12, 1 - 1e-12))
        shift = float(torch.logit(torch.tensor(0.25, dtype=torch.float64)) - logit.quantile(0.99))
        for seq in um.model[-1].cv3:
            seq[-1].bias += shift
    path = workdir / f"yolov8{scale}.pt"
    torch.save(
        {
            "model": copy.deepcopy(um).half(),
            "ema": None,
            "train_args": {},
            "date": datetime.datetime.now().isoformat(),
            "version": __version__,
        },
        path,
    )
    theirs = (
        torch.load(path, map_location="cpu", weights_only=False)["model"].float().eval().fuse(verbose=False)
    )
    ours = load_ultralytics(path).eval().fuse()
    return theirs, ours


def timed(fn: Callable[[], object], results: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    results.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="n")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ultralytics.utils.nms import non_max_suppression

    from visiontrain.detect.export import OnnxDetector, export_onnx

    postprocess = _nms_fn()
    conf, iou, max_det = 0.25, 0.7, 300
    workdir = Path(tempfile.mkdtemp(prefix="detect_infer_"))
    theirs, ours = build_models(args.scale, args.imgsz, workdir)
    ours_cl = copy.deepcopy(ours).prepare_for_inference(channels_last=True)

    def ours_bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            preds = ours_cl(x)
        return postprocess(preds.float(), conf=conf, iou=iou, max_det=max_det)

    pipelines: dict[str, Callable[[torch.Tensor], list]] = {
        "ultralytics": lambda x: non_max_suppression(theirs(x)[0], conf, iou, max_det=max_det),
        "ours": lambda x: postprocess(ours(x), conf=conf, iou=iou, max_det=max_det),
        "ours-cl": lambda x: postprocess(ours_cl(x), conf=conf, iou=iou, max_det=max_det),
    }
    if not args.no_bf16:
        pipelines["ours-cl-bf16"] = ours_bf16
    onnx = None
    if not args.no_onnx:
        t0 = time.perf_counter()
        onnx_path = export_onnx(ours, workdir / "model.onnx", imgsz=args.imgsz)
        print(f"ONNX export (legacy TorchScript exporter): {time.perf_counter() - t0:.1f} s")
        onnx = OnnxDetector(onnx_path, threads=args.threads)
        pipelines["onnxruntime"] = lambda x: postprocess(onnx(x), conf=conf, iou=iou, max_det=max_det)

    print(
        f"YOLOv8{args.scale} {args.imgsz}x{args.imgsz}, CPU, {args.threads} threads, torch {torch.__version__}, "
        f"conf={conf} iou={iou}; median of {args.repeats} interleaved repeats"
    )
    rows = []
    g = torch.Generator().manual_seed(1)
    for batch in args.batches:
        x = torch.rand(batch, 3, args.imgsz, args.imgsz, generator=g)
        times: dict[str, list[float]] = {k: [] for k in pipelines}
        with torch.inference_mode():
            counts = {k: sum(len(d) for d in fn(x)) for k, fn in pipelines.items()}  # warm-up
            for r in range(args.repeats):
                order = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))
                for k in order:
                    timed(lambda k=k, x=x: pipelines[k](x), times[k])
        base = statistics.median(times["ultralytics"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append((batch, k, med, batch / med, med / base, counts[k]))
    # ONNX Runtime latency of the model alone at batch 1
    onnx_model_only = None
    if onnx is not None:
        x1 = torch.rand(1, 3, args.imgsz, args.imgsz, generator=g).numpy()
        onnx(x1)
        ts = []
        for _ in range(max(args.repeats, 5)):
            timed(lambda: onnx(x1), ts)
        onnx_model_only = statistics.median(ts)

    print(
        f"\n{'batch':>5}  {'pipeline':<14} {'s/batch':>9} {'img/s':>8} {'time vs ultralytics':>20} {'detections':>11}"
    )
    for batch, k, med, ips, ratio, n in rows:
        print(f"{batch:>5}  {k:<14} {med:>9.3f} {ips:>8.2f} {ratio:>20.2f} {n:>11}")
    if onnx_model_only is not None:
        print(f"\nONNX Runtime latency, batch 1, model only: {onnx_model_only * 1000:.1f} ms")


if __name__ == "__main__":
    main()
