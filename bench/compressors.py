"""The gradient compressors against each other: `sjlt` (our sparse JL) and `grass` (a random mask of 8k coordinates,
then the sparse JL), at equal k.

    python bench/compressors.py --bank digits-crn --out bench/results/compressors.json

1. Projection alone, per sample (batches of 16 float32 gradients; median of 5 timed calls after one warm-up):
   P = 0.65M (the shipped digits model's parameters) and P = 35.7M (the D-TRAK paper's CIFAR UNet), k = 4096.
2. Featurization speed on the bank's model: D-TRAK Avg features (K = 10, k = 4096) of the first 400 training
   images, each projector into a fresh cache (sample-timesteps/s, as the engine measures it).
3. Quality: the LDS of D-TRAK Avg with each projector on every target of the bank (K = 10, k = 4096: the whole
   training set featurized with each), and the paired difference grass - sjlt with its two-way interval.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from results_io import emit

from attribution import Bank, lds_table, make_projector, open_on_bank, score_bank

K, PROJ_DIM = 10, 4096


def projection_times(sizes=(650_000, 35_700_000), batch: int = 16) -> dict:
    out = {}
    for P in sizes:
        grads = torch.randn(batch, P, generator=torch.Generator().manual_seed(0))
        for name in ("sjlt", "grass"):
            start = time.perf_counter()
            proj = make_projector(name, P, PROJ_DIM, 0, torch.device("cpu"))
            setup = time.perf_counter() - start
            proj.project(grads)  # warm-up
            times = []
            for _ in range(5):
                start = time.perf_counter()
                proj.project(grads)
                times.append((time.perf_counter() - start) / batch)
            out[f"{name} P={P}"] = {"per_sample_ms": round(1000 * statistics.median(times), 3),
                                    "setup_s": round(setup, 2)}
            print(name, P, out[f"{name} P={P}"], file=sys.stderr, flush=True)
        del grads
    return out


def featurize_speed(bank: Bank, n: int = 400) -> dict:
    out = {}
    for name in ("sjlt", "grass"):
        with tempfile.TemporaryDirectory() as cache:
            att = open_on_bank(bank, "dtrak:avg", "cpu", timesteps=K, proj_dim=PROJ_DIM, projector=name, cache=cache)
            member = att.members[0]
            rows = torch.arange(n).numpy()
            member.featurizer.train_rows(rows[:16])  # warm-up (projector set-up, buffers)
            start = time.perf_counter()
            member.featurizer.train_rows(rows)
            elapsed = time.perf_counter() - start
        out[name] = {"images": n, "seconds": round(elapsed, 1), "sample_timesteps_per_s": round(n * K / elapsed, 1)}
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def quality(bank: Bank, cache: str | None) -> dict:
    scores = {}
    for name in ("sjlt", "grass"):
        run = score_bank(bank, "dtrak:avg", device="cpu", timesteps=K, proj_dim=PROJ_DIM, projector=name, cache=cache)
        scores[name] = run.scores
        print(name, "scored", file=sys.stderr, flush=True)
    out = {}
    for split in ("val", "gen"):
        table = lds_table(bank, scores, split)
        diff = next(d for d in table.differences() if {d.a, d.b} == {"sjlt", "grass"})
        sign = 1 if diff.a == "grass" else -1
        out[split] = {"rows": table.rows(),
                      "grass - sjlt": {"difference": round(sign * diff.difference, 4),
                                       "ci_two_way": sorted(round(sign * v, 4) for v in diff.ci_two_way),
                                       "real": bool(diff.real)}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", default="digits-crn")
    p.add_argument("--cache", help="feature cache for the quality runs (default: cache/)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: projection, speed, quality")
    p.add_argument("--out")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    bank = Bank.load(a.bank)
    result = {"k": PROJ_DIM, "K": K, "bank": a.bank, "method": "dtrak:avg"}
    if "projection" not in skip:
        result["projection"] = projection_times()
    if "speed" not in skip:
        result["featurization"] = featurize_speed(bank)
    if "quality" not in skip:
        result["lds"] = quality(bank, a.cache)
    return emit(result, a.out)


if __name__ == "__main__":
    sys.exit(main())
