"""Two torchrun agents on this machine stand in for two nodes (``--nnodes 2``, c10d rendezvous on
127.0.0.1): detection and flow training end bit-identical to one agent running both processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch import QUIET, assert_same_state, env, free_port, run_cli

from visiontrain.detect.synthetic import write_synthetic_mar20
from visiontrain.flow.synthetic import write_synthetic_chairs


def two_nodes(args: list[str]) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d`` twice, side by side."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test-job", "-m", "visiontrain",
           *args]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
             for _ in range(2)]
    return [subprocess.CompletedProcess(cmd, p.wait(timeout=600), p.communicate()[0]) for p in nodes]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    return {"detect": ["train", "detect", f"data={write_synthetic_mar20(root / 'mar20', 16, 4, 64, 1)}", "imgsz=64",
                       "batch_size=8", "max_steps=3"],
            "flow": ["train", "flow", f"data=chairs:{write_synthetic_chairs(root / 'chairs', 8, 2, (128, 160), 0)}",
                     "crop=128x160", "batch_size=4", "num_flow_updates_train=2", "num_flow_updates_eval=2",
                     "max_steps=3"]}


@pytest.mark.parametrize("task", ["detect", "flow"])
def test_two_nodes_equal_one_node_with_two_processes(data, tmp_path, task):
    args = [*data[task], "device=cpu", *QUIET]
    one = run_cli([*args, f"out={tmp_path / 'one'}"], nproc=2)
    assert one.returncode == 0, one.stdout[-3000:]
    nodes = two_nodes([*args, f"out={tmp_path / 'two'}"])
    for node in nodes:
        assert node.returncode == 0, node.stdout[-3000:]
    assert "2 rank(s)" in "".join(n.stdout for n in nodes)
    assert_same_state(tmp_path / "one/checkpoints/last.pt", tmp_path / "two/checkpoints/last.pt")
