"""Featurization on Ray against one process: the digits training set (1,618 images), D-TRAK features at K = 2,
k = 512, each configuration into a fresh cache, timed as a whole command (interpreter, model, Ray start included).

    python bench/ray_featurize.py --repeats 2 --out bench/results/ray-featurize.json

Configurations: `featurize` in one process (torch's default threads), `featurize --ray --num-cpus 1` (one task at a
time, one thread) and `--num-cpus 2` (two tasks at once). Reports each one's median wall time, the Ray runs' fixed
cost (the command's time minus the shards' time, from the progress lines) and the time per image per task, and
projects a 16-worker cluster from those per-task costs: fixed cost + N x (time per image per task) / 16.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from results_io import emit

N = 1618
BASE = ["featurize", "--checkpoint", "digits", "--method", "dtrak", "--timesteps", "2", "--proj-dim", "512",
        "--device", "cpu"]
CONFIGS = {"one process": [], "ray, 1 CPU": ["--ray", "--num-cpus", "1"], "ray, 2 CPUs": ["--ray", "--num-cpus", "2"]}


def run(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "attribution", *BASE, *extra, "--cache", cache],
                             capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
    rates = [float(r) for r in re.findall(r"(\d+(?:\.\d+)?) images/s", out.stderr)]
    return {"wall_s": round(wall, 1), "images_per_s": rates[-1] if rates else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    results = {name: [] for name in CONFIGS}
    for _ in range(a.repeats):  # interleaved, so drift on a noisy machine hits every configuration alike
        for name, extra in CONFIGS.items():
            results[name].append(run(extra))
            print(name, results[name][-1], file=sys.stderr, flush=True)
    summary = {}
    for name, runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        rate = statistics.median(r["images_per_s"] for r in runs if r["images_per_s"])
        summary[name] = {"median_wall_s": round(wall, 1), "images_per_s": round(rate, 1),
                         "fixed_s": round(wall - N / rate, 1)}
    one = summary["ray, 1 CPU"]
    per_image_per_task = 1 / one["images_per_s"]  # one task at a time: the rate is one task's
    summary["projection, 16 workers"] = {
        "per_image_per_task_s": round(per_image_per_task, 4),
        "median_wall_s": round(summary["ray, 2 CPUs"]["fixed_s"] + N * per_image_per_task / 16, 1),
        "basis": "fixed cost of the 2-CPU run + N x time per image per task / 16 (shards balance; the driver "
                 "writes ~2 MB per shard)"}
    summary["ratios"] = {"ray 2 CPUs / ray 1 CPU": round(summary["ray, 2 CPUs"]["median_wall_s"]
                                                         / one["median_wall_s"], 2),
                         "ray 2 CPUs / one process": round(summary["ray, 2 CPUs"]["median_wall_s"]
                                                           / summary["one process"]["median_wall_s"], 2)}
    return emit({"configs": results, "summary": summary, "n": N, "command": BASE}, a.out)


if __name__ == "__main__":
    sys.exit(main())
