"""Pair by pair: on how many pairs does a RAFT checkpoint beat OpenCV DIS (issue 18)?

    python benchmarks/flow_pairwise.py --weights A.pt [B.pt ...] --sets CHECK_DIR HELDOUT_DIR [--iters 6]

A mean EPE can hide a model that is far better on a few pairs and worse on most. For every chairs-layout
folder in ``--sets`` (the val split: the real-texture check, the fine-tuning benchmark's held-out set) this
scores each pair with DIS fast, DIS medium and every ``--weights`` model (fp32, batch 1), and prints per
model and set: mean EPE, the median of the per-pair EPE differences to DIS fast, and the number of pairs on
which the model's EPE is lower than DIS fast's and DIS medium's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from flow_supervised import dis_flow

from visiontrain.flow.data import open_flow_dataset
from visiontrain.flow.inference import load_flow_model, predict_flow
from visiontrain.flow.metrics import flow_metrics


def pair_epe(flow: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean end-point error over the valid pixels of one pair (``[2, H, W]`` flows, ``[H, W]`` mask)."""
    sums = flow_metrics(flow[None], gt[None], valid[None])
    return float(sums["epe"][0] / sums["pixels"][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", required=True, help="RAFT checkpoints")
    ap.add_argument("--sets", nargs="+", required=True, help="chairs-layout folders (their val split is scored)")
    ap.add_argument("--iters", type=int, default=6, help="RAFT updates")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    models = {w: load_flow_model(w, "", "cpu").model.eval() for w in a.weights}
    print(f"| set | model | pairs | mean EPE | DIS fast | DIS medium | median (model − DIS fast) "
          f"| pairs better than DIS fast | than DIS medium |\n|{'---|' * 9}")
    for folder in a.sets:
        val = open_flow_dataset(f"chairs:{folder}", "val")
        dis: dict[str, list[float]] = {"fast": [], "medium": []}
        ours: dict[str, list[float]] = {w: [] for w in models}
        for i in range(len(val)):
            t = val[i]  # what evaluation feeds the model: images [3, H, W] in [0, 1], flow [2, H, W], valid [H, W]
            gt, valid = t["flow"], t["valid"]
            image1, image2 = t["image1"][None], t["image2"][None]
            hwc = [x.permute(1, 2, 0).numpy() for x in (t["image1"], t["image2"])]  # DIS takes H×W×3
            for preset in dis:
                dis[preset].append(pair_epe(torch.from_numpy(dis_flow(*hwc, preset)).permute(2, 0, 1), gt, valid))
            with torch.no_grad():
                for w, model in models.items():
                    ours[w].append(pair_epe(predict_flow(model, image1, image2, a.iters)[0], gt, valid))
        n = len(val)
        for w, epes in ours.items():
            diff = statistics.median(e - f for e, f in zip(epes, dis["fast"]))
            beat_fast = sum(e < f for e, f in zip(epes, dis["fast"]))
            beat_medium = sum(e < m for e, m in zip(epes, dis["medium"]))
            print(f"| {Path(folder).name} | {w} | {n} | {statistics.fmean(epes):.3f} | "
                  f"{statistics.fmean(dis['fast']):.3f} | {statistics.fmean(dis['medium']):.3f} | {diff:+.3f} | "
                  f"{beat_fast} of {n} | {beat_medium} of {n} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
