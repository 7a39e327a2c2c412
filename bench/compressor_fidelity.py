"""How much of the gradient geometry each compressor keeps: `sjlt` against `grass` (a random mask of m coordinates,
then the sparse JL) at m = 8k (its rule) and larger masks, on real per-sample gradients of the shipped digits model.

    python bench/compressor_fidelity.py --out bench/results/compressor-fidelity.json

The exact (unprojected) per-sample gradients of 160 training images (D-TRAK's Square output, K = 2 timesteps 0 and
500, the shipped-model test's configuration; P = 651,041) give the exact cosine matrix; each compressor's projected
gradients give another. Reported per k and compressor, averaged over 3 projection seeds: the relative Frobenius
error of the off-diagonal cosines, the share of each image's exact top-5 neighbours (by cosine) that the projected
top 5 keep, and the share of the top 5 in the image's class (the exact gradients' share is the reference), with
the projection time per sample. One process, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from attribution import load_dataset, load_model
from attribution.features.gradients import GradientSpec, per_sample_gradients
from attribution.features.projectors import MaskedSJLTProjector, SparseJLProjector

IMAGES, TOP, SEEDS = 160, 5, 3


def cosines(A: torch.Tensor) -> torch.Tensor:
    A = A.double()
    A = A / A.norm(dim=1, keepdim=True)
    return A @ A.T


def top(C: torch.Tensor) -> np.ndarray:
    C = C.clone()
    C.fill_diagonal_(-np.inf)
    return C.topk(TOP, dim=1).indices.numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="1024,2048,4096")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model("digits", "cpu")
    data = load_dataset("digits", "train", model.resolution, model.channels)
    idx = np.random.default_rng(0).choice(len(data), IMAGES, replace=False)
    G = per_sample_gradients(model, data.tensors(idx), [f"train/{i}" for i in idx],
                             GradientSpec(fn="square", timesteps=(0, 500)))
    P = G.shape[1]
    labels = data.labels[idx]
    exact = cosines(G)
    exact_top = top(exact)
    off = ~torch.eye(IMAGES, dtype=torch.bool)

    def same_class(t):
        return float(np.mean(labels[t] == labels[:, None]))

    rows = [{"compressor": "exact", "same_class_top5": same_class(exact_top), "P": P}]
    print(f"P = {P:,}; exact gradients: same-class share of the top {TOP} {rows[0]['same_class_top5']:.3f}")
    for k in (int(v) for v in args.ks.split(",")):
        for name, m in (("sjlt", None), ("grass, m = 8k", 8 * k), ("grass, m = 32k", 32 * k),
                        ("grass, m = P/4", P // 4), ("grass, m = P/2", P // 2)):
            err, kept, cls, secs = [], [], [], []
            for seed in range(SEEDS):
                proj = (SparseJLProjector(P, k, seed, torch.device("cpu")) if m is None
                        else MaskedSJLTProjector(P, k, seed, torch.device("cpu"), mask_dim=m))
                proj.project(G[:16])  # warm-up
                start = time.perf_counter()
                C = cosines(proj.project(G))
                secs.append((time.perf_counter() - start) / IMAGES)
                t = top(C)
                err.append(float((C - exact)[off].norm() / exact[off].norm()))
                kept.append(float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(t, exact_top)])))
                cls.append(same_class(t))
            row = {"k": k, "compressor": name, "mask_fraction": None if m is None else min(m, P) / P,
                   "cosine_rel_error": float(np.mean(err)), "top5_kept": float(np.mean(kept)),
                   "same_class_top5": float(np.mean(cls)), "ms_per_sample": 1000 * float(np.median(secs))}
            rows.append(row)
            print(f"k = {k:5d}  {name:15s}  cosine error {row['cosine_rel_error']:.3f}  exact top-{TOP} kept "
                  f"{row['top5_kept']:.3f}  same class {row['same_class_top5']:.3f}  "
                  f"{row['ms_per_sample']:.2f} ms/sample", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"images": IMAGES, "seeds": SEEDS, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
