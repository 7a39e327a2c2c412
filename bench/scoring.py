"""Scoring latency against cached training features: one new target, and a lambda change.

    python bench/scoring.py --checkpoint digits
featurizes the full training set once (cached in cache/), then times (median of --repeats runs):
- new_target_s: featurize one target image (a validation image not seen before in the process) and score it;
- lambda_change_ms: re-score that target for a new lambda (the kernel decomposition is cached);
- kernel_fit_s: the one-off thin SVD of the feature matrix (first time only; reported for context).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from attribution import Attributor, FeatureConfig, get_method, Kernel, load_dataset, load_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    model = load_model(a.checkpoint, a.device)
    train = load_dataset(a.dataset, "train", model.resolution, model.channels)
    val = load_dataset(a.dataset, "val", model.resolution, model.channels)
    att = Attributor(model, train, FeatureConfig(fn="square", timesteps=a.timesteps, proj_dim=a.proj_dim,
                                                 projector="sjlt"))
    att.featurize()
    start = time.perf_counter()
    Kernel.fit(att.store.features())
    fit_s = time.perf_counter() - start
    method = get_method("dtrak")
    _ = att.train_features().kernel  # load the cached decomposition once, as the app does
    lam = att.resolve_lambda(method, None)
    new_target, lam_change = [], []
    for r in range(a.repeats):
        start = time.perf_counter()
        G = att.features_of(val.tensors([r]), [f"val/{r}"])
        att.scores(method, G, lam)
        new_target.append(time.perf_counter() - start)
        start = time.perf_counter()
        att.scores(method, G, lam * (2 + r))
        lam_change.append(time.perf_counter() - start)
    print(json.dumps({"device": a.device, "n_train": len(train), "K": a.timesteps, "k": a.proj_dim,
                      "kernel_fit_s": round(fit_s, 2), "new_target_s": round(statistics.median(new_target), 3),
                      "lambda_change_ms": round(1000 * statistics.median(lam_change), 2)}))


if __name__ == "__main__":
    main()
