"""Training throughput: `attribution.train.train` against a plain PyTorch loop of the same UNet, per core.

    python bench/train_throughput.py --configs small:2,small:1,eval:1 --epochs 2 --repeats 2
    python bench/train_throughput.py --raw --configs small:2,small:1,eval:1   # bare optimizer steps only
    python bench/train_throughput.py --randomness --configs eval:1 --epochs 3 --repeats 3   # crn against stream

For each PRESET:THREADS it runs `train` (the full call: model construction, the loop, the final checkpoint
written) and a plain loop over the same tensors (same UNet, AdamW + warm-up/cosine LambdaLR, same random draws,
no bookkeeping, no checkpoint), alternating A/B/A/B so that other load on the machine hits both alike, and prints
samples/s, samples/s per core (= per thread), and the ratio train/plain (median over repeats), by wall time and
by the process's CPU time (the fairer figure for one-thread runs on a shared machine). With --randomness it times
`train` with common random numbers against `train` with one stream instead (alternating, same recipe), and prints
the ratio crn/stream of samples/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time


import torch

from attribution import load_dataset, train_model as train, TrainConfig
from attribution.models.schedules import DEFAULT_SCHEDULE
from attribution.models.presets import unet_for
from attribution.train import lr_lambda


def plain_loop(x_all: torch.Tensor, preset: str, epochs: int, batch: int, lr: float, seed: int = 0) -> None:
    """A bare PyTorch DDPM training loop with the recipe of `train`."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    n = len(x_all)
    unet = unet_for(x_all.shape[-1], x_all.shape[1], preset).train()
    abar = DDPMScheduler(**DEFAULT_SCHEDULE).alphas_cumprod.float()
    steps = math.ceil(n / batch) * epochs
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, int(0.1 * steps))))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(0, n, batch):
            x0 = x_all[perm[b:b + batch]]
            t = torch.randint(0, 1000, (len(x0),), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            a = abar[t][:, None, None, None]
            loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def timed(fn, *args, **kw) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call. On a shared machine the CPU time is the fairer
    figure for one-thread runs: it does not count the time other processes held the core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kw)
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--configs", default="small:2,small:1,eval:1", help="PRESET:THREADS,...")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--raw", action="store_true", help="only time bare optimizer steps on random tensors "
                                                     "(5 steps after 2 warm-up steps per PRESET:THREADS)")
    p.add_argument("--randomness", action="store_true", help="time train with crn against train with stream")
    a = p.parse_args()
    if a.raw:
        return raw_steps(a)
    if a.randomness:
        return randomness_ab(a)
    data = load_dataset(a.dataset, "train")
    x_all = data.tensors()
    samples = len(x_all) * a.epochs
    rows = []
    for item in a.configs.split(","):
        preset, threads = item.split(":")
        torch.set_num_threads(int(threads))
        t_train, t_plain = [], []
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t_train.append(timed(train, TrainConfig(dataset=a.dataset, out=tmp, epochs=a.epochs,
                                                        batch_size=a.batch_size, lr=a.lr, preset=preset,
                                                        checkpoints=1, device="cpu")))
            t_plain.append(timed(plain_loop, x_all, preset, a.epochs, a.batch_size, a.lr))
        tt, tp = (statistics.median(w for w, _ in t_train), statistics.median(w for w, _ in t_plain))
        ct, cp = (statistics.median(c for _, c in t_train), statistics.median(c for _, c in t_plain))
        rows.append({"preset": preset, "threads": int(threads), "batch": a.batch_size, "samples": samples,
                     "train_samples_per_s": round(samples / tt, 1), "plain_samples_per_s": round(samples / tp, 1),
                     "train_per_core": round(samples / tt / int(threads), 1), "ratio_train_over_plain":
                     round(tp / tt, 3), "train_samples_per_cpu_s": round(samples / ct, 1),
                     "plain_samples_per_cpu_s": round(samples / cp, 1), "ratio_by_cpu_time": round(cp / ct, 3)})
        rows[-1]["load_avg_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(rows[-1]), flush=True)


def randomness_ab(a) -> None:
    """samples/s of `train` with crn and with stream randomness (alternating A/B), and their ratio."""
    samples = len(load_dataset(a.dataset, "train")) * a.epochs
    for item in a.configs.split(","):
        preset, threads = item.split(":")
        torch.set_num_threads(int(threads))
        times: dict[str, list] = {"stream": [], "crn": []}
        for _ in range(a.repeats):
            for mode in ("stream", "crn"):
                with tempfile.TemporaryDirectory() as tmp:
                    times[mode].append(timed(train, TrainConfig(dataset=a.dataset, out=tmp, epochs=a.epochs,
                                                                batch_size=a.batch_size, lr=a.lr, preset=preset,
                                                                checkpoints=1, device="cpu", randomness=mode)))
        wall = {m: statistics.median(w for w, _ in t) for m, t in times.items()}
        cpu = {m: statistics.median(c for _, c in t) for m, t in times.items()}
        print(json.dumps({"preset": preset, "threads": int(threads), "batch": a.batch_size, "samples": samples,
                          "stream_samples_per_s": round(samples / wall["stream"], 1),
                          "crn_samples_per_s": round(samples / wall["crn"], 1),
                          "ratio_crn_over_stream": round(wall["stream"] / wall["crn"], 3),
                          "stream_samples_per_cpu_s": round(samples / cpu["stream"], 1),
                          "crn_samples_per_cpu_s": round(samples / cpu["crn"], 1),
                          "ratio_by_cpu_time": round(cpu["stream"] / cpu["crn"], 3),
                          "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)


def raw_steps(a) -> None:
    """samples/s of forward + backward + AdamW steps alone (no data handling), per preset and thread count."""
    for item in a.configs.split(","):
        preset, threads = item.split(":")
        torch.set_num_threads(int(threads))
        torch.manual_seed(0)
        unet = unet_for(16, 1, preset).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=a.lr)
        x, t = torch.randn(a.batch_size, 1, 16, 16), torch.randint(0, 1000, (a.batch_size,))
        for i in range(7):
            if i == 2:
                start = time.perf_counter()
            loss = ((unet(x, t).sample - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_s = 5 * a.batch_size / (time.perf_counter() - start)
        print(json.dumps({"preset": preset, "threads": int(threads), "batch": a.batch_size,
                          "params": sum(p.numel() for p in unet.parameters()), "samples_per_s": round(per_s, 1),
                          "per_core": round(per_s / int(threads), 1), "load_avg_1min": round(os.getloadavg()[0], 2)}),
              flush=True)


if __name__ == "__main__":
    main()
