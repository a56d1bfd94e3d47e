"""Suite-wide settings: one torch thread per test process.

On a small shared CPU (CI, laptops) several torch threads per process mostly spin while waiting for
each other; the tests' numerics do not depend on the thread count."""

import torch

torch.set_num_threads(1)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/launch.py: running the CLI and torchrun in subprocesses
