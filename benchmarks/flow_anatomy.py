"""Where a RAFT checkpoint's error comes from, beside OpenCV DIS (issue 18).

    python benchmarks/flow_anatomy.py --weights A.pt [B.pt ...] --sets VAL_DIR CHECK_DIR ... [--iters 6]

``flow_pairwise.py`` says on how many pairs a model beats DIS; this says why. For every chairs-layout folder in
``--sets`` (its val split) and every method (DIS fast / medium, each model, each model with ``tta=hflip``, the
horizontal-flip test-time average of ``eval`` / ``predict``), per pair:

* the EPE over all valid pixels, over *interior* pixels (farther than ``--margin`` px from a motion boundary,
  i.e. a pixel whose ground-truth flow differs from a neighbour's by more than 0.5 px) and over the rest;
* 1px: the share of interior pixels within 1 px of the ground truth;
* scale: ``sum(pred . gt) / sum(gt . gt)`` over interior pixels (1 = right magnitude on average; below 1 = the
  model shrinks the motion);
* the number of pairs on which the method's EPE is lower than DIS fast's.

Printed are the means over the pairs of each set (the scale: its median). Ground truth is read only to score.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from flow_supervised import dis_flow

from visiontrain.flow.data import open_flow_dataset
from visiontrain.flow.inference import load_flow_model, predict_flow


def interior_mask(gt: torch.Tensor, valid: torch.Tensor, margin: int) -> torch.Tensor:
    """``[H, W]`` bool: valid pixels farther than ``margin`` px from a motion boundary (a jump > 0.5 px
    between 4-neighbours' ground-truth flows)."""
    jump = torch.zeros(gt.shape[-2:], dtype=torch.bool)
    dx = (gt[:, :, 1:] - gt[:, :, :-1]).norm(dim=0) > 0.5
    dy = (gt[:, 1:, :] - gt[:, :-1, :]).norm(dim=0) > 0.5
    jump[:, 1:] |= dx
    jump[:, :-1] |= dx
    jump[1:, :] |= dy
    jump[:-1, :] |= dy
    near = F.max_pool2d(jump[None, None].float(), 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0
    return valid.bool() & ~near


def pair_stats(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, interior: torch.Tensor) -> dict[str, float]:
    err = (pred - gt).norm(dim=0)
    edge = valid.bool() & ~interior
    dot = (pred * gt).sum(0)
    return {"epe": float(err[valid.bool()].mean()),
            "interior": float(err[interior].mean()) if interior.any() else float("nan"),
            "edge": float(err[edge].mean()) if edge.any() else float("nan"),
            "1px": float((err[interior] < 1).float().mean()) if interior.any() else float("nan"),
            "scale": float(dot[interior].sum() / (gt * gt).sum(0)[interior].sum().clamp(min=1e-6))}


def label(weights: str) -> str:
    """A checkpoint's name in the table: its path without ``checkpoints/<file>``."""
    path = Path(weights)
    return str(path.parent.parent if path.parent.name == "checkpoints" else path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", required=True, help="RAFT checkpoints")
    ap.add_argument("--sets", nargs="+", required=True, help="chairs-layout folders (their val split is scored)")
    ap.add_argument("--iters", type=int, nargs="+", default=[6], help="RAFT updates (one per checkpoint, or one)")
    ap.add_argument("--margin", type=int, default=4, help="px from a motion boundary that count as 'edge'")
    ap.add_argument("--no-flip", action="store_true", help="skip the flip test-time average")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    iters = a.iters * len(a.weights) if len(a.iters) == 1 else a.iters
    if len(iters) != len(a.weights):
        ap.error("--iters: give one count, or one per checkpoint")
    models = {f"{label(w)}@{n}": (load_flow_model(w, "", "cpu").model.eval(), n) for w, n in zip(a.weights, iters)}
    if len(models) != len(a.weights):
        ap.error("--weights: give each checkpoint once (with its own --iters)")
    print("| set | method | mean EPE | interior EPE | edge EPE | interior 1px | median scale | pairs better than DIS fast |")
    print(f"|{'---|' * 8}")
    for folder in a.sets:
        val = open_flow_dataset(f"chairs:{folder}", "val")
        rows: dict[str, list[dict[str, float]]] = {}
        interior_share = []
        for i in range(len(val)):
            t = val[i]
            gt, valid = t["flow"], t["valid"]
            interior = interior_mask(gt, valid, a.margin)
            interior_share.append(float(interior.sum() / valid.bool().sum()))
            image1, image2 = t["image1"][None], t["image2"][None]
            hwc = [x.permute(1, 2, 0).numpy() for x in (t["image1"], t["image2"])]
            preds = {f"DIS {p}": torch.from_numpy(dis_flow(*hwc, p)).permute(2, 0, 1) for p in ("fast", "medium")}
            with torch.no_grad():
                for name, (model, n) in models.items():
                    preds[name] = predict_flow(model, image1, image2, n)[0]
                    if not a.no_flip:
                        preds[f"{name} + flip"] = predict_flow(model, image1, image2, n, tta="hflip")[0]
            for name, pred in preds.items():
                rows.setdefault(name, []).append(pair_stats(pred, gt, valid, interior))
        fast = [r["epe"] for r in rows["DIS fast"]]
        for name, stats in rows.items():
            mean = {k: statistics.fmean(s[k] for s in stats if s[k] == s[k]) for k in ("epe", "interior", "edge", "1px")}
            scale = statistics.median(s["scale"] for s in stats)
            better = sum(s["epe"] < f for s, f in zip(stats, fast))
            print(f"| {Path(folder).name} | {name} | {mean['epe']:.3f} | {mean['interior']:.3f} | {mean['edge']:.3f} | "
                  f"{100 * mean['1px']:.1f} % | {scale:.3f} | {better} of {len(stats)} |", flush=True)
        print(f"({Path(folder).name}: {len(val)} pairs, interior = {100 * statistics.fmean(interior_share):.0f} % of "
              f"valid pixels on average)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
