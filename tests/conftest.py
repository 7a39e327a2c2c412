"""Shared fixtures for the test suite.

- `tiny_run`: a training-run folder (preset "tiny", 2 epochs on the digits training split, checkpoints at
  epochs 1 and 2), trained once per session in a temporary folder. About 5 s on two CPU cores.

Everything is written under pytest's temporary folders, never into the working tree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch is imported anywhere: the reference machine has 2 cores, and one thread keeps runs reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `import attribution` works under plain `pytest` too
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder: run.json, epoch-1/ and epoch-2/ (DDPMPipeline folders), tiny UNet, digits, seed 0."""
    from attribution.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = TrainConfig(dataset="digits", out=str(out), epochs=2, checkpoints=2, preset="tiny", batch_size=128,
                      seed=0, device="cpu")
    return train(cfg)
