"""traker's CPU projection at paper size, against our featurization measured in the same run.

    python bench/traker_projection.py --out bench/results/traker-projection.json

traker on a CPU projects with `BasicProjector` (normal entries, `block_size` 100 columns): every `project` call
regenerates the P x k Gaussian matrix block by block and multiplies the batch's gradients by it, so a call costs
about c * P * k at a fixed batch, and holds one P x 100 block beside the B x P gradients. Featurizing the D-TRAK
paper's CIFAR UNet (P = 35.7M) at k = 32,768 that way would take hours per batch on this machine, so this script
measures calls at small P and k (each point in a process of its own, for its peak resident memory), checks that
time is affine in P * k and memory in P (fitted), and extrapolates to P = 35.7M, k = 32,768, B = 32 (traker's default
featurization batch). The projection alone is a lower bound on traker's cost per image: it computes the same
per-sample gradients (`torch.func`) before projecting. Our throughput at that size is measured here too
(`bench/model_size.py --one cifar --batch 1`, `sjlt` and `grass`), so the ratio comes from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BATCH, TARGET_K = 32, 32768
POINTS = [(650_000, 2048), (1_300_000, 2048), (650_000, 4096)]  # (P, k): doubling each once


def measure(params: int, k: int, repeats: int) -> dict:
    from trak.projectors import BasicProjector, ProjectionType

    torch.set_num_threads(2)
    proj = BasicProjector(params, k, 0, ProjectionType.normal, torch.device("cpu"))  # traker's CPU default
    grads = torch.randn(BATCH, params)
    proj.project(grads, model_id=0)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proj.project(grads, model_id=0)
        times.append(time.perf_counter() - start)
    return {"P": params, "k": k, "batch": BATCH, "seconds_per_call": float(np.median(times)), "times": times,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", nargs=2, type=int, metavar=("P", "K"), help="one measurement in this process")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--refit", metavar="JSON", help="fit and extrapolate the measurements an earlier --out holds")
    p.add_argument("--out")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.repeats)))
        return 0

    here = str(Path(__file__).resolve())
    if args.refit:  # the measurements of an earlier run, fitted again
        earlier = json.loads(Path(args.refit).read_text())
        points, ours = earlier["points"], earlier["ours"]
    else:
        points = [child([here, "--one", str(P), str(k), "--repeats", str(args.repeats)]) for P, k in POINTS]
    for r in points:
        print(f"traker BasicProjector, P = {r['P']:,}, k = {r['k']:,}, B = {BATCH}: {r['seconds_per_call']:.2f} s per "
              f"call, peak {r['peak_rss_gib']:.2f} GiB", flush=True)
    if not args.refit:
        ours = child([str(Path(here).with_name("model_size.py")), "--one", "cifar", "--batch", "1"])
    # time per call = a + b * P * k, fitted by least squares (a fixed part per call, then the matrix blocks and the
    # product); memory = m0 + m1 * P at B = 32
    x = np.array([r["P"] * r["k"] for r in points], dtype=np.float64)
    a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), [r["seconds_per_call"] for r in points],
                           rcond=None)[0]
    (p1, _), (p2, _) = POINTS[0], POINTS[1]
    m1 = (points[1]["peak_rss_gib"] - points[0]["peak_rss_gib"]) / (p2 - p1)
    m0 = points[0]["peak_rss_gib"] - m1 * p1
    P = ours["params"]
    call = float(a + b * P * TARGET_K)
    traker_per_image = call / BATCH
    result = {
        "points": points, "linearity": {
            "double_P": points[1]["seconds_per_call"] / points[0]["seconds_per_call"],
            "double_k": points[2]["seconds_per_call"] / points[0]["seconds_per_call"],
            "fixed_seconds_per_call": float(a), "seconds_per_unit_Pk": float(b)},
        "ours": ours, "extrapolated": {
            "P": P, "k": TARGET_K, "batch": BATCH, "seconds_per_call": call, "seconds_per_image": traker_per_image,
            "peak_rss_gib": m0 + m1 * P},
    }
    print(f"doubling P x{result['linearity']['double_P']:.2f}, doubling k x{result['linearity']['double_k']:.2f}: "
          f"{a:.2f} s per call plus {b * 1e9:.2f} s per 1e9 of P * k")
    print(f"traker at P = {P:,}, k = {TARGET_K:,}, B = {BATCH}, extrapolated: {call:,.0f} s per call, "
          f"{traker_per_image:.1f} s per image for the projection alone; peak about {m0 + m1 * P:.1f} GiB")
    for projector in ("sjlt", "grass"):
        ratio = traker_per_image / ours[projector]["seconds_per_image"]
        result[f"speed_ratio_{projector}_at_least"] = ratio
        print(f"ours ({projector}): {ours[projector]['seconds_per_image']} s per image (K = {ours['K']}), peak "
              f"{ours['peak_rss_gib']} GiB; ours / traker at least {ratio:.0f}x (traker's projection alone; its "
              "gradients cost about as much as ours on top)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
