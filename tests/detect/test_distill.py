"""Distillation: CWD / KL / DFL-KD against float64 references, head expansion, the Distiller's step, resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontrain.detect.distill import (
    Distiller,
    DistillError,
    cwd_loss,
    dfl_kd_loss,
    expand_classes,
    response_kl_loss,
)
from visiontrain.detect.inference import build_detector, load_weights_into
from visiontrain.detect.loss import DetectionLoss
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.weights import ADAPTERS

BASE = [f"A{i}" for i in range(1, 11)]
ALL = [f"A{i}" for i in range(1, 21)]


# ---- float64 references, written with explicit loops ------------------------------------------

def ref_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    b, c = s.shape[:2]
    total = 0.0
    for i in range(b):
        for j in range(c):
            xs, xt = s[i, j].ravel() / tau, t[i, j].ravel() / tau
            ps = np.exp(xs - xs.max()) / np.exp(xs - xs.max()).sum()
            pt = np.exp(xt - xt.max()) / np.exp(xt - xt.max()).sum()
            total += float(np.sum(pt * (np.log(pt) - np.log(ps))))
    return total * tau * tau / (b * c)


def ref_bernoulli_kl(s: np.ndarray, t: np.ndarray, idx: list[int], tau: float, weighted: bool) -> float:
    """``s [B, nc_s, A]``, ``t [B, nc_t, A]``."""
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    b, nct, a = t.shape
    num = den = 0.0
    for i in range(b):
        for k in range(a):
            w = max(sig(t[i, c, k]) for c in range(nct)) if weighted else 1.0
            kl = 0.0
            for c in range(nct):
                p, q = sig(t[i, c, k] / tau), sig(s[i, idx[c], k] / tau)
                kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
            num += w * kl
            den += w
    return num / den * tau * tau


def ref_dfl_kd(s: np.ndarray, t: np.ndarray, reg_max: int, tau: float, w: np.ndarray) -> float:
    b, _, a = s.shape
    num = den = 0.0
    for i in range(b):
        for k in range(a):
            sides = []
            for side in range(4):
                xs = s[i, side * reg_max:(side + 1) * reg_max, k] / tau
                xt = t[i, side * reg_max:(side + 1) * reg_max, k] / tau
                ps, pt = np.exp(xs) / np.exp(xs).sum(), np.exp(xt) / np.exp(xt).sum()
                sides.append(np.sum(pt * np.log(pt / ps)))
            num += w[i, k] * np.mean(sides)
            den += w[i, k]
    return num / den * tau * tau


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_cwd_matches_float64_reference(tau):
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 5, generator=g) * 2, torch.randn(2, 3, 2, 3, generator=g)]
    t = [torch.randn(2, 3, 4, 5, generator=g) * 2, torch.randn(2, 3, 2, 3, generator=g)]
    got = cwd_loss(s, t, tau)
    want = sum(ref_cwd(a.double().numpy(), b.double().numpy(), tau) for a, b in zip(s, t))
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert cwd_loss(s[0], t[0], tau).item() == pytest.approx(ref_cwd(s[0].numpy(), t[0].numpy(), tau), rel=1e-5)
    assert cwd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DistillError, match="adapter"):
        cwd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))


@pytest.mark.parametrize("tau,weighted", [(1.0, True), (2.0, True), (1.0, False)])
def test_response_kl_matches_float64_reference(tau, weighted):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 7, generator=g) * 3
    t = torch.randn(2, 4, 7, generator=g) * 3
    idx = [5, 0, 2, 3]  # the student's row of each teacher class
    got = response_kl_loss(s, t, idx, tau, "confidence" if weighted else None)
    want = ref_bernoulli_kl(s.double().numpy(), t.double().numpy(), idx, tau, weighted)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # equal logits on the teacher's rows: zero, whatever the other rows say
    s2 = s.clone()
    s2[:, idx] = t
    assert response_kl_loss(s2, t, idx, tau).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DistillError, match="class indices"):
        response_kl_loss(s, t, [0, 1], tau)


def test_response_kl_is_stable_for_extreme_logits_and_backgrounds():
    s = torch.tensor([[[-40.0, 30.0], [25.0, -60.0]]], requires_grad=True)  # [1, 2, 2]
    t = torch.tensor([[[-50.0, -50.0], [-50.0, -50.0]]])  # an all-background teacher
    loss = response_kl_loss(s, t, [0, 1])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dfl_kd_matches_float64_reference():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4 * 5, 6, generator=g), torch.randn(2, 4 * 5, 6, generator=g)
    w = torch.rand(2, 6, generator=g)
    got = dfl_kd_loss(s, t, reg_max=5, tau=1.5, anchor_weight=w)
    want = ref_dfl_kd(s.double().numpy(), t.double().numpy(), 5, 1.5, w.double().numpy())
    assert got.item() == pytest.approx(want, rel=1e-5)


# ---- head expansion ---------------------------------------------------------------------------

def _random_detector(nc: int, seed: int, scale: str = "n", names: list[str] | None = None) -> YOLOv8:
    torch.manual_seed(seed)
    m = YOLOv8(scale, nc=nc, names=names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial BN statistics and biases so that a wrong copy shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(mod, torch.nn.Conv2d) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize("old_nc,new_nc", [(10, 20), (60, 80)])  # 60→80 also widens the hidden layers (n)
def test_expand_classes_keeps_base_predictions(old_nc, new_nc):
    old_names = [f"c{i}" for i in range(old_nc)]
    new_names = [f"c{i}" for i in range(new_nc)]
    new_names = new_names[1::2] + new_names[0::2]  # base rows land at shuffled positions
    teacher = _random_detector(old_nc, 0, names=old_names)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = teacher(x)
        student = expand_classes(teacher, new_names, old_names)
        after = student.eval()(x)
    rows = [new_names.index(n) for n in old_names]
    assert student.nc == new_nc and student.names == new_names and after.shape[1] == 4 + new_nc
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[:, [4 + r for r in rows]], before[:, 4:], rtol=0, atol=1e-6)
    novel = [j for j, n in enumerate(new_names) if n not in old_names]
    for i, s in enumerate((8, 16, 32)):
        bias = student.head.cv3[i][2].bias[novel]
        assert torch.allclose(bias, torch.full_like(bias, math.log(5 / new_nc / (640 / s) ** 2)))


def test_expand_classes_rejects_a_lost_class():
    m = _random_detector(3, 0, names=["a", "b", "c"])
    with pytest.raises(DistillError, match=r"\['b'\] are not in new_names"):
        expand_classes(m, ["a", "c", "d"], ["a", "b", "c"])
    with pytest.raises(DistillError, match="nc=3"):
        expand_classes(m, ["a", "b", "c", "d"], ["a", "b"])


# ---- checkpoints, the distiller ---------------------------------------------------------------

def save_detect_checkpoint(model: YOLOv8, path: Path, names: list[str], imgsz: int = 64) -> Path:
    """A checkpoint as the engine writes it (the parts a teacher needs)."""
    torch.save({"format_version": 1, "task": "detect", "task_state": {"names": names, "scale": model.scale,
                                                                     "imgsz": imgsz},
                "model": model.state_dict(), "ema": None}, path)
    return path


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    return save_detect_checkpoint(_random_detector(10, 0, names=BASE), tmp_path_factory.mktemp("t") / "t.pt", BASE)


def test_weights_from_a_smaller_detector_are_expanded_by_name(teacher_path):
    teacher = build_detector(teacher_path)
    names = ALL[10:] + ALL[:10]  # the teacher's classes at the end
    student = YOLOv8("n", nc=20, names=names)
    load_weights_into(student, teacher_path, names)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        t, s = teacher(x), student.eval()(x)
    torch.testing.assert_close(s[:, 14:], t[:, 4:], rtol=0, atol=1e-6)
    torch.testing.assert_close(s[:, :4], t[:, :4], rtol=0, atol=1e-5)


def _batch(b: int = 2, size: int = 32, empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(4))
    targets = torch.zeros(0, 6) if empty else torch.tensor([[0, 12, 2, 3, 20, 15], [1, 3, 10, 10, 25, 30.0]])
    return images, targets


@pytest.mark.parametrize("scale", ["n", "s"])  # s: a different width, so 1×1 adapters are trained
def test_distiller_step_teacher_frozen_and_terms_finite(teacher_path, scale):
    d = Distiller(build_detector(teacher_path), BASE, ALL, cwd=1.0, kl=2.0, dfl=0.5)
    student = d.attach(YOLOv8(scale, nc=20, names=ALL))
    assert hasattr(student, ADAPTERS) == (scale != "n")
    student.train()
    d.teacher.train()  # even if something flips it, the step runs it in eval mode
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    for empty in (False, True):  # an all-background batch is a normal event
        images, targets = _batch(empty=empty)
        terms = d.training_step(student, images, targets, DetectionLoss(20))
        assert set(terms) == {"box", "cls", "dfl", "cwd", "kl", "dfl_kd"}
        assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
        student.zero_grad()
        sum(terms.values()).backward()
        assert all(p.grad is None for p in d.teacher.parameters())
        assert not any(p.requires_grad for p in d.teacher.parameters())
        assert not d.teacher.training
        if scale == "s":
            assert getattr(student, ADAPTERS)[0].weight.grad.abs().sum() > 0
    for k, v in d.teacher.state_dict().items():  # BN statistics untouched too
        assert torch.equal(v, teacher_before[k]), k
    assert not any(n.startswith("teacher") for n, _ in student.named_modules())


def test_same_scale_student_starts_as_the_teacher(teacher_path):
    d = Distiller(build_detector(teacher_path), BASE, ALL)
    student = d.attach(YOLOv8("n", nc=20, names=ALL)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student(x)[:, 4:14], d.teacher(x)[:, 4:], rtol=0, atol=1e-6)
    # at the start the distillation terms vanish: same features, same logits (BN on running statistics)
    student.train()
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    images, targets = _batch()
    terms = d.training_step(student, images, targets, DetectionLoss(20))
    assert terms["cwd"].item() < 1e-6 and terms["kl"].item() < 1e-6


def test_distiller_rejects_a_teacher_class_the_student_lacks(teacher_path):
    with pytest.raises(DistillError, match=r"\['A10'\] are not among the student's classes"):
        Distiller(build_detector(teacher_path), BASE, ALL[:9] + ALL[10:])


def test_load_detector_ignores_distill_adapters(tmp_path, teacher_path):
    from visiontrain.detect.inference import load_detector

    d = Distiller(build_detector(teacher_path), BASE, ALL)
    student = d.attach(YOLOv8("s", nc=20, names=ALL))
    path = save_detect_checkpoint(student, tmp_path / "student.pt", ALL)
    assert any(k.startswith(ADAPTERS) for k in torch.load(path, weights_only=True)["model"])
    det = load_detector(str(path))
    assert det.names == ALL and det(torch.rand(1, 3, 64, 64)).shape[1] == 24


# ---- through the engine -----------------------------------------------------------------------

QUIET = ["tensorboard=false", "plots=false", "progress=false", "imgsz=64", "batch_size=4", "workers=0"]


@pytest.mark.slow
def test_distillation_run_resumes_exactly_and_reports_base_novel(tmp_path, teacher_path):
    from visiontrain.config import load_config
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.checkpoint import load_checkpoint
    from visiontrain.engine.trainer import fit

    data = write_synthetic_mar20(tmp_path / "data", train=8, val=4, imgsz=64, seed=0)
    common = [*QUIET, f"data={data}", f"distill.teacher={teacher_path}", "max_steps=4", "save_every_steps=1",
              "keep_last=4", "eval_every=0", "warmup_epochs=0", "lr=0.01", "ema.warmup=2", "distill.dfl=0.5",
              "distill.frozen_base=false"]  # the whole student trains under the distillation terms

    def run(out: str, *extra: str) -> dict:
        return fit(DetectTask(load_config(DetectTrainConfig, None, [*common, f"out={tmp_path / out}", *extra])))

    ref = run("ref")
    resumed = run("resumed", f"resume={tmp_path / 'ref/checkpoints/step_0000002.pt'}")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints/last.pt") for d in ("ref", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        sa, sb = (a[part], b[part]) if part == "model" else (a[part]["module"], b[part]["module"])
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k}"
    assert a["model"]["head.cv3.0.2.weight"].shape[0] == 20
    for key in ("mAP50-95/base", "mAP50/base", "mAP50-95/novel", "mAP50/novel", "mAP50/all"):
        assert key in ref["metrics"] and key in resumed["metrics"]
    assert ref["metrics"]["mAP50/all"] == ref["metrics"]["mAP50"]


# ---- pseudo-labels (distill.pseudo) -------------------------------------------------------------

def _decoded(rows: list[tuple[int, int, tuple[float, float, float, float], int, float]], b: int, nc: int,
             a: int) -> torch.Tensor:
    """A teacher eval output ``[B, 4 + nc, A]`` with the given (image, anchor, xywh, class, score) and
    every other score 0."""
    out = torch.zeros(b, 4 + nc, a)
    out[:, 2:4] = 1.0
    for img, anchor, xywh, cls, score in rows:
        out[img, :4, anchor] = torch.tensor(xywh)
        out[img, 4 + cls, anchor] = score
    return out


def test_pseudo_labels_are_the_teachers_detections_where_nothing_is_labelled():
    from visiontrain.detect.distill import teacher_pseudo_labels

    decoded = _decoded([(0, 0, (50, 50, 20, 20), 1, 0.9),
                        (0, 1, (51, 50, 20, 20), 1, 0.8),    # the same object: NMS keeps the 0.9 one
                        (0, 2, (150, 150, 20, 20), 0, 0.6),
                        (0, 3, (100, 20, 10, 10), 0, 0.2),   # below conf
                        (0, 4, (95, 5, 20, 20), 0, 0.5),     # reaches out of the image: clipped
                        (1, 0, (30, 30, 10, 10), 0, 0.95),   # on a labelled box: the label wins
                        (1, 1, (80, 80, 10, 10), 1, 0.7),
                        (1, 2, (170, 50, 10, 10), 1, 0.7)],  # outside the image: nothing left after clipping
                       b=2, nc=2, a=5)
    targets = torch.tensor([[1.0, 7, 25, 25, 35, 36]])
    rows = teacher_pseudo_labels(decoded, targets, class_indices=[3, 1], conf=0.25, img_hw=(200, 160))
    expected = torch.tensor([[0, 1, 40, 40, 60, 60], [0, 3, 140, 140, 160, 160], [0, 3, 85, 0, 105, 15],
                             [1, 1, 75, 75, 85, 85.0]])
    torch.testing.assert_close(rows, expected)
    assert teacher_pseudo_labels(decoded, targets, [3, 1], conf=0.99, img_hw=(200, 160)).shape == (0, 6)


def test_distiller_trains_on_the_teachers_pseudo_labels(teacher_path):
    """With ``pseudo`` the detection loss sees the labels plus the teacher's detections (in student class
    indices); without it, the labels only."""
    teacher = build_detector(teacher_path)
    for m in teacher.head.cv3:  # a teacher sure of class A4 at one P5 cell of image 0
        m[-1].bias.data.fill_(-12.0)
    teacher.head.cv3[2][-1].bias.data[3] = 0.0
    seen = []

    class SpyLoss(DetectionLoss):
        def loss_and_assignment(self, preds, targets, img_size):
            seen.append(targets.clone())
            return super().loss_and_assignment(preds, targets, img_size)

    loss = SpyLoss(20)

    images, targets = _batch(size=64)
    for pseudo in (0.0, 0.3):
        d = Distiller(teacher, BASE, ALL, kl=1.0, feature="none", pseudo=pseudo)
        student = d.attach(YOLOv8("n", nc=20, names=ALL)).train()
        terms = d.training_step(student, images, targets, loss)
        assert ("stat/pseudo_per_image" in terms) == (pseudo > 0)
    assert torch.equal(seen[0], targets)
    extra = seen[1][len(targets):]
    torch.testing.assert_close(seen[1][:len(targets)], targets)
    with torch.no_grad():
        scores = teacher(images)[:, 4 + 3]
    assert len(extra) > 0 and (extra[:, 1] == ALL.index("A4")).all()
    assert terms["stat/pseudo_per_image"].item() == len(extra) / len(images)
    assert len(extra) <= int((scores > 0.3).sum())
    with pytest.raises(DistillError, match="pseudo"):
        Distiller(teacher, BASE, ALL, pseudo=1.5)


def test_kl_skip_novel_drops_the_kl_where_the_teachers_box_is_on_a_labelled_novel_object(teacher_path):
    images, _ = _batch(size=64)
    teacher = build_detector(teacher_path).eval()
    with torch.no_grad():
        decoded = teacher.head.decode(teacher.forward_with_features(images)[1])  # [B, 4 + 10, A], xywh
    cx, cy, w, h = decoded[0, :4, 5].tolist()  # the teacher's box at anchor 5 of image 0 becomes a label
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    base_box = torch.tensor([[0, ALL.index("A3"), *box]])
    novel_box = torch.tensor([[0, ALL.index("A15"), *box]])
    kl = {}
    for skip in (False, True):
        d = Distiller(build_detector(teacher_path), BASE, ALL, kl=1.0, feature="none", init_student=False,
                      kl_skip_novel=skip)
        torch.manual_seed(0)
        student = d.attach(YOLOv8("n", nc=20, names=ALL)).train()
        for m in student.modules():  # BN on running statistics: the same forward for both settings
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        for name, targets in (("base", base_box), ("novel", novel_box), ("none", torch.zeros(0, 6))):
            kl[skip, name] = d.training_step(student, images, targets, DetectionLoss(20))["kl"].item()
    # a base label or none: nothing is skipped
    assert kl[True, "base"] == kl[False, "base"] and kl[True, "none"] == kl[False, "none"]

    # the mask: exactly the anchors whose teacher box overlaps the novel label with IoU > 0.5, image 0 only
    mask = d.on_novel_labels(decoded, novel_box)
    xyxy = torch.cat((decoded[:, :2] - decoded[:, 2:4] / 2, decoded[:, :2] + decoded[:, 2:4] / 2), 1)
    ious = torch.stack([box_iou_one(xyxy[0, :, a], torch.tensor(box)) for a in range(decoded.shape[2])])
    assert mask[0, 5] and not mask[1].any()
    torch.testing.assert_close(mask[0], ious > 0.5)

    # the KL with the mask: the masked anchors' terms dropped, the normaliser kept (float64 reference)
    with torch.no_grad():
        cls_s = torch.cat([r.flatten(2) for r in student(images)], 2)[:, 4 * student.reg_max:]
        cls_t = torch.cat([r.flatten(2) for r in teacher.forward_with_features(images)[1]], 2)[:, 4 * teacher.reg_max:]
    s = cls_s.double()[:, [ALL.index(n) for n in BASE]]
    t = cls_t.double()
    p = t.sigmoid()
    per_anchor = (p * (p.log() - s.sigmoid().log()) + (1 - p) * ((1 - p).log() - (1 - s.sigmoid()).log())).sum(1)
    w = p.amax(1)
    expect = (per_anchor * w * ~mask).sum() / w.sum()
    assert kl[True, "novel"] == pytest.approx(expect.item(), rel=1e-4)
    assert kl[True, "novel"] < kl[False, "novel"]


def box_iou_one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two xyxy boxes, written out (the reference for the mask)."""
    iw = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    ih = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
