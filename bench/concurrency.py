"""Latency of one attribution with 1, 4 and 8 concurrent sessions sharing one process (the app serving a class).

    python bench/concurrency.py --checkpoint digits --n-train 512

Each session is a thread that attributes its own new target (a validation image: featurize it, score it with
D-TRAK at the default lambda), all released at once by a barrier; a round is repeated --rounds times and the
per-session latencies are pooled (median, and the slowest); the two variants alternate within each round (A B,
then B A), as the machine's load drifts. Two ways to share the model are compared:
- lock: every session uses the one shared model; its adapter lock serialises the UNet forward passes
  (functional_call swaps parameters into the module), backward passes and projections run in parallel;
- copy: every session has its own copy of the UNet (no lock contention; P x more memory).
Every concurrent result is checked against the serial one (bitwise), so a variant that is fast but wrong fails.
The training features (--n-train images of the training split; scoring cost grows with N but is ~ms) are
featurized once into --cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


import numpy as np
import torch

from attribution import Attributor, FeatureConfig, get_method, ImageDataset, load_dataset, load_model
from attribution.models.pixel_ddpm import PixelDDPM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--sessions", default="1,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    model = load_model(a.checkpoint, a.device)
    full = load_dataset(a.dataset, "train", model.resolution, model.channels)
    n = min(a.n_train, len(full))
    train = ImageDataset(full.spec, full.split, full.pixels[:n], full.labels[:n], list(full.class_names),
                         full.source_index[:n])
    val = load_dataset(a.dataset, "val", model.resolution, model.channels)
    cfg = FeatureConfig(fn="square", timesteps=a.timesteps, proj_dim=a.proj_dim, projector="sjlt")
    method = get_method("dtrak")
    shared = Attributor(model, train, cfg, cache=a.cache)
    start = time.perf_counter()
    shared.featurize()
    featurize_s = time.perf_counter() - start
    lam = shared.resolve_lambda(method, None)
    sessions = [int(s) for s in a.sessions.split(",")]
    most = max(sessions)

    def attribute(att, i):
        start = time.perf_counter()
        G = att.features_of(val.tensors([i]), [f"val/{i}"])
        scores = att.scores(method, G, lam)
        return time.perf_counter() - start, scores

    targets = list(range(most * a.rounds))
    serial = {i: attribute(shared, i)[1] for i in targets}  # reference results (and warm-up)
    copies = []
    for _ in range(most):
        m = PixelDDPM(copy.deepcopy(model.unet), model.schedule, model.info, a.device)
        c = Attributor(m, train, cfg, cache=a.cache)
        c.train_features().kernel  # noqa: B018 (load the decomposition, as the app does once)
        copies.append(c)

    results = {"checkpoint": a.checkpoint, "n_train": n, "K": a.timesteps, "k": a.proj_dim,
               "torch_threads": torch.get_num_threads(), "featurize_s": round(featurize_s, 1), "runs": []}
    lat = {(v, s): [] for v in ("lock", "copy") for s in sessions}
    walls = {key: [] for key in lat}
    for r in range(a.rounds):  # interleaved: both variants see the same (noisy, shared) machine
        for s in sessions:
            for variant in (("lock", "copy") if r % 2 == 0 else ("copy", "lock")):
                barrier = threading.Barrier(s)
                ids = targets[r * s:(r + 1) * s]

                def job(j, barrier=barrier, variant=variant, ids=ids):
                    barrier.wait()
                    return attribute(shared if variant == "lock" else copies[j], ids[j])

                start = time.perf_counter()
                with ThreadPoolExecutor(s) as ex:
                    out = list(ex.map(job, range(s)))
                walls[variant, s].append(time.perf_counter() - start)
                for (seconds, scores), i in zip(out, ids):
                    assert np.array_equal(scores, serial[i]), f"{variant}: a concurrent result differs"
                    lat[variant, s].append(seconds)
    for (variant, s), values in lat.items():
        row = {"variant": variant, "sessions": s, "median_s": round(statistics.median(values), 3),
               "max_s": round(max(values), 3),
               "attributions_per_s": round(s * a.rounds / sum(walls[variant, s]), 2)}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
