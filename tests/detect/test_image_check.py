"""Damaged images in detection data are found before training, named, and raised or skipped."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from visiontrain.cli import main
from visiontrain.detect.config import DetectTrainConfig
from visiontrain.detect.data import DatasetError, load_labels
from visiontrain.detect.synthetic import write_synthetic_mar20
from visiontrain.detect.task import DetectTask

TRAIN_BAD = {"1": "half", "2": "empty"}  # train ids 1..6
VAL_BAD = {"8": "noise"}  # val ids 7..9


def damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "empty": b"",
                      "noise": np.random.default_rng(0).bytes(len(data))}[how])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_synthetic_mar20(tmp_path_factory.mktemp("clean") / "data", train=6, val=3, imgsz=64, seed=1)


@pytest.fixture
def damaged(clean, tmp_path):
    """A copy of the clean set with a half JPEG and an empty file in train and random bytes in val."""
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    for image_id, how in {**TRAIN_BAD, **VAL_BAD}.items():
        damage(root / "JPEGImages" / f"{image_id}.jpg", how)
    return root


def named(message: str) -> set[str]:
    """The image ids among 1..9 whose file is named in ``message``."""
    return {i for i in map(str, range(1, 10)) if f"JPEGImages/{i}.jpg:" in message}


def test_clean_synthetic_data_passes(clean):
    labels = load_labels(clean, "train")
    assert len(labels) == 6 and labels.bad_images == []


def test_load_labels_names_every_damaged_image_of_the_split(damaged):
    with pytest.raises(DatasetError) as e:
        load_labels(damaged, "train")
    msg = str(e.value)
    assert named(msg) == set(TRAIN_BAD)
    assert "Damaged images (2)" in msg and "skip_bad_images=true" in msg
    assert "end-of-image marker" in msg and "empty file (0 bytes)" in msg


def test_skip_leaves_them_out_and_logs_the_count(damaged, caplog):
    with caplog.at_level(logging.WARNING):
        labels = load_labels(damaged, "train", bad_images="skip")
    assert sorted(r.image_id for r in labels.records) == ["3", "4", "5", "6"]
    assert [p.rsplit("/", 1)[1] for p, _ in labels.bad_images] == ["1.jpg", "2.jpg"]
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 2 damaged image(s) of 6" in warning and "1.jpg" in warning and "2.jpg" in warning
    # the label cache follows the files: a repaired image is back at the next load
    shutil.copy(damaged / "JPEGImages" / "3.jpg", damaged / "JPEGImages" / "2.jpg")
    labels = load_labels(damaged, "train", bad_images="skip")
    assert sorted(r.image_id for r in labels.records) == ["2", "3", "4", "5", "6"]


def test_a_truncated_image_is_found_even_with_a_warm_label_cache(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root, ignore=shutil.ignore_patterns(".visiontrain_cache"))
    assert not load_labels(root, "train").from_cache
    assert load_labels(root, "train").from_cache
    path = root / "JPEGImages" / "4.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # same size, zero-filled tail
    with pytest.raises(DatasetError, match=r"JPEGImages/4\.jpg: truncated JPEG: the data ends without"):
        load_labels(root, "train")


def test_a_copied_dataset_reads_its_own_images_not_the_cached_paths(clean, tmp_path):
    load_labels(clean, "train")  # writes the cache inside the clean set
    root = tmp_path / "copy"
    shutil.copytree(clean, root)  # cache included
    labels = load_labels(root, "train")
    assert not labels.from_cache and all(r.path.startswith(str(root)) for r in labels.records)


def test_task_reports_both_splits_in_one_error(damaged):
    cfg = DetectTrainConfig(data=str(damaged), imgsz=64, batch_size=2, max_steps=1)
    with pytest.raises(DatasetError) as e:
        DetectTask(cfg)
    msg = str(e.value)
    assert named(msg) == set(TRAIN_BAD) | set(VAL_BAD)
    assert "Damaged images (3)" in msg and "voc train (" in msg and "voc test (" in msg


def test_task_with_skip_bad_images(damaged, caplog):
    cfg = DetectTrainConfig(data=str(damaged), imgsz=64, batch_size=2, max_steps=1, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        task = DetectTask(cfg)
    train, val = task.build_datasets()
    assert len(train) == 4 and len(val) == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 damaged image(s) of 6" in text and "skipped 1 damaged image(s) of 3" in text


@pytest.fixture
def trained(damaged, tmp_path):
    """One training step on the damaged set with skip_bad_images=true; returns the checkpoint."""
    run = tmp_path / "run"
    rc = main(["train", "detect", f"data={damaged}", f"out={run}", "imgsz=64", "max_steps=1", "batch_size=2",
               "skip_bad_images=true", "tensorboard=false", "progress=false", "plots=false", "warmup_epochs=0"])
    assert rc == 0
    return run / "checkpoints" / "last.pt"


def test_train_eval_and_predict_through_the_cli(damaged, trained, tmp_path, capsys, caplog):
    # training without the key stops before step 1 and names the files
    capsys.readouterr()
    rc = main(["train", "detect", f"data={damaged}", f"out={tmp_path / 'run2'}", "imgsz=64", "max_steps=1",
               "batch_size=2", "tensorboard=false", "progress=false", "plots=false"])
    err = capsys.readouterr().err
    assert rc == 2 and named(err) == set(TRAIN_BAD) | set(VAL_BAD)
    assert not (tmp_path / "run2").exists()  # nothing was started
    # eval: the same error, or the images left out
    args = ["eval", "detect", f"weights={trained}", f"data={damaged}", f"out={tmp_path / 'eval'}"]
    assert main(args) == 2
    assert named(capsys.readouterr().err) == set(VAL_BAD)
    with caplog.at_level(logging.WARNING):
        assert main(args + ["skip_bad_images=true"]) == 0
    assert "skipped 1 damaged image(s) of 3" in caplog.text and "8.jpg" in caplog.text
    assert (tmp_path / "eval" / "metrics.json").is_file()
    # predict on a folder: the damaged files are skipped with a warning naming each, the rest predicted
    out = tmp_path / "pred"
    assert main(["predict", "detect", f"weights={trained}", f"source={damaged / 'JPEGImages'}", f"out={out}",
                 "conf=0.001"]) == 0
    captured = capsys.readouterr()
    for image_id in (*TRAIN_BAD, *VAL_BAD):
        assert f"warning: {damaged / 'JPEGImages' / image_id}.jpg: " in captured.err
    assert "skipped 3 damaged image(s)" in captured.out
    assert {p.stem for p in out.glob("*.jpg")} == {"3", "4", "5", "6", "7", "9"}
    # predict on one damaged file is an error naming it
    assert main(["predict", "detect", f"weights={trained}", f"source={damaged / 'JPEGImages' / '1.jpg'}",
                 f"out={tmp_path / 'p1'}"]) == 2
    assert "1.jpg: damaged image: truncated JPEG" in capsys.readouterr().err
