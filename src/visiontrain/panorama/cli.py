"""The panorama task's command-line verbs: ``VERBS = {verb: (config schema, function)}``.

* ``synth out=DIR train=N val=N size=H seed=K`` — write synthetic equirectangular JPEGs (H×2H).
* ``train`` — the engine trains :class:`.task.PanoramaTask`; with no ``data=`` a small synthetic set is written
  once first (``synth_*`` keys).
* ``eval weights=W [data=DIR]`` — the model (sampler settings: the checkpoint's unless given) and the
  back-projection baseline on the val set; prints a table and writes ``metrics.json`` (metrics at the top
  level, what produced them under ``"source"``) into ``out`` (or ``out2``… when ``out`` holds results).
* ``predict weights=W views=F,R,B,L`` (four square fisheye images) or ``panorama=IMG`` (render the four views
  from a 2:1 panorama first; then the ground truth is shown) — writes ``panorama.png`` and ``figure.png``
  (and the rendered ``view_*.png``) into a fresh ``out``.

``eval`` and ``predict`` load the model through :func:`.inference.load_trained` (EMA weights preferred,
architecture from the checkpoint). Every function takes its config and returns the exit status.
"""

from __future__ import annotations

from pathlib import Path

import torch

from visiontrain.engine.logging import format_value
from visiontrain.engine.rundir import fresh_output_dir, write_report
from visiontrain.panorama.config import (
    PanoramaEvalConfig,
    PanoramaPredictConfig,
    PanoramaSynthConfig,
    PanoramaTrainConfig,
)
from visiontrain.panorama.metrics import BASIC, REGIONS, metric_key


def size_text(height: int) -> str:
    """A panorama's size as ``H×W`` (``W = 2H``)."""
    return f"{height}×{2 * height}"


def format_metrics_table(metrics: dict[str, float]) -> str:
    """The model's and the baseline's metrics, one row each per metric, a column per region; then
    the seam (``seam``, ``seam_truth``, ``seam_ratio``, ``baseline_seam_ratio``), ``val_flow``, ``lpips``,
    ``fid`` when present. Numbers to 4 significant digits."""
    lines = [f"{'':16}" + "".join(f"{r:>10}" for r in REGIONS)]
    for who, prefix in (("model", ""), ("baseline", "baseline_")):
        for name in BASIC:
            values = [metrics.get(metric_key(name, r, prefix), float("nan")) for r in REGIONS]
            lines.append(f"{who + ' ' + name:16}" + "".join(f"{format_value(v):>10}" for v in values))
    keys = ("seam", "seam_truth", "seam_ratio", "baseline_seam_ratio", "val_flow", "lpips", "fid")
    lines += [f"{k:20}{format_value(metrics[k]):>10}" for k in keys if k in metrics]
    return "\n".join(lines)


def synth_verb(cfg: PanoramaSynthConfig) -> int:
    from visiontrain.panorama.synthetic import write_synthetic_panoramas

    written = write_synthetic_panoramas(cfg.out, cfg.train, cfg.val, cfg.size, cfg.seed)
    print(f"wrote {len(written['train'])} train and {len(written['val'])} val panoramas "
          f"({size_text(cfg.size)}) to {cfg.out}")
    return 0


def train_verb(cfg: PanoramaTrainConfig) -> int:
    from visiontrain.engine.trainer import fit
    from visiontrain.panorama.inference import resumed_model_keys
    from visiontrain.panorama.task import PanoramaTask

    result = fit(PanoramaTask(resumed_model_keys(cfg)))
    if result["is_main"]:
        best = "none (no evaluation)" if result["best"] is None else format_value(result["best"])
        print(f"run {result['out']}: best {PanoramaTask.primary_metric} {best} at step {result['best_step']}")
    return 0


def eval_verb(cfg: PanoramaEvalConfig) -> int:
    from visiontrain.engine.distributed import resolve_device
    from visiontrain.panorama.data import PanoramaDataset, check_panorama_files, config_images, data_root
    from visiontrain.panorama.evaluation import evaluate_panoramas
    from visiontrain.panorama.inference import evaluation_generator, load_trained

    trained = load_trained(cfg.weights, resolve_device(cfg.device))
    h = trained.model.cfg.pano_size
    sampler = trained.sampler(cfg.sample_steps, cfg.t_pow_shift, cfg.temperature)
    camera = trained.camera(cfg.xi, cfg.focal)
    _, val_paths = config_images(cfg)
    check_panorama_files(("val", val_paths))
    val = PanoramaDataset(val_paths, h, camera, train=False, seed=cfg.seed, check=False)
    loader = torch.utils.data.DataLoader(val, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    data = str(data_root(cfg))
    print(f"evaluating {cfg.weights} on {len(val)} val panoramas of {data} at {size_text(h)}: "
          f"{sampler.steps} Euler steps, temperature {format_value(sampler.temperature)}, seed {cfg.seed}")
    metrics = evaluate_panoramas(trained.model, loader, sampler, evaluation_generator(cfg.seed),
                                 trained.setting("logit_mean"), trained.setting("logit_std"),
                                 cfg.lpips_weights, cfg.fid_weights)
    print(format_metrics_table(metrics))
    path = write_report(fresh_output_dir(cfg.out) / "metrics.json", metrics, weights=cfg.weights, data=data,
                        split="val", images=len(val), size=size_text(h), sample_steps=sampler.steps,
                        temperature=sampler.temperature, t_pow_shift=sampler.t_pow_shift, xi=camera.xi,
                        focal=camera.focal, seed=cfg.seed)
    print(f"wrote {path}")
    return 0


def predict_verb(cfg: PanoramaPredictConfig) -> int:
    from visiontrain.engine.distributed import resolve_device
    from visiontrain.panorama.baseline import backprojection_baseline
    from visiontrain.panorama.camera import VIEW_NAMES
    from visiontrain.panorama.data import PanoramaDataset, check_panorama_file, read_view_images
    from visiontrain.panorama.inference import evaluation_generator, load_trained
    from visiontrain.panorama.viz import save_image, save_panorama_figure

    trained = load_trained(cfg.weights, resolve_device(cfg.device))
    m = trained.model.cfg
    camera = trained.camera(cfg.xi, cfg.focal)
    truth = None
    if cfg.panorama:  # render the four views from it, as the val set does
        check_panorama_file(Path(cfg.panorama))
        sample = PanoramaDataset([Path(cfg.panorama)], m.pano_size, camera, train=False, check=False)[0]
        views, cams, truth = sample["views"], sample["cameras"][None], sample["panorama"]
    else:
        views = read_view_images(cfg.view_paths(), m.view_size)
        cams = torch.from_numpy(camera.fixed()).float()[None]  # [1, 4, 5]
    sampler = trained.sampler(cfg.sample_steps, cfg.t_pow_shift, cfg.temperature)
    pred = sampler.generate(trained.model, views[None], cams, evaluation_generator(cfg.seed, 0)).cpu()[0]
    baseline, seen = backprojection_baseline(views[None], cams, m.pano_size)
    out = fresh_output_dir(cfg.out)
    save_image(out / "panorama.png", pred)
    panels = {"generated": pred, "back-projection baseline": baseline[0]}
    if truth is not None:
        panels["ground truth"] = truth
        for name, view in zip(VIEW_NAMES, views):
            save_image(out / f"view_{name}.png", view)
    save_panorama_figure(out / "figure.png", views, panels, seen[0])
    print(f"wrote {out / 'panorama.png'} ({size_text(m.pano_size)}, {sampler.steps} Euler steps, temperature "
          f"{format_value(sampler.temperature)}) and {out / 'figure.png'}")
    return 0


VERBS = {
    "synth": (PanoramaSynthConfig, synth_verb),
    "train": (PanoramaTrainConfig, train_verb),
    "eval": (PanoramaEvalConfig, eval_verb),
    "predict": (PanoramaPredictConfig, predict_verb),
}
