"""``distill.frozen_base``: the teacher, frozen, plus a class branch for the novel classes.

The claim users meet: after training, the student's boxes and base-class scores are the teacher's, exactly,
while the novel classes have learnt; the checkpoint loads (evaluation, prediction, ONNX) as that structure,
and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from visiontrain.config import ConfigError, load_config
from visiontrain.detect.config import DetectTrainConfig
from visiontrain.detect.distill import Distiller, DistillError, expand_classes, split_classes
from visiontrain.detect.inference import build_detector
from visiontrain.detect.loss import DetectionLoss
from visiontrain.detect.model import SplitClassBranch, YOLOv8
from visiontrain.detect.weights import WeightsMismatchError, infer_architecture, save_state_dict

from .test_distill import ALL, BASE, QUIET, _random_detector, save_detect_checkpoint


def _x(seed: int = 3, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_detect_checkpoint(_random_detector(10, 0, names=BASE), tmp_path_factory.mktemp("t") / "t.pt", BASE)


def test_split_classes_keeps_boxes_and_base_scores_exactly():
    teacher = _random_detector(10, 0, names=BASE)
    names = ALL[1::2] + ALL[0::2]  # base rows land at shuffled positions among the novel ones
    student = split_classes(copy.deepcopy(teacher), names, BASE).eval()
    x = _x()
    with torch.no_grad():
        t, s = teacher(x), student(x)
    rows = [4 + names.index(n) for n in BASE]
    assert student.nc == 20 and student.names == names and s.shape == (2, 24, t.shape[2])
    assert torch.equal(s[:, :4], t[:, :4])
    torch.testing.assert_close(s[:, rows], t[:, 4:], rtol=0, atol=1e-7)  # the sigmoid's rounding only:
    with torch.no_grad():  # the logits are bit-exact (the same modules)
        feats = teacher.forward_features(x)
        raw_t, raw_s = teacher.head.raw(feats), student.head.raw(feats)
    for a, b in zip(raw_t, raw_s):
        assert torch.equal(b[:, [64 + r - 4 for r in rows]], a[:, 64:])
    for i, stride in enumerate((8, 16, 32)):
        level = student.head.cv3[i]
        assert isinstance(level, SplitClassBranch)
        # the novel branch starts from the teacher's hidden layers, with the prior bias for nc=20
        assert level.sizes == (10, 10)
        novel = level.parts[1]
        assert torch.equal(novel[0].conv.weight, teacher.head.cv3[i][0].conv.weight)
        assert torch.equal(novel[1].bn.running_var, teacher.head.cv3[i][1].bn.running_var)
        bias = novel[2].bias
        assert torch.allclose(bias, torch.full_like(bias, math.log(5 / 20 / (640 / stride) ** 2)))
    assert student.head.class_parts == (10, 10) and teacher.head.class_parts == ()


def test_split_classes_rejects_what_it_cannot_do():
    m = _random_detector(3, 0, names=["a", "b", "c"])
    with pytest.raises(DistillError, match="add no class"):
        split_classes(copy.deepcopy(m), ["c", "b", "a"], ["a", "b", "c"])
    with pytest.raises(DistillError, match=r"\['b'\] are not in new_names"):
        split_classes(copy.deepcopy(m), ["a", "c", "d"], ["a", "b", "c"])
    split = split_classes(m, ["a", "b", "c", "d"], ["a", "b", "c"])
    with pytest.raises(DistillError, match="nc=4"):  # names must describe the model as it is
        split_classes(split, ["a", "b", "c", "d", "e"], ["a", "b", "c"])
    with pytest.raises(DistillError, match="split_classes"):  # one branch cannot be grown in place any more
        expand_classes(split, ["a", "b", "c", "d", "e"], ["a", "b", "c", "d"])


def test_split_checkpoint_loads_as_its_structure(tmp_path):
    student = split_classes(_random_detector(10, 0, names=BASE), ALL[::-1], BASE).eval()
    with torch.no_grad():  # a trained novel branch, so a fresh one would show
        for p in student.head.cv3.parameters():
            p.add_(0.1)
    path = save_detect_checkpoint(student, tmp_path / "split.pt", ALL[::-1])
    arch = infer_architecture(torch.load(path, weights_only=True)["model"])
    assert (arch.nc, arch.class_parts) == (20, (10, 10))
    loaded = build_detector(path)
    assert loaded.names == ALL[::-1] and loaded.head.class_parts == (10, 10)
    x = _x(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    with pytest.raises(WeightsMismatchError, match="in parts of"):  # another class count
        from visiontrain.detect.inference import read_weights
        from visiontrain.detect.weights import load_state_into

        w = read_weights(path)
        load_state_into(YOLOv8("n", nc=12), w, infer_architecture(w.state), path)
    with pytest.raises(ValueError, match="no Ultralytics layout"):
        save_state_dict(student, tmp_path / "u.pt", ultralytics_keys=True)


def test_split_model_exports_to_onnx(tmp_path):
    from visiontrain.detect.export import OnnxDetector, export_onnx

    student = split_classes(_random_detector(10, 0, names=BASE), ALL[::-1], BASE).eval()
    det = OnnxDetector(export_onnx(student, tmp_path / "split.onnx", imgsz=(64, 96)))
    x = _x(7)
    with torch.no_grad():
        ref = student(x)
    assert det.nc == 20
    torch.testing.assert_close(det(x), ref, rtol=1e-6, atol=1e-4)


def test_frozen_base_distiller_freezes_all_but_the_novel_branch(teacher_path):
    d = Distiller(build_detector(teacher_path), BASE, ALL, kl=2.0, pseudo=0.1, feature="cwd", frozen_base=True)
    assert (d.kl, d.pseudo, d.feature_weight) == (0.0, 0.0, 0.0)  # the teacher is inside the student
    student = d.attach(YOLOv8("n", nc=20, names=ALL))
    from visiontrain.engine.freeze import set_frozen

    fixed = {n for n, p in student.named_parameters() if not p.requires_grad}  # the DFL's constant weights
    set_frozen(student, d.frozen_prefixes(), fixed)
    trainable = {n.split(".parts.1.")[0] for n, p in student.named_parameters() if p.requires_grad}
    assert fixed == {"head.dfl.conv.weight"}
    assert trainable == {"head.cv3.0", "head.cv3.1", "head.cv3.2"}
    images = torch.rand(2, 3, 32, 32)
    targets = torch.tensor([[0, 12, 2, 3, 20, 15], [1, 3, 10, 10, 25, 30.0]])
    terms = d.training_step(student.train(), images, targets, DetectionLoss(20))
    assert set(terms) == {"box", "cls", "dfl"}
    with pytest.raises(DistillError, match="nothing to add"):
        Distiller(build_detector(teacher_path), BASE, BASE[::-1], frozen_base=True)
    with pytest.raises(DistillError, match="model=yolov8n"):
        Distiller(build_detector(teacher_path), BASE, ALL, frozen_base=True).attach(YOLOv8("s", nc=20, names=ALL))


def test_frozen_base_config_is_checked(teacher_path):
    def cfg(*o: str) -> DetectTrainConfig:
        return load_config(DetectTrainConfig, None, ["distill.frozen_base=true", *o])

    with pytest.raises(ConfigError, match="distill.teacher"):
        cfg()
    with pytest.raises(ConfigError, match="freeze_bn=true"):
        cfg(f"distill.teacher={teacher_path}", "freeze_bn=false")
    with pytest.raises(ConfigError, match="drop weights="):
        cfg(f"distill.teacher={teacher_path}", f"weights={teacher_path}")


def _run(tmp_path, teacher_path, out: str, *extra: str) -> dict:
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.trainer import fit

    data = tmp_path / "data"
    if not data.exists():
        write_synthetic_mar20(data, train=8, val=4, imgsz=64, seed=0)
    overrides = [*QUIET, f"data={data}", f"distill.teacher={teacher_path}", "distill.frozen_base=true",
                 "max_steps=4", "save_every_steps=1", "keep_last=4", "eval_every=0", "warmup_epochs=0", "lr=0.05",
                 "ema.warmup=2", f"out={tmp_path / out}", *extra]
    return fit(DetectTask(load_config(DetectTrainConfig, None, overrides)))


def test_frozen_base_run_keeps_the_teachers_predictions_and_learns_the_novel_classes(tmp_path, teacher_path):
    """Through the engine (BatchNorm in train mode, EMA, optimizer with weight decay): the checkpoint's final
    weights give the teacher's boxes and base scores bit for bit; the novel branch moved."""
    metrics = _run(tmp_path, teacher_path, "run")["metrics"]
    teacher = build_detector(teacher_path)
    student = build_detector(tmp_path / "run/checkpoints/last.pt")  # the EMA weights, as evaluation reads them
    assert student.head.class_parts == (10, 10) and student.names == ALL
    x = _x(9, 64, 64)
    with torch.no_grad():
        t, s = teacher(x), student(x)
    assert torch.equal(s[:, :4], t[:, :4])
    torch.testing.assert_close(s[:, 4:14], t[:, 4:], rtol=0, atol=1e-7)  # up to the sigmoid's rounding
    with torch.no_grad():
        feats = teacher.forward_features(x)
        assert all(torch.equal(b[:, 64:74], a[:, 64:]) for a, b in
                   zip(teacher.head.raw(feats), student.head.raw(student.forward_features(x))))
    start = split_classes(copy.deepcopy(teacher), ALL, BASE)
    moved = [(a - b).abs().max().item() for a, b in zip(student.head.cv3.parameters(), start.head.cv3.parameters())]
    assert max(moved) > 1e-4  # the novel branch trained
    assert {"mAP50/base", "mAP50/novel", "mAP50/all"} <= metrics.keys()  # reported by class group


@pytest.mark.slow
def test_frozen_base_run_resumes_exactly(tmp_path, teacher_path):
    from visiontrain.engine.checkpoint import load_checkpoint

    _run(tmp_path, teacher_path, "ref")
    _run(tmp_path, teacher_path, "resumed", f"resume={tmp_path / 'ref/checkpoints/step_0000002.pt'}")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints/last.pt") for d in ("ref", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        sa, sb = (a[part], b[part]) if part == "model" else (a[part]["module"], b[part]["module"])
        assert sa.keys() == sb.keys() and "head.cv3.0.perm" in sa
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k}"


def _task(tmp_path, teacher_path, *extra: str):
    """A DetectTask on a tiny synthetic MAR20 set with ``distill.teacher=`` the 10-class teacher."""
    from visiontrain.detect.synthetic import write_synthetic_mar20
    from visiontrain.detect.task import DetectTask

    data = tmp_path / "tiny"
    if not data.exists():
        write_synthetic_mar20(data, train=2, val=2, imgsz=64, seed=0)
    return DetectTask(load_config(DetectTrainConfig, None, [*QUIET, f"data={data}", f"distill.teacher={teacher_path}",
                                                            f"out={tmp_path / 'run'}", *extra]))


@pytest.mark.parametrize("extra,frozen", [((), True), (("model=yolov8s",), False),
                                          (("distill.frozen_base=false",), False),
                                          (("freeze_bn=false",), False)])
def test_auto_freezes_the_base_of_a_class_incremental_student_only(tmp_path, teacher_path, extra, frozen):
    task = _task(tmp_path, teacher_path, *extra)
    assert task.distiller.frozen_base is frozen
    assert task.model_signature().endswith("-parts10+10") is frozen


def test_the_novel_branch_trains_at_the_scaled_learning_rate(tmp_path, teacher_path):
    for extra, scale in (((), 5.0), (("distill.novel_lr_scale=2", "warmup_bias_lr=0.1"), 2.0)):
        task = _task(tmp_path, teacher_path, "lr=0.002", *extra)
        model = task.build_model()
        names = {id(p): n for n, p in model.named_parameters()}
        groups = task.param_groups(model)
        novel = [g for g in groups if g["params"] and ".parts.1." in names[id(g["params"][0])]]
        assert novel and all(g["lr"] == pytest.approx(0.002 * scale) for g in novel)
        assert all(".parts.1." in names[id(p)] for g in novel for p in g["params"])
        assert sum(len(g["params"]) for g in novel) == sum(".parts.1." in n for n in names.values())
        assert not any("lr" in g for g in groups if g not in novel)  # the rest (frozen) at lr
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
        assert groups.index(novel[0]) == 0  # first: the logged lr is the one that trains


def test_base_negatives_matches_float64_reference(teacher_path):
    """``Σ_a w_a Σ_{c novel} softplus(z_ac) / Σ_a w_a``, ``w_a`` = the base rows' highest probability, zero where
    the anchor's box overlaps a labelled novel object (IoU > 0.5), written out in float64."""
    from .test_distill import box_iou_one

    d = Distiller(build_detector(teacher_path), BASE, ALL, frozen_base=True, base_negatives=1.0)
    student = d.attach(YOLOv8("n", nc=20, names=ALL)).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = student.head.raw(student.forward_features(images))
        decoded = student.head.decode(raw)
    cx, cy, w, h = decoded[0, :4, 7].tolist()  # the box at anchor 7 of image 0 becomes a novel label
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    targets = torch.tensor([[0, ALL.index("A15"), *box], [1, ALL.index("A2"), *box]])  # a base label masks nothing
    got = d.base_negatives_loss(student, raw, targets)

    flat = torch.cat([r.flatten(2) for r in raw], 2).double()
    z = flat[:, 64:][:, [ALL.index(n) for n in ALL[10:]]]  # novel logits [B, 10, A]
    p_base = decoded.double()[:, 4:][:, [ALL.index(n) for n in BASE]].amax(1)
    xyxy = torch.cat((decoded[:, :2] - decoded[:, 2:4] / 2, decoded[:, :2] + decoded[:, 2:4] / 2), 1)
    on_novel = torch.zeros_like(p_base, dtype=torch.bool)
    for a in range(decoded.shape[2]):
        on_novel[0, a] = box_iou_one(xyxy[0, :, a], torch.tensor(box)) > 0.5
    assert on_novel[0, 7] and on_novel.sum() < on_novel.numel() // 4
    wts = p_base * ~on_novel
    softplus = torch.log1p(torch.exp(z))
    want = (softplus.sum(1) * wts).sum() / wts.sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # a whole-student run has no frozen base rows to read: the term is off there (the default weight is 5)
    assert Distiller(build_detector(teacher_path), BASE, ALL, base_negatives=5.0).base_negatives == 0


def test_a_second_class_incremental_step_adds_a_third_part(tmp_path):
    """Teacher (A1–A5) → student (A1–A10, two parts) → its student (A1–A15, three parts): each step keeps what
    the previous model gave for its classes, and only the newest part trains."""
    first = _random_detector(5, 0, names=ALL[:5])
    second = split_classes(copy.deepcopy(first), ALL[5:10] + ALL[:5], ALL[:5])
    with torch.no_grad():  # the second step's novel part "trained"
        for p in second.head.cv3.parameters():
            p.add_(0.05)
    names3 = ALL[10:15] + ALL[:10][::-1]
    path = save_detect_checkpoint(second, tmp_path / "second.pt", ALL[5:10] + ALL[:5])
    d = Distiller(build_detector(path), second.names, names3, frozen_base=True)
    third = d.attach(YOLOv8("n", nc=15, names=names3)).eval()
    assert third.head.class_parts == (5, 5, 5)
    x = _x(11)
    with torch.no_grad():
        s2, s3 = second.eval()(x), third(x)
    rows = [4 + names3.index(n) for n in second.names]
    assert torch.equal(s3[:, :4], s2[:, :4])
    torch.testing.assert_close(s3[:, rows], s2[:, 4:], rtol=0, atol=1e-7)
    assert set(d.frozen_prefixes()) >= {f"head.cv3.{i}.parts.{k}" for i in range(3) for k in (0, 1)}
    assert d.is_novel_param("head.cv3.2.parts.2.0.conv.weight") and not d.is_novel_param("head.cv3.2.parts.1.2.bias")
    path3 = save_detect_checkpoint(third, tmp_path / "third.pt", names3)
    with torch.no_grad():
        assert torch.equal(build_detector(path3)(x), s3)


def test_channels_last_reaches_the_split_branch(tmp_path, teacher_path):
    task = _task(tmp_path, teacher_path, "channels_last=true")
    model = task.build_model()
    for part in model.head.cv3[0].parts:
        assert part[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
