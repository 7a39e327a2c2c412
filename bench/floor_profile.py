"""Where per-sample gradients lose against the floor: torch's profiler over the featurizer's vmap-of-grad call and
over the floor (one batched forward + backward of the same noisy images, no per-sample gradients), op by op.

    OMP_NUM_THREADS=1 python bench/floor_profile.py --out bench/results/floor-profile.json

The shipped digits UNet's configuration (0.65M parameters, random weights), batch 4, TRAK's Simple loss at K = 10,
gradients only (no projection), one torch thread (so ops are timed without thread hand-offs), `--calls` profiled
calls of each after a warm-up. Prints each path's self time by op and groups them: convolution forward,
convolution backward, and the elementwise and layout ops (mul, add, copy, sum, sigmoid, silu, group norm, ...).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from model_size import K, SIZES  # the same UNet configurations (this folder is on a bench script's path)
from results_io import emit

CONV_FORWARD = ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution")
CONV_BACKWARD = ("aten::convolution_backward",)
MATMUL = ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm")


def group(name: str) -> str:
    if name in CONV_FORWARD:
        return "convolution forward"
    if name in CONV_BACKWARD:
        return "convolution backward"
    if name in MATMUL:
        return "matrix products"
    return "elementwise, reductions and layout"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    from diffusers import UNet2DModel

    from attribution.features.gradients import GradientSpec, _gradients
    from attribution.models.pixel_ddpm import PixelDDPM
    from attribution.models.schedules import DEFAULT_SCHEDULE, DDPMSchedule

    torch.manual_seed(0)
    config, channels, res = SIZES["digits"]
    model = PixelDDPM(UNet2DModel(sample_size=res, in_channels=channels, out_channels=channels, **config),
                      DDPMSchedule.from_config(DEFAULT_SCHEDULE), None, "cpu")
    spec = GradientSpec(fn="simple", timesteps=tuple(np.linspace(0, 999, K).astype(int).tolist()))
    x = torch.randn(a.batch, channels, res, res)
    keys = [f"train/{i}" for i in range(a.batch)]

    def per_sample():
        _gradients(model, x, keys, spec, None, per_timestep=False)

    def floor():
        unet = model.unet
        unet.requires_grad_(True)
        noisy, t = x.repeat_interleave(K, 0), torch.linspace(0, 999, K).long().repeat(a.batch)
        unet.zero_grad(set_to_none=True)
        unet(noisy, t).sample.pow(2).mean().backward()
        unet.requires_grad_(False)

    out = {"model": "digits", "batch": a.batch, "K": K, "threads": torch.get_num_threads(), "calls": a.calls}
    for name, fn in (("per-sample (vmap of grad)", per_sample), ("floor", floor)):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.calls):
                fn()
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        groups: dict[str, float] = {}
        for op, seconds in ops.items():
            groups[group(op)] = groups.get(group(op), 0.0) + seconds
        total = sum(ops.values())
        out[name] = {"seconds_per_call": round(total / a.calls, 3),
                     "groups_seconds_per_call": {g: round(s / a.calls, 3) for g, s in sorted(groups.items())},
                     "top_ops_seconds_per_call": {op: round(s / a.calls, 4) for op, s in
                                                  sorted(ops.items(), key=lambda kv: -kv[1])[:10]}}
        print(f"{name}: {total / a.calls:.3f} s per call", file=sys.stderr)
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
