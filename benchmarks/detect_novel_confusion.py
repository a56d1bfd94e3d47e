"""What a class-incremental student calls the objects of the validation set: for every labelled object, the
class of the highest-scoring detection that overlaps it (IoU > 0.5), counted as right / a base class / another
novel class / nothing. It shows *where* novel mAP is lost: a teacher that has never seen the novel classes calls
nearly every novel aircraft one of its base classes, and a student distilled from it may keep that mistake.

Runs on the students of a ``benchmarks/detect_distill.py`` grid::

    python benchmarks/detect_novel_confusion.py --out runs/bench-distill-grid teacher K10-seed0-fine-tune \\
        K10-seed0-pseudo0.1+kl2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from detect_distill import ALL, BASE, ClassesAs, DetectionDataset, build_detector, collate, load_labels
from torchvision.ops import box_iou

from visiontrain.detect.inference import boxes_to_original
from visiontrain.detect.postprocess import postprocess


def confusion(ckpt: Path, data: Path, imgsz: int, batch: int) -> dict[str, dict[str, int]]:
    """``{"base" | "novel": {"right" | "base" | "other" | "none": count}}`` over the val split's objects."""
    val = DetectionDataset(load_labels(data, "test", class_names=ALL), "test", imgsz, augment=False)
    loader = torch.utils.data.DataLoader(val, batch_size=batch, shuffle=False, collate_fn=collate)
    gt = {r.image_id: r for r in val.labels.records}
    model = build_detector(ckpt)
    net = ClassesAs(model, list(model.names), ALL).eval()
    counts = {kind: dict.fromkeys(("right", "base", "other", "none"), 0) for kind in ("base", "novel")}
    with torch.no_grad():
        for images, _, metas in loader:
            for det, meta in zip(postprocess(net(images).float(), conf=0.001, iou=0.7, max_det=300), metas):
                det = boxes_to_original(det, meta["ratio"], meta["pad"], meta["orig_size"])
                rec = gt[meta["image_id"]]
                boxes = torch.as_tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
                iou = box_iou(boxes, det[:, :4])
                for i, cls in enumerate(int(c) for c in rec.classes):
                    kind = "base" if cls < len(BASE) else "novel"
                    hits = (iou[i] > 0.5).nonzero().flatten()
                    if not len(hits):
                        counts[kind]["none"] += 1
                        continue
                    pred = int(det[hits[det[hits, 4].argmax()], 5])
                    counts[kind]["right" if pred == cls else "base" if pred < len(BASE) else "other"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the grid's --out folder")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("runs", nargs="+", help="'teacher' or a folder name under <out>/students")
    args = ap.parse_args()
    out = Path(args.out)
    print("| run | novel: right | novel: a base class | novel: another novel | base: right | base: wrong |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        folder = out / "teacher" if run == "teacher" else out / "students" / run
        c = confusion(folder / "checkpoints" / "last.pt", out / "data", args.imgsz, args.batch)
        n, b = c["novel"], c["base"]
        print(f"| {run} | {n['right']} | {n['base']} | {n['other']} | {b['right']} | "
              f"{b['base'] + b['other']} |", flush=True)


if __name__ == "__main__":
    main()
