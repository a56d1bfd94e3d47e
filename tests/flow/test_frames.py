"""Unlabeled frame pairs from a folder (natural sort) and from a video (written here with cv2.VideoWriter)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from visiontrain.flow.frames import (
    FramesDataset,
    FramesError,
    VideoDataset,
    collate_pairs,
    natural_key,
    unlabeled_dataset,
)


def write_frames(folder: Path, names: list[str], size: tuple[int, int] = (24, 32)) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i, name in enumerate(names):
        rgb = np.full((*size, 3), 0, np.uint8)
        rgb[..., 0] = 10 * i  # frame index readable from the red channel
        rgb[..., 1] = np.arange(size[1], dtype=np.uint8)[None, :]
        cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        frames.append(rgb)
    return frames


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["img10.png", "img2.png", "img1.png", "Img3.png", "img2b.png"]
    assert sorted(names, key=natural_key) == ["img1.png", "img2.png", "img2b.png", "Img3.png", "img10.png"]


def test_frames_dataset_pairs_consecutive_frames_in_natural_order(tmp_path: Path) -> None:
    order = ["img1.png", "img2.png", "img3.png", "img10.png", "img11.png"]
    write_frames(tmp_path / "seq", order)
    (tmp_path / "seq" / "notes.txt").write_text("not a frame")
    dataset = FramesDataset(tmp_path / "seq")
    assert [p.name for p in dataset.files] == order
    assert len(dataset) == 4
    sample = dataset[2]  # (img3, img10)
    assert sample["id"] == "img3-img10" and sample["flow"] is None and sample["valid"] is None
    assert sample["image1"].shape == (3, 24, 32) and sample["image1"].dtype == torch.float32
    assert sample["image1"][0, 0, 0].item() == pytest.approx(20 / 255)  # the third written frame (index 2)
    assert sample["image2"][0, 0, 0].item() == pytest.approx(30 / 255)
    assert sample["image1"][1, 0, 31].item() == pytest.approx(31 / 255)  # RGB order, not BGR
    with pytest.raises(IndexError):
        dataset[4]


def test_frames_dataset_resize_and_size_mismatch(tmp_path: Path) -> None:
    write_frames(tmp_path / "a", ["f0.png", "f1.png"], size=(24, 32))
    write_frames(tmp_path / "a", ["f2.png"], size=(20, 32))
    with pytest.raises(FramesError, match=r"f2.png: size 20×32 \(H×W\).*size=\(H, W\)"):
        FramesDataset(tmp_path / "a")
    dataset = FramesDataset(tmp_path / "a", size=(16, 16))
    assert dataset[1]["image2"].shape == (3, 16, 16)


def test_frames_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FramesError, match="not a directory"):
        FramesDataset(tmp_path / "missing")
    write_frames(tmp_path / "one", ["only.png"])
    with pytest.raises(FramesError, match="at least 2"):
        FramesDataset(tmp_path / "one")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "1.png").write_bytes(b"not a png")
    with pytest.raises(FramesError, match="0.png: not a readable image"):
        FramesDataset(tmp_path / "bad")


def write_video(path: Path, count: int, size: tuple[int, int] = (48, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(count):
        frame = np.zeros((*size, 3), np.uint8)
        frame[..., 2] = 20 * i  # red (BGR order for the writer), flat so JPEG keeps it almost exactly
        writer.write(frame)
    writer.release()


def test_video_dataset_reads_frames_once_with_a_cap(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, 8)
    dataset = VideoDataset(path)
    assert len(dataset) == 7 and dataset.frames.shape == (8, 48, 64, 3)
    sample = dataset[3]
    assert sample["id"] == "clip:000003" and sample["flow"] is None
    assert abs(sample["image1"][0].mean().item() * 255 - 60) < 3  # red channel of frame 3
    assert abs(sample["image2"][0].mean().item() * 255 - 80) < 3
    assert sample["image1"][1:].abs().max().item() < 3 / 255
    capped = VideoDataset(path, size=(32, 32), max_frames=5, step=2)
    assert capped.frames.shape == (5, 32, 32, 3) and len(capped) == 3
    assert abs(capped[1]["image2"][0].mean().item() * 255 - 60) < 3  # frame 1 + step 2


def test_video_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FramesError, match="file not found"):
        VideoDataset(tmp_path / "none.avi")
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"\x00" * 1000)
    with pytest.raises(FramesError, match="broken.avi"):
        VideoDataset(broken)
    single = tmp_path / "single.avi"
    write_video(single, 1)
    with pytest.raises(FramesError, match="decoded 1 frame"):
        VideoDataset(single)


def test_spec_parsing_and_collate(tmp_path: Path) -> None:
    write_frames(tmp_path / "seq", ["a1.png", "a2.png", "a3.png"])
    write_video(tmp_path / "v.avi", 3)
    frames = unlabeled_dataset(f"frames:{tmp_path / 'seq'}")
    video = unlabeled_dataset(f"video:{tmp_path / 'v.avi'}", size=(24, 32))
    assert isinstance(frames, FramesDataset) and isinstance(video, VideoDataset)
    with pytest.raises(FramesError, match="unknown kind"):
        unlabeled_dataset("images:/x")
    batch = collate_pairs([frames[0], video[1]])
    assert batch["image1"].shape == (2, 3, 24, 32) and batch["flow"] is None and batch["valid"] is None
    assert batch["id"] == ["a1-a2", "v:000001"]
    labeled = [{**frames[0], "flow": torch.zeros(2, 24, 32), "valid": torch.ones(24, 32, dtype=torch.bool)}] * 2
    assert collate_pairs(labeled)["flow"].shape == (2, 2, 24, 32)
