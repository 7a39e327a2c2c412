"""Several featurizations at once on one machine: threads of one process (the app's sessions and background jobs)
and separate processes (a command beside the server, two commands), with the default policy (`store.compute_slot`:
processes take turns, threads of a process share its turn) against no coordination.

    python bench/parallel_jobs.py --jobs 1,2,4 --images 400 --out bench/results/parallel-jobs

Each job featurizes the first --images digits training images (an .npz) with its own seed (its own feature store),
K = 2, k = 512, D-TRAK Square, all started together. Per job: wall time from the common start to its end, and its
throughput as a multiple of its fair share (one job alone, divided by the number of jobs). A fresh cache per
measurement; the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

MODES = {
    "threads": "threads of one process (they share its slot and run together: the default)",
    "processes": "separate processes, taking turns (the default)",
    "processes-together": "separate processes all at once, torch's default threads each (no coordination)",
    "processes-shared": "separate processes all at once, torch threads = cores / jobs each",
}


def featurize(seed: int, cache: str, npz: str):
    from attribution import Attributor, FeatureConfig, load_dataset, load_model

    att = Attributor(load_model("digits", "cpu"), load_dataset(f"npz:{npz}"),
                     FeatureConfig(fn="square", timesteps=2, proj_dim=512, projector="sjlt", seed=seed), cache=cache)
    _ = att.store
    return att


def worker(seed: int, cache: str, npz: str, threads: int, start: float) -> None:
    if threads:
        torch.set_num_threads(threads)
    att = featurize(seed, cache, npz)
    while time.time() < start:
        time.sleep(0.01)
    att.featurize()
    print(f"{time.time() - start:.3f}", flush=True)


def run(mode: str, jobs: int, npz: Path, cores: int) -> list[float]:
    with tempfile.TemporaryDirectory() as cache:
        if mode == "threads":
            atts = [featurize(j, cache, str(npz)) for j in range(jobs)]
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
        env = dict(os.environ, ATTRIBUTION_PARALLEL_JOBS="1" if mode == "processes" else str(jobs))
        threads = max(1, cores // jobs) if mode == "processes-shared" else 0
        start = time.time() + 15  # every worker loaded and waiting
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(j), cache, str(npz), str(threads),
                                   str(start)], env=env, stdout=subprocess.PIPE, text=True) for j in range(jobs)]
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        seed, cache, npz, threads, start = sys.argv[2:7]
        worker(int(seed), cache, npz, int(threads), float(start))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", default="1,2,4")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from attribution import load_dataset

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = torch.get_num_threads()
    digits = load_dataset("digits")
    npz = out / f"digits-{a.images}.npz"
    np.savez(npz, images=digits.pixels[:a.images, ..., 0], labels=digits.labels[:a.images])
    alone = run("processes", 1, npz, cores)[0]
    results = {"cores": cores, "images": a.images, "alone_seconds": alone, "modes": MODES, "rows": []}
    lines = [f"One job alone (one process): {alone:.1f} s ({a.images / alone:.1f} images/s), {cores} threads.", "",
             "| jobs | mode | wall per job, s (first .. last) | worst job's throughput / fair share |",
             "|---|---|---|---|"]
    for jobs in [int(j) for j in a.jobs.split(",")]:
        for mode in a.modes.split(","):
            if jobs == 1 and mode != "processes":
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
