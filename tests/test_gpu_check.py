"""The GPU check in one command (bench/gpu_check.py; GPU readiness, issue 9, item 10): its part b passes on any
machine and names what it could not check; with a GPU, CPU and CUDA features agree for sjlt and gaussian. Tests
marked `cuda` need a GPU and skip cleanly without one.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine_support import needs_cuda


# -- the GPU check in one command --------------------------------------------------------------------------------


def _gpu_check_module():
    from bench import gpu_check  # the repository root is on the path (pyproject.toml: pythonpath)

    return gpu_check


def test_gpu_check_part_b_passes_and_names_what_it_could_not_check(capsys):
    rc = _gpu_check_module().main(["--part", "b"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    summary = lines[-1]
    assert rc == 0 and summary["summary"] == "ok"
    checks = [x for x in lines if x.get("part") == "b"]
    assert sum(1 for x in checks if x.get("ok")) >= 4  # the Gaussian reference and CPU determinism, 3 projectors
    if not torch.cuda.is_available():
        assert any("CPU/CUDA agreement" in m for m in summary["not_checked"])
        assert sum(1 for x in checks if x.get("status") == "not checked") == 3


@pytest.mark.cuda
@needs_cuda
def test_cpu_and_cuda_features_agree_for_sjlt_gaussian_and_grass():
    records = _gpu_check_module().part_b(cuda=True)
    agree = [r for r in records if "agree" in r["check"]]
    assert len(agree) == 3 and all(r["ok"] for r in agree), agree
