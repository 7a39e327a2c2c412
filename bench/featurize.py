"""Featurization throughput and peak memory: our pipeline against a traker-only pipeline.

Both featurize the first --n images of the checkpoint's training set with the TRAK output (Simple loss averaged
over the same K uniform timesteps with the same noise) and project to k dimensions:
- ours:   attribution.engine.Attributor (vmap per-sample gradients, our sparse JL projector, the cache/ store);
- traker: trak.TRAKer with a diffusion model output, device='cpu', fp32 and its default CPU projector
          (BasicProjector, dense Gaussian); featurize() only.

Run each pipeline in its own process so peak memory is its own:
    python bench/featurize.py --pipeline ours   --checkpoint digits --n 128
    python bench/featurize.py --pipeline traker --checkpoint digits --n 128
It prints one JSON line: pipeline, n, K, k, seconds, sample_timesteps_per_s, peak_rss_mib.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from attribution import ImageDataset, load_dataset, load_model
from attribution.features.timesteps import noise_for, select_timesteps


def subset(d: ImageDataset, n: int) -> ImageDataset:
    return ImageDataset(d.spec, d.split, d.pixels[:n].copy(), d.labels[:n].copy(), d.class_names,
                        d.source_index[:n].copy())


def run_ours(model, data, K, k, batch):
    from attribution.engine import Attributor
    from attribution.features.config import FeatureConfig

    with tempfile.TemporaryDirectory() as tmp:
        att = Attributor(model, data, FeatureConfig(fn="simple", timesteps=K, proj_dim=k, projector="sjlt"),
                         cache=tmp, batch_size=batch)
        start = time.perf_counter()
        att.featurize()
        return time.perf_counter() - start


def run_traker(model, data, K, k, batch):
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput

    ts = select_timesteps("uniform", K, model.num_timesteps)
    schedule = model.schedule

    class DiffusionSimpleLoss(AbstractModelOutput):
        """The Simple loss of one example averaged over fixed timesteps and pre-drawn noise (Q = 1)."""

        def __init__(self):
            super().__init__()

        def get_output(self, unet, weights, buffers, x0, noise):
            x_t = schedule.add_noise(x0.unsqueeze(0).expand_as(noise), noise, ts)
            eps_hat = torch.func.functional_call(unet, (weights, buffers), (x_t, ts), {"return_dict": False})[0]
            return ((eps_hat - noise) ** 2).flatten(1).mean(1).mean()

        def get_out_to_loss_grad(self, unet, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=model.unet, task=DiffusionSimpleLoss(), train_set_size=len(data), save_dir=tmp,
                        device="cpu", use_half_precision=False, proj_dim=k, logging_level=40)
        traker.load_checkpoint(model.unet.state_dict(), model_id=0)
        x_all = data.tensors()
        keys = [f"train/{i}" for i in range(len(data))]
        start = time.perf_counter()
        for s in range(0, len(data), batch):
            x0 = x_all[s:s + batch]
            noise = noise_for(keys[s:s + batch], ts, tuple(x0.shape[1:]), 0)
            traker.featurize(batch=(x0, noise), num_samples=len(x0))
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", choices=["ours", "traker"], required=True)
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16, help="our gradient batch (our default)")
    p.add_argument("--traker-batch-size", type=int, default=32,
                   help="traker's batch: its projector regenerates the matrix per call, so larger batches amortize "
                        "it; 32 is its default proj_max_batch_size")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    model = load_model(a.checkpoint, a.device)
    data = subset(load_dataset(a.dataset, "train", model.resolution, model.channels), a.n)
    run = run_ours if a.pipeline == "ours" else run_traker
    batch = a.batch_size if a.pipeline == "ours" else a.traker_batch_size
    seconds = run(model, data, a.timesteps, a.proj_dim, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pipeline": a.pipeline, "device": a.device, "n": a.n, "K": a.timesteps, "k": a.proj_dim,
                      "batch": batch, "seconds": round(seconds, 2),
                      "sample_timesteps_per_s": round(a.n * a.timesteps / seconds, 1),
                      "peak_rss_mib": round(peak)}))


if __name__ == "__main__":
    main()
