from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from visiontrain.detect.augment import AugmentConfig
from visiontrain.detect.data import (
    DatasetError,
    DetectionDataset,
    collate,
    detect_layout,
    load_labels,
)
from visiontrain.detect.inference import boxes_to_original, preprocess_image
from visiontrain.detect.synthetic import voc_xml, write_synthetic_mar20

ANN = Path("Annotations") / "Horizontal Bounding Boxes"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_mar20(tmp_path_factory.mktemp("mar20") / "ds", train=8, val=4, imgsz=160, seed=1)


def xml_boxes(path: Path) -> tuple[list[str], np.ndarray]:
    root = ET.parse(path).getroot()
    names = [o.findtext("name") for o in root.iter("object")]
    boxes = [
        [float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        for o in root.iter("object")
    ]
    return names, np.array(boxes).reshape(-1, 4)


def write_image(path: Path, h: int = 60, w: int = 80, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    img[10:20, 10:30] = 250
    cv2.imwrite(str(path), img)
    return path


def make_voc(root: Path, objects: dict[str, str], size=(60, 80)) -> Path:
    """A MAR20-layout folder; ``objects[id]`` is the raw ``<object>`` XML text of that image."""
    (root / ANN).mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objs in objects.items():
        write_image(root / "JPEGImages" / f"{image_id}.jpg", *size)
        (root / ANN / f"{image_id}.xml").write_text(
            f"<annotation>\n<size><width>{size[1]}</width><height>{size[0]}</height></size>\n{objs}</annotation>\n"
        )
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(objects) + "\n")
    return root


def obj(name: str, x1, y1, x2, y2) -> str:
    return (
        f"<object>\n<name>{name}</name>\n<bndbox>\n<xmin>{x1}</xmin>\n<ymin>{y1}</ymin>\n<xmax>{x2}</xmax>\n"
        f"<ymax>{y2}</ymax>\n</bndbox>\n</object>\n"
    )


# ----------------------------------------------------------------------------------------------
# MAR20 / VOC


def test_voc_reader_matches_xml(synth):
    ls = load_labels(synth, "train", cache=False)
    assert ls.layout == "voc" and len(ls) == 8 and ls.class_names == [f"A{i}" for i in range(1, 21)]
    for r in ls.records:
        names, boxes = xml_boxes(synth / ANN / f"{r.image_id}.xml")
        np.testing.assert_array_equal(r.boxes, boxes)
        assert [ls.class_names[c] for c in r.classes] == names
        assert (r.height, r.width) == (160, 160) and Path(r.path).is_file()
    test = load_labels(synth, "val", cache=False)  # MAR20 names its validation split "test"
    assert [r.image_id for r in test.records] == ["9", "10", "11", "12"]


def test_cache_reused_and_rebuilt_on_change(tmp_path):
    root = write_synthetic_mar20(tmp_path / "ds", train=3, val=1, imgsz=128, seed=2)
    cache = root / ".visiontrain_cache" / "voc_train.npz"
    first = load_labels(root, "train")
    assert not first.from_cache and cache.is_file()
    second = load_labels(root, "train")
    assert second.from_cache
    for a, b in zip(first.records, second.records):
        assert (a.image_id, a.path, a.height, a.width) == (b.image_id, b.path, b.height, b.width)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.classes, b.classes)
    # change one annotation: the cache is rebuilt and the new box is read
    xml = root / ANN / "2.xml"
    xml.write_text(voc_xml("2.jpg", 128, 128, [(4, 10, 11, 50, 52)]))
    third = load_labels(root, "train")
    assert not third.from_cache
    assert third.records[1].boxes.tolist() == [[10, 11, 50, 52]] and third.records[1].classes.tolist() == [4]
    assert load_labels(root, "train").from_cache
    # other class names are another key
    assert not load_labels(root, "train", class_names=[f"A{i}" for i in range(1, 21)] + ["X"]).from_cache


def test_voc_missing_image(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 1, 1, 5, 5)})
    (root / "ImageSets/Main/train.txt").write_text("a\nghost\n")
    with pytest.raises(
        DatasetError, match=r"train.txt line 2: image 'ghost' is listed but .*JPEGImages/ghost"
    ):
        load_labels(root, "train")


def test_voc_corrupt_image(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 1, 1, 5, 5), "b": ""})
    (root / "JPEGImages" / "b.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=r"JPEGImages/b.jpg: not a readable image"):
        load_labels(root, "train")


def test_voc_malformed_xml(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 1, 1, 5, 5)})
    (root / ANN / "a.xml").write_text("<annotation>\n<object>\n<name>A1</name>\n</annotation>\n")
    with pytest.raises(DatasetError, match=r"a.xml line 4: malformed XML \(mismatched tag\)"):
        load_labels(root, "train")


def test_voc_non_numeric_box(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 1, 1, 5, 5) + obj("A2", 1, "oops", 5, 5)})
    with pytest.raises(DatasetError, match=r"a.xml line 16: <bndbox> needs numbers xmin, ymin, xmax, ymax; <ymin> is 'oops'"):
        load_labels(root, "train")


def test_voc_unknown_class(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 1, 1, 5, 5) + obj("B52", 1, 1, 5, 5)})
    with pytest.raises(DatasetError) as e:
        load_labels(root, "train")
    msg = str(e.value)
    assert (
        "a.xml line 13: unknown class 'B52'" in msg
        and "A1, A2" in msg
        and "A20" in msg
        and "names=[...]" in msg
        and "class_names" not in msg  # the hint names the key users set (names=), not a function argument
    )
    assert load_labels(root, "train", class_names=["A1", "B52"]).records[0].classes.tolist() == [0, 1]


def test_voc_clip_and_zero_area_are_counted(tmp_path, caplog):
    objs = (
        obj("A1", -5, 2, 20, 30)
        + obj("A2", 10, 10, 10, 40)
        + obj("A3", 90, 5, 120, 20)
        + obj("A4", 5, 5, 25, 25)
    )
    root = make_voc(tmp_path / "ds", {"a": objs, "bg": ""})
    with caplog.at_level(logging.INFO, logger="visiontrain.detect.data"):
        ls = load_labels(root, "train")
    a, bg = ls.records
    assert a.boxes.tolist() == [[0, 2, 20, 30], [5, 5, 25, 25]] and a.classes.tolist() == [0, 3]
    assert len(bg.boxes) == 0 and bg.boxes.shape == (0, 4)  # empty annotation = background
    assert ls.stats["clipped"] == 1 and ls.stats["zero_area"] == 1 and ls.stats["outside"] == 1
    assert "a.xml line" in ls.stats["examples"]["clipped"]
    [rec] = [r for r in caplog.records if "1 boxes clipped" in r.getMessage()]
    assert rec.levelno == logging.WARNING and "1 zero-area boxes dropped" in rec.getMessage()
    assert "1 background" in rec.getMessage()


def test_voc_swapped_corners_are_an_error(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 30, 1, 5, 5)})
    with pytest.raises(DatasetError, match=r"a.xml line 5: .*xmax < xmin"):
        load_labels(root, "train")


def test_missing_split_and_unknown_layout(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": ""})
    with pytest.raises(DatasetError, match=r"no split list for 'val'.*found \['train.txt'\]"):
        load_labels(root, "val")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DatasetError, match="not a known dataset layout"):
        detect_layout(tmp_path / "junk")
    with pytest.raises(DatasetError, match="does not exist"):
        detect_layout(tmp_path / "nothing")


def test_keep_classes_makes_background(synth):
    full = load_labels(synth, "train")
    keep = ["A3", "A7", "A12"]
    part = load_labels(synth, "train", keep_classes=keep)
    idx = [full.class_names.index(n) for n in keep]
    assert part.class_names == full.class_names  # indices unchanged
    for a, b in zip(full.records, part.records):
        m = np.isin(a.classes, idx)
        np.testing.assert_array_equal(b.boxes, a.boxes[m])
        np.testing.assert_array_equal(b.classes, a.classes[m])
    assert sum(len(r.classes) == 0 for r in part.records) > sum(len(r.classes) == 0 for r in full.records)
    with pytest.raises(DatasetError, match="'Z9'"):
        load_labels(synth, "train", keep_classes=["Z9"])


# ----------------------------------------------------------------------------------------------
# YOLO


def make_yolo(root: Path, labels: dict[str, str | None], names=("cat", "dog", "car")) -> Path:
    for stem, text in labels.items():
        write_image(root / "images" / "train" / f"{stem}.png", 50, 100)
        if text is not None:
            (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
            (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    (root / "data.yaml").write_text(
        f"path: .\ntrain: images/train\nval: images/train\nnames: {list(names)}\n"
    )
    return root


def test_yolo_reader(tmp_path):
    root = make_yolo(
        tmp_path / "y",
        {"a": "1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.1 0.2\n", "b": "", "c": None, "d": "2 0.95 0.5 0.2 0.2\n"},
    )
    ls = load_labels(root / "data.yaml", "train")
    assert ls.layout == "yolo" and ls.class_names == ["cat", "dog", "car"]
    a, b, c, d = ls.records
    np.testing.assert_allclose(a.boxes, [[40, 15, 60, 35], [5, 5, 15, 15]], atol=1e-4)
    assert a.classes.tolist() == [1, 0] and (a.height, a.width) == (50, 100)
    assert len(b.classes) == 0 and len(c.classes) == 0  # empty / missing label file: background
    np.testing.assert_allclose(d.boxes, [[85, 20, 100, 30]], atol=1e-4)  # clipped at the right border
    assert ls.stats["clipped"] == 1 and ls.stats["missing_label_file"] == 1
    assert load_labels(root, "val").layout == "yolo"  # the folder holding data.yaml works too


@pytest.mark.parametrize(
    "line, msg",
    [
        ("0 0.5 0.5 0.2", r"a.txt line 2: expected 5 values 'class cx cy w h', got 4"),
        ("0 0.5 x 0.2 0.2", r"a.txt line 2: values must be numbers"),
        ("0 0.5 nan 0.2 0.2", r"a.txt line 2: non-finite"),
        ("7 0.5 0.5 0.2 0.2", r"a.txt line 2: unknown class '7'; known classes are \[0=cat, 1=dog, 2=car\]"),
        ("1.5 0.5 0.5 0.2 0.2", r"a.txt line 2: unknown class '1.5'"),
    ],
)
def test_yolo_bad_lines(tmp_path, line, msg):
    root = make_yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.1 0.1\n" + line + "\n"})
    with pytest.raises(DatasetError, match=msg):
        load_labels(root, "train")


def test_yolo_yaml_errors(tmp_path):
    root = make_yolo(tmp_path / "y", {"a": ""})
    (root / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DatasetError, match="needs a 'names' list"):
        load_labels(root, "train")
    (root / "data.yaml").write_text("train: images/missing\nnames: [a]\n")
    with pytest.raises(DatasetError, match="neither an image folder"):
        load_labels(root, "train")


# ----------------------------------------------------------------------------------------------
# COCO


def make_coco(root: Path, anns: list[dict], cats=None) -> Path:
    write_image(root / "images" / "val" / "x1.jpg", 60, 80)
    write_image(root / "images" / "val" / "x2.jpg", 60, 80)
    data = {
        "images": [
            {"id": 11, "file_name": "x1.jpg", "width": 80, "height": 60},
            {"id": 12, "file_name": "x2.jpg", "width": 80, "height": 60},
        ],
        "annotations": anns,
        "categories": cats or [{"id": 3, "name": "plane"}, {"id": 1, "name": "ship"}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def test_coco_reader(tmp_path):
    root = make_coco(
        tmp_path / "c",
        [
            {"id": 1, "image_id": 11, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 1, "bbox": [70, 50, 20, 20]},
            {"id": 3, "image_id": 11, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        ],
    )
    ls = load_labels(root, "val")
    assert ls.layout == "coco" and ls.class_names == ["ship", "plane"]  # ordered by category id
    x1, x2 = ls.records
    assert x1.image_id == "x1" and x1.boxes.tolist() == [[10, 5, 30, 15], [70, 50, 80, 60]]
    assert x1.classes.tolist() == [1, 0] and len(x2.classes) == 0
    assert ls.stats["crowd"] == 1 and ls.stats["clipped"] == 1
    same = load_labels(root / "annotations" / "instances_val.json")
    assert [r.path for r in same.records] == [r.path for r in ls.records]


@pytest.mark.parametrize(
    "ann, msg",
    [
        (
            {"image_id": 11, "category_id": 9, "bbox": [1, 1, 2, 2]},
            r"annotations\[0\] \(id 5\): unknown class 'category_id 9'; known classes are \[ship, plane\]",
        ),
        ({"image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]}, r"annotations\[0\] \(id 5\): image_id 99"),
        ({"image_id": 11, "category_id": 1, "bbox": [1, 1, 2]}, r"bbox must be 4 numbers"),
        ({"image_id": 11, "category_id": 1, "bbox": [1, 1, -2, 2]}, r"negative size"),
    ],
)
def test_coco_bad_annotations(tmp_path, ann, msg):
    root = make_coco(tmp_path / "c", [dict(ann, id=5)])
    with pytest.raises(DatasetError, match=msg):
        load_labels(root, "val")


def test_coco_missing_image(tmp_path):
    root = make_coco(tmp_path / "c", [])
    (root / "images" / "val" / "x2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images\[1\] file 'x2.jpg' not found"):
        load_labels(root, "val")


# ----------------------------------------------------------------------------------------------
# torch dataset


def test_val_dataset_letterbox_and_back(tmp_path):
    objs = obj("A1", 10, 10, 30, 20) + obj("A5", 40, 30, 80, 60)
    root = make_voc(tmp_path / "ds", {"a": objs}, size=(60, 100))
    ds = DetectionDataset(root, "train", imgsz=64)
    img, labels, meta = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
    assert meta["orig_size"] == (60, 100) and meta["image_id"] == "a"
    rx, ry = meta["ratio"]
    assert (
        meta["pad"] == (0, (64 - 39) // 2) and rx == pytest.approx(64 / 100) and ry == pytest.approx(39 / 60)
    )
    expect = np.array([[10, 10, 30, 20], [40, 30, 80, 60]], np.float64)
    expect[:, [0, 2]] *= rx
    expect[:, [1, 3]] = expect[:, [1, 3]] * ry + meta["pad"][1]
    np.testing.assert_allclose(labels[:, 1:].numpy(), expect, atol=1e-4)
    assert labels[:, 0].tolist() == [0, 4]
    back = boxes_to_original(labels[:, 1:], meta["ratio"], meta["pad"], meta["orig_size"])
    np.testing.assert_allclose(back.numpy(), [[10, 10, 30, 20], [40, 30, 80, 60]], atol=1e-4)
    assert (img[:, :12] == 114).all() and (img[:, -13:] == 114).all()  # gray padding, RGB order
    t, m = preprocess_image(cv2.imread(str(root / "JPEGImages" / "a.jpg")), 64)
    torch.testing.assert_close(t, img.float() / 255)
    assert m["pad"] == meta["pad"]


def test_collate(synth):
    ds = DetectionDataset(synth, "val", imgsz=96)
    images, targets, metas = collate([ds[0], ds[1], ds[2]])
    assert (
        images.shape == (3, 3, 96, 96)
        and images.dtype == torch.float32
        and 0 <= images.min() <= images.max() <= 1
    )
    n = [len(ds[i][1]) for i in range(3)]
    assert (
        targets.shape == (sum(n), 6) and targets[:, 0].tolist() == [0.0] * n[0] + [1.0] * n[1] + [2.0] * n[2]
    )
    torch.testing.assert_close(targets[n[0] : n[0] + n[1], 1:], ds[1][1])
    assert [m["image_id"] for m in metas] == ["9", "10", "11"]


def test_train_dataset_deterministic_and_mosaic_switch(synth):
    ds = DetectionDataset(synth, "train", imgsz=96, augment=True, seed=7)
    a = ds[3]
    torch.manual_seed(123)
    np.random.seed(5)
    b = ds[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(1)
    c = ds[3]
    assert not torch.equal(a[0], c[0])
    other = DetectionDataset(synth, "train", imgsz=96, augment=True, seed=7)
    other.set_epoch(1)
    assert torch.equal(other[3][0], c[0])
    assert any(ds[i][2]["mosaic"] for i in range(len(ds)))
    ds.mosaic = False
    assert not any(ds[i][2]["mosaic"] for i in range(len(ds)))
    for i in range(len(ds)):
        img, lab, _ = ds[i]
        assert img.shape == (3, 96, 96)
        assert (lab[:, 1:] >= 0).all() and (lab[:, 1:] <= 96).all()
        assert ((lab[:, 3] - lab[:, 1]) > 2).all() and ((lab[:, 4] - lab[:, 2]) > 2).all()


def test_undecodable_image_at_read_time(tmp_path):
    root = make_voc(tmp_path / "ds", {"a": obj("A1", 1, 1, 5, 5)})
    ds = DetectionDataset(root, "train", imgsz=64, cache=False)
    data = (root / "JPEGImages" / "a.jpg").read_bytes()
    (root / "JPEGImages" / "a.jpg").write_bytes(data[:20])  # header kept, data cut
    with pytest.raises(DatasetError, match="a.jpg"):
        ds[0]


def test_bad_imgsz(synth):
    with pytest.raises(DatasetError, match="multiple of 32"):
        DetectionDataset(synth, "val", imgsz=100, augment=False, hyp=AugmentConfig())


def test_class_hints_name_keys_that_exist(tmp_path):
    """Every "unknown class" / class-list hint names a key the verbs accept (``names``), never ``class_names``."""
    from visiontrain.config import flat_keys
    from visiontrain.detect.config import DetectTrainConfig, EvalConfig, SplitConfig

    for schema in (DetectTrainConfig, EvalConfig, SplitConfig):
        assert "names" in [k for k, *_ in flat_keys(schema)] and "class_names" not in [k for k, *_ in flat_keys(schema)]
    messages = []
    voc = make_voc(tmp_path / "voc", {"a": obj("B52", 1, 1, 5, 5)})
    coco = make_coco(tmp_path / "coco", [{"id": 1, "image_id": 11, "category_id": 9, "bbox": [1, 1, 2, 2]}])
    yolo = make_yolo(tmp_path / "yolo", {"a": "7 0.5 0.5 0.2 0.2\n"})
    for source, split, given in ((voc, "train", None), (coco, "val", None), (yolo, "train", None),
                                 (yolo, "train", ["x"])):
        with pytest.raises(DatasetError) as e:
            load_labels(source, split, class_names=given, cache=False)
        messages.append(str(e.value))
    assert all("class_names" not in m for m in messages), messages
    assert "names=[...]" in messages[0] and "names=[...]" in messages[1]
    assert "add the class to 'names' in" in messages[2] and "data.yaml" in messages[2]
    assert "names=['x'] was given; drop names=" in messages[3]
