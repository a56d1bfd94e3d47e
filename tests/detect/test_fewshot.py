"""The few-shot split tool: K images per novel class, determinism, keep_base, val copied whole, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visiontrain.config import ConfigError, load_config
from visiontrain.detect.cli import split
from visiontrain.detect.config import SplitConfig
from visiontrain.detect.data import load_labels
from visiontrain.detect.fewshot import select_few_shot
from visiontrain.detect.synthetic import write_synthetic_mar20

BASE = [f"A{i}" for i in range(1, 11)]
NOVEL = [f"A{i}" for i in range(11, 21)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_mar20(tmp_path_factory.mktemp("src") / "mar20", train=160, val=12, imgsz=64, seed=3)


def run_split(source: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(SplitConfig, None, [f"data={source}", f"out={out}", "base=A1..A10", *overrides])
    assert split(cfg) == 0
    return json.loads((out / "split.json").read_text())


def images_per_class(labels) -> dict[str, int]:
    counts = dict.fromkeys(labels.class_names, 0)
    for r in labels.records:
        for c in np.unique(r.classes):
            counts[labels.class_names[int(c)]] += 1
    return counts


def test_novel_only_split_has_k_images_per_novel_class_and_no_base_labels(source, tmp_path):
    manifest = run_split(source, tmp_path / "fs", "shots=5", "seed=1", "keep_base=false")
    train = load_labels(tmp_path / "fs", "train")
    counts = images_per_class(train)
    assert all(counts[n] == 0 for n in BASE)
    assert all(counts[n] == 5 for n in NOVEL), counts
    assert manifest["novel"] == NOVEL and manifest["shortfall"] == {} and manifest["excess"] == {}
    assert len(train) == manifest["train_images"] < 50  # only the few-shot images
    src = {r.image_id: r for r in load_labels(source, "train").records}
    for r in train.records:  # exactly the source's novel boxes of that image, nothing else
        s = src[r.image_id]
        novel_rows = s.classes >= 10
        np.testing.assert_allclose(r.boxes, s.boxes[novel_rows], atol=1e-3)
        np.testing.assert_array_equal(r.classes, s.classes[novel_rows])
    by_id = {r.image_id: r for r in train.records}
    for n, ids in manifest["novel_shots"].items():
        k = train.class_names.index(n)
        assert len(ids) == 5 and all(k in by_id[i].classes for i in ids)


def test_keep_base_keeps_every_image_with_base_labels(source, tmp_path):
    run_split(source, tmp_path / "fs", "shots=4", "seed=1", "keep_base=true")
    train = load_labels(tmp_path / "fs", "train")
    src = load_labels(source, "train")
    assert [r.image_id for r in train.records] == [r.image_id for r in src.records]
    counts, src_counts = images_per_class(train), images_per_class(src)
    assert all(counts[n] == src_counts[n] for n in BASE)  # all base data
    assert all(counts[n] == 4 for n in NOVEL), counts
    n_base_boxes = sum(int((r.classes < 10).sum()) for r in src.records)
    assert sum(int((r.classes < 10).sum()) for r in train.records) == n_base_boxes


def test_val_split_is_copied_whole(source, tmp_path):
    run_split(source, tmp_path / "fs", "shots=2", "keep_base=false")
    a, b = load_labels(source, "test"), load_labels(tmp_path / "fs", "test")
    assert [r.image_id for r in a.records] == [r.image_id for r in b.records]
    for ra, rb in zip(a.records, b.records):
        np.testing.assert_array_equal(ra.classes, rb.classes)
        np.testing.assert_allclose(ra.boxes, rb.boxes, atol=1e-3)
        assert Path(rb.path).read_bytes() == Path(ra.path).read_bytes()


def test_selection_is_deterministic_in_the_seed(source, tmp_path):
    m1 = run_split(source, tmp_path / "a", "shots=3", "seed=7", "keep_base=false")
    m2 = run_split(source, tmp_path / "b", "shots=3", "seed=7", "keep_base=false")
    m3 = run_split(source, tmp_path / "c", "shots=3", "seed=8", "keep_base=false")
    assert m1["novel_shots"] == m2["novel_shots"] != m3["novel_shots"]
    for f in sorted((tmp_path / "a").rglob("*.xml")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_shortfall_is_reported_not_hidden(source):
    labels = load_labels(source, "train")
    sel = select_few_shot(labels, NOVEL, shots=1000, seed=0)
    counts = images_per_class(labels)
    assert sel.shortfall == {n: counts[n] for n in NOVEL}
    assert all(len(sel.per_class[n]) == counts[n] for n in NOVEL)  # everything available is used


def test_bad_requests_are_clear_errors(source, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        run_split(source, tmp_path / "full")
    with pytest.raises(ConfigError, match="covers every class"):
        run_split(source, tmp_path / "o1", "base=A1..A20")
    with pytest.raises(ConfigError, match="'B3' is not among"):
        run_split(source, tmp_path / "o2", "base=[A1,B3]")
    with pytest.raises(ConfigError, match="shots=0"):
        run_split(source, tmp_path / "o3", "shots=0")


def test_split_is_a_cli_verb():
    from visiontrain.detect.cli import VERBS

    assert VERBS["split"] == (SplitConfig, split)
