"""The flow task's verbs (``visiontrain <verb> flow key=value ...``): ``VERBS = {verb: (config, function)}``.

* ``train``   ``model=raft_small data=chairs:DIR [val_data=SPEC] crop=HxW ...`` (the engine's ``fit`` on a
  :class:`~visiontrain.flow.task.FlowTask`); ``method=unsupervised model=pwc data=frames:DIR`` for UFlow.
* ``eval``    ``weights=W data=SPEC`` prints a table and writes ``metrics.json`` (``epe``; ``1px``, ``3px``,
  ``5px``: share of pixels with EPE below 1/3/5 px; ``fl_all``: KITTI outlier rate; pixel-weighted, plus
  ``*_per_image``; what produced them under ``"source"``) and a few side-by-side PNGs.
* ``predict`` ``weights=W image1=A image2=B`` writes ``flow.flo`` and ``flow.png`` (``gt=`` adds the EPE and
  a side-by-side figure).
* ``synth``   ``out=DIR train=N val=N size=HxW seed=K`` writes a FlyingChairs-layout data set (the layered
  generator of :mod:`visiontrain.flow.synth`; ``gen.style=legacy`` the old one; ``gen.<factor>=false``
  switches one factor off).
* ``export``  ``weights=W format=onnx out=F.onnx size=HxW`` exports a PWC model (forward and backward flow,
  dynamic batch) and checks ONNX Runtime's outputs against PyTorch's.

For a PWC model, ``eval`` and ``predict`` also write occlusion masks as PNG (white = pixel of image 1 not
visible in image 2), estimated from the forward and backward flow (``occlusion=brox|wang``). ``eval`` and
``predict`` write into a new folder (``out``, else ``out2``, ``out3``...), so results never mix. Every
verb that takes ``weights=`` loads it through :func:`visiontrain.flow.inference.load_flow_model`; none
builds a training task.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.config import ConfigError
from visiontrain.engine.rundir import fresh_output_dir, write_report
from visiontrain.flow.checks import check_flow_datasets
from visiontrain.flow.config import (
    PWC_NAME,
    SYNTH_SIZE,
    SYNTH_TRAIN,
    SYNTH_VAL,
    FlowEvalConfig,
    FlowExportConfig,
    FlowPredictConfig,
    FlowSynthConfig,
    FlowTrainConfig,
)
from visiontrain.flow.data import FlowDataError, collate_flow, has_split, open_flow_dataset
from visiontrain.flow.inference import device_of, evaluate_flow, load_flow_model, occlusion_of, predict_flow
from visiontrain.flow.io import write_flo
from visiontrain.flow.metrics import FlowMetrics, format_metrics_table
from visiontrain.flow.sizes import format_size, parse_size
from visiontrain.flow.synthetic import synthetic_chairs_spec, write_synthetic_chairs
from visiontrain.flow.task import FlowTask
from visiontrain.flow.unsupervised import save_mask_png
from visiontrain.flow.viz import batch_figure, flow_to_color, save_png


def train(cfg: FlowTrainConfig) -> int:
    from visiontrain.engine.trainer import fit

    result = fit(FlowTask(cfg))
    metrics = result.get("metrics") or {}
    if metrics and result["is_main"]:
        print(format_metrics_table(metrics, f"final validation ({result['out']})"))
    return 0


def evaluate(cfg: FlowEvalConfig) -> int:
    device = device_of(cfg.device)
    loaded = load_flow_model(cfg.weights, cfg.model, device)
    model = loaded.model
    spec = cfg.data or synthetic_chairs_spec(cfg.synth_dir, SYNTH_TRAIN, SYNTH_VAL,
                                             parse_size(SYNTH_SIZE, "synth_size"), cfg.synth_seed, cfg.gen)
    split = cfg.split if has_split(spec, cfg.split) else "train"
    dataset = open_flow_dataset(spec, split)
    if not dataset.has_flow:
        raise FlowDataError(f"data={spec}: no ground-truth flow files to evaluate against")
    check_flow_datasets([(split, dataset)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                                         collate_fn=partial(collate_flow, pad=True))
    metrics = evaluate_flow(model, loader, cfg.num_flow_updates, cfg.tta)
    out = fresh_output_dir(cfg.out)
    with torch.no_grad():
        for i in range(min(cfg.pictures, len(dataset))):
            batch = collate_flow([dataset[i]])
            image1, image2 = batch["image1"].to(device), batch["image2"].to(device)
            pred = predict_flow(model, image1, image2, cfg.num_flow_updates, cfg.tta)
            save_png(out / f"sample_{i:03d}.png", batch_figure(batch, 0, pred[0], cfg.vis_max_error))
            if loaded.name == PWC_NAME:
                save_mask_png(occlusion_of(model, image1, image2, cfg.occlusion)[0], out / f"occlusion_{i:03d}.png")
    report = write_report(out / "metrics.json", metrics, weights=cfg.weights, data=spec, split=split,
                          model=loaded.name, num_flow_updates=cfg.num_flow_updates, tta=cfg.tta,
                          batch_size=cfg.batch_size)
    images = int(metrics["images"])
    print(format_metrics_table(metrics, f"{spec} ({split}, {images} image{'s' * (images != 1)}, {loaded.name})"))
    print(f"wrote {report}")
    return 0


def predict(cfg: FlowPredictConfig) -> int:
    device = device_of(cfg.device)
    loaded = load_flow_model(cfg.weights, cfg.model, device)
    dataset = open_flow_dataset(f"pair:{cfg.image1},{cfg.image2}" + (f",{cfg.gt}" if cfg.gt else ""))
    check_flow_datasets([("input", dataset)])
    batch = collate_flow([dataset[0]])
    image1, image2 = batch["image1"].to(device), batch["image2"].to(device)
    with torch.no_grad():
        pred = predict_flow(loaded.model, image1, image2, cfg.num_flow_updates, cfg.tta)[0]
    flow = pred.permute(1, 2, 0).cpu().numpy()
    out = fresh_output_dir(cfg.out)
    write_flo(out / "flow.flo", flow)
    save_png(out / "flow.png", flow_to_color(flow))
    print(f"wrote {out / 'flow.flo'} and {out / 'flow.png'} ({format_size(*flow.shape[:2])}, "
          f"max |flow| {np.linalg.norm(flow, axis=-1).max():.2f} px)")
    if loaded.name == PWC_NAME:
        occ = occlusion_of(loaded.model, image1, image2, cfg.occlusion)
        save_mask_png(occ[0], out / "occlusion.png")
        print(f"wrote {out / 'occlusion.png'} ({cfg.occlusion}: {100 * float(occ.mean()):.1f} % of pixels occluded)")
    if batch["flow"] is not None:
        save_png(out / "side_by_side.png", batch_figure(batch, 0, pred))
        meter = FlowMetrics()
        meter.update(pred[None], batch["flow"].to(device), batch["valid"].to(device))
        m = meter.compute()
        print(f"EPE {m['epe']:.3f} px; EPE below 1 / 3 / 5 px: {100 * m['1px']:.1f} / {100 * m['3px']:.1f} / "
              f"{100 * m['5px']:.1f} % of pixels; Fl-all outliers {100 * m['fl_all']:.1f} %; "
              f"wrote {out / 'side_by_side.png'}")
    return 0


def synth(cfg: FlowSynthConfig) -> int:
    out = write_synthetic_chairs(cfg.out, cfg.train, cfg.val, cfg.size_hw, cfg.seed, cfg.max_translation, cfg.gen)
    print(f"wrote {cfg.train} train + {cfg.val} val pairs ({format_size(*cfg.size_hw)}, {cfg.gen.style} generator) "
          f"to {out}; "
          f"train with data=chairs:{out}")
    return 0


def export(cfg: FlowExportConfig) -> int:
    from visiontrain.flow.models.pwc import export_flow_onnx

    loaded = load_flow_model(cfg.weights, "", "cpu")
    if loaded.name != PWC_NAME:
        raise ConfigError(f"{cfg.weights} holds a {loaded.name} model; ONNX export is offered for the PWC model "
                          f"(torchvision's RAFT loops over a data-dependent number of updates and is not exported)")
    size = cfg.size_hw or parse_size(loaded.config.get("unsup_size") or "384x512", "size")
    out = Path(cfg.out) if cfg.out else Path(cfg.weights).with_suffix(".onnx")
    export_flow_onnx(loaded.model, out, size, opset=cfg.opset)
    print(f"wrote {out} ({cfg.format}, opset {cfg.opset}; inputs image1, image2 [B, 3, {size[0]}, {size[1]}] in "
          f"[0, 1]; outputs flow_fw, flow_bw [B, 2, {size[0]}, {size[1]}] in pixels)")
    if cfg.check:
        check_onnx_export(loaded.model, out, size)
    return 0


def check_onnx_export(model: torch.nn.Module, path: Path, size: tuple[int, int], tolerance: float = 1e-3) -> None:
    """Run the exported graph in ONNX Runtime on a random batch of 2 ``[2, 3, H, W]`` and compare its
    ``flow_fw``, ``flow_bw`` with PyTorch's; a ``RuntimeError`` above ``tolerance`` pixels."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    image1, image2 = (torch.rand(2, 3, *size, generator=gen) for _ in range(2))
    with torch.no_grad():
        ref = model(image1, image2, backward=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image1": image1.numpy(), "image2": image2.numpy()})
    diff = max(float(np.abs(g - ref[k].numpy()).max()) for g, k in zip(got, ("flow_fw", "flow_bw")))
    print(f"ONNX Runtime vs PyTorch on a batch of 2: max abs difference {diff:.2e} px")
    if diff > tolerance:
        raise RuntimeError(f"{path}: ONNX Runtime's flow differs from PyTorch's by {diff:.2e} px (> {tolerance:g})")


VERBS: dict[str, tuple[type, Any]] = {
    "synth": (FlowSynthConfig, synth),
    "train": (FlowTrainConfig, train),
    "eval": (FlowEvalConfig, evaluate),
    "predict": (FlowPredictConfig, predict),
    "export": (FlowExportConfig, export),
}
__all__ = ["VERBS"]
