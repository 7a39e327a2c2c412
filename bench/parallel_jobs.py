"""Several featurizations at once on one machine: taking turns (the default, `store.compute_slot`) against running
together, with torch's default threads or with the cores shared out (threads = cores / jobs).

    python bench/parallel_jobs.py --jobs 1,2,4 --images 400 --out bench/results/parallel-jobs

Each job featurizes the first --images digits training images (an .npz) with its own seed (its own feature store),
K = 2, k = 512, D-TRAK Square, in a thread of this one process (as the app's sessions and background jobs do),
all started together. Per job: wall time from the common start to its end, and its throughput (images/s) as a
multiple of its fair share (what one job alone does, divided by the number of jobs). A fresh cache per
measurement; the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from attribution import Attributor, FeatureConfig, get_method, load_dataset, load_model
from attribution.store import PARALLEL_JOBS_ENV

MODES = {
    "turns": "one at a time (the default: ATTRIBUTION_PARALLEL_JOBS=1), torch's default threads",
    "together": "all at once, torch's default threads each",
    "together-shared": "all at once, torch threads = cores / jobs",
}


def run(mode: str, jobs: int, npz: Path, cores: int) -> list[float]:
    os.environ[PARALLEL_JOBS_ENV] = "1" if mode == "turns" else str(jobs)
    torch.set_num_threads(max(1, cores // jobs) if mode == "together-shared" else cores)
    model = load_model("digits", "cpu")
    train = load_dataset(f"npz:{npz}")
    method = get_method("dtrak")
    with tempfile.TemporaryDirectory() as cache:
        atts = [Attributor(model, train, FeatureConfig(fn="square", timesteps=2, proj_dim=512, projector="sjlt",
                                                        seed=j), cache=cache, row_statistics=method.row_statistics)
                for j in range(jobs)]
        barrier, ends = threading.Barrier(jobs + 1), [0.0] * jobs

        def job(j: int) -> None:
            barrier.wait()
            atts[j].featurize()
            ends[j] = time.perf_counter()

        threads = [threading.Thread(target=job, args=(j,)) for j in range(jobs)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
    return [e - start for e in ends]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", default="1,2,4")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = torch.get_num_threads()
    digits = load_dataset("digits")
    npz = out / f"digits-{a.images}.npz"
    np.savez(npz, images=digits.pixels[:a.images, ..., 0], labels=digits.labels[:a.images])
    alone = statistics.median(run("turns", 1, npz, cores)[0] for _ in range(a.repeats))
    results = {"cores": cores, "images": a.images, "alone_seconds": alone, "rows": []}
    lines = [f"One job alone: {alone:.1f} s ({a.images / alone:.1f} images/s) on {cores} threads.", "",
             "| jobs | mode | wall per job, s (first .. last) | worst job's throughput / fair share |",
             "|---|---|---|---|"]
    for jobs in [int(j) for j in a.jobs.split(",")]:
        for mode in a.modes.split(","):
            if jobs == 1 and mode != "turns":
                continue
            walls = sorted(run(mode, jobs, npz, cores))
            worst = min((a.images / w) / (a.images / alone / jobs) for w in walls)
            results["rows"].append({"jobs": jobs, "mode": mode, "walls": walls, "worst_fair_share": worst})
            lines.append(f"| {jobs} | {mode} | {walls[0]:.1f} .. {walls[-1]:.1f} | {worst:.2f} |")
            print(lines[-1], flush=True)
    (out / "parallel-jobs.json").write_text(json.dumps(results, indent=1))
    (out / "parallel-jobs.md").write_text("\n".join(lines) + "\n")
    npz.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
