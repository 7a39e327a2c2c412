"""The GPU path in one command: throughput on a CIFAR-2-sized workload, and CPU/CUDA agreement of features.

    python bench/gpu_check.py                 # both parts; without CUDA part (b) on the CPU only, and says so
    python bench/gpu_check.py --part b        # the agreement checks only
    python bench/gpu_check.py --part c        # the Ray fan-out only

(a) Throughput (CUDA only). A synthetic CIFAR-2-sized workload: --n random 32x32x3 images (default 5,000, the size
    of CIFAR-2's training set), the D-TRAK CIFAR UNet config (diffusers' DDPM CIFAR-10 UNet, 35.7M parameters) with
    random weights, TRAK features (Simple loss, K=10 uniform timesteps), k=32768, projected with `trak-cuda` (when
    fast_jl is installed), with `sjlt` and with `grass` (mask-then-sketch). A few batches are timed after a warm-up
    batch; it prints sample-timesteps per second, peak GPU memory, and the projected time for all --n images.
(b) Agreement. A tiny UNet and 8 digits: features computed on the CPU and on CUDA with `sjlt` and `gaussian` (both
    draw their matrices on the CPU) must agree up to float32/TF32 arithmetic; without CUDA, the CPU side is
    computed and checked for determinism and against the CPU-generated Gaussian reference, and the CUDA comparison
    is reported as not checked. `grass` is checked like `sjlt` (its mask is drawn on the CPU too).
(c) Ray. `featurize --ray`'s fan-out (`evaluation.ray_featurize`) on a local Ray (GPU fractions per task where CUDA
    is present): 64 digits featurized by the shipped model in shards must equal one process's features on the same
    device (relative 1e-5 on the CPU; the agreement tolerance on CUDA).

Prints one JSON line per measurement or check, then a summary line; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from attribution import Attributor, FeatureConfig, ImageDataset, load_dataset
from attribution.features.projectors import TrakGaussianProjector, fast_jl_available
from attribution.models.schedules import DDPMSchedule
from attribution.models.pixel_ddpm import PixelDDPM
from attribution.models.schedules import DEFAULT_SCHEDULE
from attribution.models.presets import unet_for

# diffusers' DDPM CIFAR-10 UNet (google/ddpm-cifar10-32), the architecture D-TRAK's CIFAR experiments use.
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                  dropout=0.1, attention_head_dim=None, norm_num_groups=32, flip_sin_to_cos=False, freq_shift=1)
# Tolerance of CPU/CUDA agreement: cuDNN convolutions may use TF32 (10-bit mantissa, ~5e-4 relative per product)
# and reduce in another order; features are sums over ~40k parameters' worth of products, so a relative error of
# the whole feature matrix up to 1e-2 is arithmetic, while a different projection matrix gives ~1.4 (uncorrelated).
AGREE_TOL = 1e-2


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def synthetic_cifar(n: int, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageDataset("synthetic-cifar2", "train", pixels, (np.arange(n) % 2).astype(np.int64),
                        ["a", "b"], np.arange(n))


def part_a(n: int, k: int, K: int, batch: int, batches: int) -> list[dict]:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = PixelDDPM(UNet2DModel(**CIFAR_UNET), DDPMSchedule.from_config(DEFAULT_SCHEDULE), None, device)
    data = synthetic_cifar(n)
    params = sum(p.numel() for p in model.parameters().values())
    out = []
    for projector in ("trak-cuda", "sjlt", "grass"):
        if projector == "trak-cuda" and not fast_jl_available():
            out.append(emit({"part": "a", "projector": projector, "status": "not checked",
                             "reason": "fast_jl is not installed (pip install traker[fast])"}))
            continue
        att = Attributor(model, data, FeatureConfig(fn="simple", timesteps=K, proj_dim=k, projector=projector),
                         cache="/tmp/gpu_check_cache", batch_size=batch)
        rows = list(range(batch))
        att.features_of(data.tensors(rows), [f"train/{i}" for i in rows])  # warm-up (projector, kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for b in range(1, batches + 1):
            rows = list(range(b * batch, (b + 1) * batch))
            feats = att.features_of(data.tensors(rows), [f"train/{i}" for i in rows])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        per_image = seconds / (batches * batch)
        out.append(emit({"part": "a", "projector": projector, "params": params, "K": K, "k": k, "batch": batch,
                         "images_timed": batches * batch, "seconds": round(seconds, 2),
                         "sample_timesteps_per_s": round(batches * batch * K / seconds, 1),
                         "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                         "projected_seconds_for_n": round(per_image * n), "n": n,
                         "finite": bool(np.isfinite(feats).all()), "gpu": torch.cuda.get_device_name()}))
    return out


def part_b(cuda: bool) -> list[dict]:
    torch.manual_seed(0)
    unet = unet_for(16, 1, "tiny")
    digits = load_dataset("digits")
    images, keys = digits.tensors(range(8)), [f"train/{i}" for i in range(8)]
    train = ImageDataset(digits.spec, "train", digits.pixels[:8].copy(), digits.labels[:8].copy(),
                         list(digits.class_names), digits.source_index[:8].copy())
    out = []
    # The Gaussian matrix is the CPU-generated one whatever the device (traker's own BasicProjector draws it on the
    # model's device): block 0 against a CPU generator seeded as traker seeds it.
    p = TrakGaussianProjector(1000, 64, 3, torch.device("cuda" if cuda else "cpu"))
    ref = torch.empty(1000, 63).normal_(generator=torch.Generator().manual_seed(3))
    out.append(emit({"part": "b", "check": "gaussian block 0 is the CPU-generated reference",
                     "ok": bool(torch.equal(p.block(0, torch.device("cpu")), ref))}))
    for projector in ("sjlt", "gaussian", "grass"):
        cfg = FeatureConfig(fn="simple", timesteps=2, proj_dim=256, projector=projector)
        model = PixelDDPM(unet, DDPMSchedule.from_config(DEFAULT_SCHEDULE), None, "cpu")
        cpu = Attributor(model, train, cfg, cache="/tmp/gpu_check_cache").features_of(images, keys)
        again = Attributor(model, train, cfg, cache="/tmp/gpu_check_cache").features_of(images, keys)
        out.append(emit({"part": "b", "check": f"{projector}: CPU features are deterministic",
                         "ok": bool(np.array_equal(cpu, again))}))
        if not cuda:
            out.append(emit({"part": "b", "check": f"{projector}: CPU and CUDA features agree",
                             "status": "not checked", "reason": "no CUDA device"}))
            continue
        gmodel = PixelDDPM(unet_for(16, 1, "tiny"), DDPMSchedule.from_config(DEFAULT_SCHEDULE), None, "cuda")
        gmodel.unet.load_state_dict(model.unet.state_dict())
        gpu = Attributor(gmodel, train, cfg, cache="/tmp/gpu_check_cache").features_of(images, keys)
        rel = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
        out.append(emit({"part": "b", "check": f"{projector}: CPU and CUDA features agree", "rel_error": rel,
                         "tolerance": AGREE_TOL, "ok": rel < AGREE_TOL}))
    return out


def part_c(cuda: bool) -> list[dict]:
    import tempfile

    from attribution import RunOptions, open_attribution
    from attribution.evaluation.ray_engine import RayCluster
    from attribution.evaluation.ray_featurize import featurize_on_ray

    digits = load_dataset("digits")
    with tempfile.TemporaryDirectory() as tmp:
        npz = f"{tmp}/d64.npz"
        np.savez(npz, images=digits.pixels[:64, ..., 0], labels=digits.labels[:64])
        base = dict(checkpoint="digits", dataset=f"npz:{npz}", method="dtrak", timesteps=2, proj_dim=512,
                    projector="sjlt", device="cuda" if cuda else "cpu")
        alone = open_attribution(RunOptions(**base, cache=f"{tmp}/alone"))
        alone.featurize()
        want = np.array(alone.members[0].store.features())
        start = time.perf_counter()
        with RayCluster() as cluster:
            where = cluster.describe()
            ray = featurize_on_ray(RunOptions(**base, cache=f"{tmp}/ray"), cluster, shard_size=8)
        seconds = time.perf_counter() - start
        got = np.array(ray.members[0].store.features())
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    tol = AGREE_TOL if cuda else 1e-5
    return [emit({"part": "c", "check": f"Ray fan-out equals one process ({'CUDA' if cuda else 'CPU'})",
                  "rel_error": rel, "tolerance": tol, "ok": rel < tol, "on": where, "seconds": round(seconds, 1)})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    ap.add_argument("--n", type=int, default=5000, help="images of the synthetic workload (CIFAR-2: 5,000)")
    ap.add_argument("--proj-dim", type=int, default=32768)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=3, help="timed batches after the warm-up")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    records, missing = [], []
    if a.part in ("a", "all"):
        if cuda:
            records += part_a(a.n, a.proj_dim, a.timesteps, a.batch_size, a.batches)
        else:
            missing.append("part (a): throughput and peak GPU memory (trak-cuda, sjlt) on the CIFAR-2-sized workload")
    if a.part in ("b", "all"):
        records += part_b(cuda)
        if not cuda:
            missing.append("part (b): CPU/CUDA agreement of sjlt, gaussian and grass features (ran on the CPU only)")
    if a.part in ("c", "all"):
        records += part_c(cuda)
        if not cuda:
            missing.append("part (c): the Ray fan-out with GPU fractions (ran on the CPU only)")
    missing += [f"{r.get('part')}: {r.get('check') or r.get('projector')} ({r['reason']})" for r in records
                if r.get("status") == "not checked" and r.get("part") == "a"]
    failed = [r for r in records if r.get("ok") is False]
    emit({"summary": "fail" if failed else "ok", "cuda": cuda, "failed": [r.get("check") for r in failed],
          "not_checked": missing})
    if missing:
        print("not checked here: " + "; ".join(missing), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
