"""Featurization as the model grows: throughput and peak memory on the CPU at 0.65M, ~9M and 35.7M parameters (the
D-TRAK paper's CIFAR UNet), against the floor of one batched forward + backward without per-sample gradients.

    python bench/model_size.py --out bench/results/model-size.json            # every size, batch sizes 1 and 4
    python bench/model_size.py --one cifar --batch 4                          # one measurement (what the above runs)

Each measurement runs in a process of its own (its peak resident memory is the process's): random weights, random
32x32x3 images (16x16x1 for the 0.65M digits UNet), TRAK's Simple-loss features at K = 10 uniform timesteps,
projected by `sjlt` and by `grass` to k = 32,768; a warm-up batch, then `--batches` timed batches. The floor is
the same batch's K noisy copies through one forward and one backward of the summed loss (what training costs),
timed the same way. Two torch threads (the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from results_io import emit

SIZES = {  # name -> (UNet2DModel config, channels, resolution)
    "digits": (dict(layers_per_block=1, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8), 1, 16),
    "mid": (dict(layers_per_block=2, block_out_channels=(64, 128, 128, 128),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32), 3, 32),
    "cifar": (dict(layers_per_block=2, block_out_channels=(128, 256, 256, 256),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), dropout=0.1,
                   attention_head_dim=None, norm_num_groups=32, flip_sin_to_cos=False, freq_shift=1), 3, 32),
}
K, PROJ_DIM = 10, 32768


def measure(size: str, batch: int, batches: int) -> dict:
    from diffusers import UNet2DModel

    from attribution import Attributor, FeatureConfig, ImageDataset
    from attribution.models.schedules import DDPMSchedule
    from attribution.models.schedules import DEFAULT_SCHEDULE
    from attribution.models.pixel_ddpm import PixelDDPM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config, channels, res = SIZES[size]
    model = PixelDDPM(UNet2DModel(sample_size=res, in_channels=channels, out_channels=channels, **config),
                      DDPMSchedule.from_config(DEFAULT_SCHEDULE), None, "cpu")
    params = sum(p.numel() for p in model.parameters().values())
    n = batch * (batches + 1)
    pixels = np.random.default_rng(0).integers(0, 256, (n, res, res, channels), dtype=np.uint8)
    data = ImageDataset(f"synthetic-{size}", "train", pixels, np.zeros(n, dtype=np.int64), ["x"], np.arange(n))
    out = {"size": size, "params": params, "batch": batch, "K": K, "k": PROJ_DIM, "threads": 2}
    for projector in ("sjlt", "grass"):
        att = Attributor(model, data, FeatureConfig(fn="simple", timesteps=K, proj_dim=PROJ_DIM, projector=projector),
                         cache="/tmp/model-size-cache", batch_size=batch)
        keys = [f"train/{i}" for i in range(n)]
        att.features_of(data.tensors(range(batch)), keys[:batch])  # warm-up (projector set-up, allocator)
        start = time.perf_counter()
        for b in range(1, batches + 1):
            rows = list(range(b * batch, (b + 1) * batch))
            att.features_of(data.tensors(rows), keys[b * batch:(b + 1) * batch])
        seconds = time.perf_counter() - start
        out[projector] = {"sample_timesteps_per_s": round(batches * batch * K / seconds, 2),
                          "seconds_per_image": round(seconds / (batches * batch), 3)}
        del att
    # the floor: the same K noisy copies per image, one batched forward + backward of the summed loss
    unet = model.unet
    unet.requires_grad_(True)  # (the adapter keeps the weights frozen: gradients are taken functionally)
    x = data.tensors(range(batch)).repeat_interleave(K, 0)
    t = torch.linspace(0, 999, K).long().repeat(batch)
    unet(x, t).sample.pow(2).mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        unet.zero_grad(set_to_none=True)
        unet(x, t).sample.pow(2).mean().backward()
    seconds = time.perf_counter() - start
    out["floor"] = {"sample_timesteps_per_s": round(batches * batch * K / seconds, 2)}
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", choices=tuple(SIZES), help="one measurement in this process")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--sizes", default="digits,mid,cifar")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--out")
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.batch, a.batches)))
        return 0
    rows = []
    for size in a.sizes.split(","):
        for batch in (int(b) for b in a.batch_sizes.split(",")):
            res = subprocess.run([sys.executable, __file__, "--one", size, "--batch", str(batch), "--batches",
                                  str(a.batches)], capture_output=True, text=True)
            if res.returncode:
                rows.append({"size": size, "batch": batch, "error": res.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return emit(rows, a.out)


if __name__ == "__main__":
    sys.exit(main())
