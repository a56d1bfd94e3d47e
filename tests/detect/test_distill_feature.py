"""The neck terms of ``distill.feature`` (l2, mgd, pkd) against float64 loop references, and the Distiller
with each method: its student-side modules, its named term, gradients, and a loader that drops the modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.config import ConfigError, load_config
from visiontrain.detect.config import DetectTrainConfig
from visiontrain.detect.distill import (
    Distiller,
    DistillError,
    MGDGenerator,
    Projector,
    level_scores,
    mgd_loss,
    pkd_loss,
    random_masks,
    score_weighted_l2_loss,
)
from visiontrain.detect.inference import build_detector
from visiontrain.detect.loss import DetectionLoss
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.weights import ADAPTERS

from .test_distill import ALL, BASE, _batch, _random_detector, save_detect_checkpoint


def _maps(seed: int, shapes=((2, 3, 4, 5), (2, 3, 2, 3))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 1.5 + 0.3 for s in shapes]


# ---- float64 references, written with explicit loops ------------------------------------------

def ref_l2(s: np.ndarray, t: np.ndarray, w: np.ndarray) -> float:
    b, c, h, wd = s.shape
    num = den = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(wd):
                mse = sum((s[i, k, y, x] - t[i, k, y, x]) ** 2 for k in range(c)) / c
                num += w[i, y, x] * mse
                den += w[i, y, x]
    return num / den


def ref_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' convolution of one ``[C, H, W]`` map, odd square kernel."""
    c_out, c_in, k, _ = weight.shape
    p = k // 2
    _, h, wd = x.shape
    pad = np.zeros((c_in, h + 2 * p, wd + 2 * p))
    pad[:, p:p + h, p:p + wd] = x
    out = np.zeros((c_out, h, wd))
    for o in range(c_out):
        for y in range(h):
            for xx in range(wd):
                out[o, y, xx] = bias[o] + sum(pad[i, y + dy, xx + dx] * weight[o, i, dy, dx]
                                              for i in range(c_in) for dy in range(k) for dx in range(k))
    return out


def ref_mgd(s: np.ndarray, t: np.ndarray, mask: np.ndarray, gen: MGDGenerator) -> float:
    params = {k: v.detach().double().numpy() for k, v in gen.state_dict().items()}
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        x = s[i]
        if gen.align is not None:
            x = ref_conv(x, params["align.weight"], params["align.bias"])
        x = x * mask[i, 0][None]
        x = np.maximum(ref_conv(x, params["generation.0.weight"], params["generation.0.bias"]), 0)
        x = ref_conv(x, params["generation.2.weight"], params["generation.2.bias"])
        total += float(((x - t[i]) ** 2).sum())
        count += x.size
    return total / count


def ref_pkd(s: np.ndarray, t: np.ndarray) -> float:
    """mean over channels of 1 - Pearson r (over batch and positions)."""
    c = s.shape[1]
    return float(np.mean([1 - np.corrcoef(s[:, k].ravel(), t[:, k].ravel())[0, 1] for k in range(c)]))


def test_score_weighted_l2_matches_float64_reference():
    s, t = _maps(0), _maps(1)
    g = torch.Generator().manual_seed(2)
    w = [torch.rand(f.shape[0], *f.shape[2:], generator=g) for f in s]
    got = score_weighted_l2_loss(s, t, w)
    want = sum(ref_l2(a.double().numpy(), b.double().numpy(), c.double().numpy()) for a, b, c in zip(s, t, w))
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert score_weighted_l2_loss(t, t, w).item() == 0.0
    # all weight on one position: the mean squared error over channels there
    w1 = torch.zeros(2, 4, 5)
    w1[1, 2, 3] = 0.7
    want1 = float(((s[0][1, :, 2, 3] - t[0][1, :, 2, 3]) ** 2).mean())
    assert score_weighted_l2_loss(s[0], t[0], w1).item() == pytest.approx(want1, rel=1e-5)
    with pytest.raises(DistillError, match=r"\[B, H, W\]"):
        score_weighted_l2_loss(s[0], t[0], torch.ones(2, 5, 4))


def test_level_scores_split_the_teacher_confidence_by_level():
    logits = torch.randn(2, 3, 4 * 5 + 2 * 3)
    a, b = level_scores(logits, [(4, 5), (2, 3)])
    assert a.shape == (2, 4, 5) and b.shape == (2, 2, 3)
    torch.testing.assert_close(a[1, 2, 3], logits[1, :, 2 * 5 + 3].sigmoid().max())
    torch.testing.assert_close(b[0, 1, 2], logits[0, :, 20 + 1 * 3 + 2].sigmoid().max())


@pytest.mark.parametrize("c_student", [3, 2])  # 2: a 1x1 align first (student narrower than the teacher)
def test_mgd_matches_float64_reference(c_student):
    torch.manual_seed(0)
    s = [m[:, :c_student] for m in _maps(3)]
    t = _maps(4)
    gens = [MGDGenerator(c_student, 3) for _ in s]
    assert (gens[0].align is None) == (c_student == 3)
    masks = random_masks(s, 0.5)
    assert all(m.shape == (2, 1, *f.shape[2:]) and set(m.unique().tolist()) <= {0.0, 1.0} for m, f in zip(masks, s))
    got = mgd_loss(s, t, gens, masks)
    want = sum(ref_mgd(a.double().numpy(), b.double().numpy(), m.double().numpy(), g)
               for a, b, m, g in zip(s, t, masks, gens))
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert all(p.grad is not None for g in gens for p in g.parameters())


def test_random_masks_hide_the_requested_fraction():
    torch.manual_seed(0)
    (m,) = random_masks([torch.zeros(8, 4, 50, 50)], 0.65)
    assert (1 - m.mean().item()) == pytest.approx(0.65, abs=0.01)
    assert random_masks([torch.zeros(1, 1, 3, 3)], 0.0)[0].min() == 1


def test_pkd_matches_float64_reference():
    s, t = _maps(5), _maps(6)
    got = pkd_loss(s, t)
    want = sum(ref_pkd(a.double().numpy(), b.double().numpy()) for a, b in zip(s, t))
    assert got.item() == pytest.approx(want, rel=1e-4)
    # a per-channel affine change of the student (positive gain) costs nothing: only the pattern counts
    gain, shift = torch.tensor([0.5, 3.0, 7.0]).view(1, 3, 1, 1), torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1)
    assert pkd_loss([f * gain + shift for f in t], t).item() == pytest.approx(0.0, abs=1e-5)
    assert pkd_loss([-f for f in t], t).item() == pytest.approx(2.0 * len(t), rel=1e-5)  # r = -1


def test_projector_maps_student_to_teacher_width():
    assert Projector(4, 6)(torch.zeros(1, 4, 3, 3)).shape == (1, 6, 3, 3)


# ---- the distiller with every method ------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_detect_checkpoint(_random_detector(10, 0, names=BASE), tmp_path_factory.mktemp("t") / "t.pt", BASE)


MODULES = {"cwd": None, "pkd": None, "l2": Projector, "mgd": MGDGenerator, "none": None}


@pytest.mark.parametrize("feature", ["l2", "mgd", "pkd", "none"])
def test_distiller_with_each_feature_method(teacher_path, feature):
    torch.manual_seed(0)
    d = Distiller(build_detector(teacher_path), BASE, ALL, kl=1.0, dfl=0.5, feature=feature, l2=2.0, mgd=3.0, pkd=4.0)
    student = d.attach(YOLOv8("n", nc=20, names=ALL)).train()
    modules = getattr(student, ADAPTERS, None)
    if MODULES[feature] is None:
        assert modules is None
    else:
        assert len(modules) == 3 and all(isinstance(m, MODULES[feature]) for m in modules)
    images, targets = _batch()
    terms = d.training_step(student, images, targets, DetectionLoss(20))
    expected = {"box", "cls", "dfl", "kl", "dfl_kd"} | ({feature} if feature != "none" else set())
    assert set(terms) == expected
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    if modules is not None:
        assert all(p.grad is not None for p in modules.parameters())  # they train with the student
        assert sum(p.grad.abs().sum() for p in modules.parameters()) > 0
    assert all(p.grad is None for p in d.teacher.parameters())


@pytest.mark.parametrize("feature", ["cwd", "pkd"])
def test_same_scale_student_starts_with_zero_feature_term(teacher_path, feature):
    d = Distiller(build_detector(teacher_path), BASE, ALL, feature=feature)
    student = d.attach(YOLOv8("n", nc=20, names=ALL)).train()
    for m in student.modules():  # BN on running statistics, as the teacher
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    terms = d.training_step(student, *_batch(), DetectionLoss(20))
    assert terms[feature].item() < 1e-4


@pytest.mark.parametrize("feature", ["l2", "mgd"])
def test_student_side_modules_are_saved_and_dropped_by_the_loader(tmp_path, teacher_path, feature):
    d = Distiller(build_detector(teacher_path), BASE, ALL, feature=feature)
    student = d.attach(YOLOv8("s", nc=20, names=ALL))  # wider than the teacher: projector / align map 128 → 64
    path = save_detect_checkpoint(student, tmp_path / "student.pt", ALL)
    assert any(k.startswith(ADAPTERS) for k in torch.load(path, weights_only=True)["model"])
    det = build_detector(path)
    assert not hasattr(det, ADAPTERS) and det(torch.rand(1, 3, 64, 64)).shape[1] == 24


def test_feature_config_is_checked():
    cfg = load_config(DetectTrainConfig, None, ["distill.feature=mgd", "distill.mgd=3"])
    assert cfg.distill.feature == "mgd" and cfg.distill.mgd == 3
    with pytest.raises(ConfigError, match="Did you mean 'pkd'"):
        load_config(DetectTrainConfig, None, ["distill.feature=pdk"])
    with pytest.raises(ConfigError, match="mgd_mask"):
        load_config(DetectTrainConfig, None, ["distill.mgd_mask=1"])
    with pytest.raises(DistillError, match="feature='x'"):
        Distiller(_random_detector(10, 0, names=BASE), BASE, ALL, feature="x")


@pytest.mark.slow
def test_mgd_run_resumes_exactly(tmp_path, teacher_path):
    """MGD draws random masks every step: from torch's global generator, which the checkpoint restores."""
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.checkpoint import load_checkpoint
    from visiontrain.engine.trainer import fit

    data = write_synthetic_mar20(tmp_path / "data", train=8, val=4, imgsz=64, seed=0)
    common = ["tensorboard=false", "plots=false", "progress=false", "imgsz=64", "batch_size=4", "workers=0",
              f"data={data}", f"distill.teacher={teacher_path}", "distill.feature=mgd", "distill.frozen_base=false", "max_steps=4",
              "save_every_steps=1", "keep_last=4", "eval_every=0", "warmup_epochs=0", "lr=0.01"]

    def run(out: str, *extra: str) -> dict:
        return fit(DetectTask(load_config(DetectTrainConfig, None, [*common, f"out={tmp_path / out}", *extra])))

    run("ref")
    run("resumed", f"resume={tmp_path / 'ref/checkpoints/step_0000002.pt'}")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints/last.pt")["model"] for d in ("ref", "resumed"))
    assert any(k.startswith(ADAPTERS) for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
