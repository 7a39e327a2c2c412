"""Validation as the paper does it: retrain with a random fraction of the training set removed (weight 0), many
times, and compare the actual change in a query's bits/dim with MAGIC's prediction

    predicted change = sum over removed i of (0 - 1) * d bpd / d w_i = - sum_{i in S} g_i

by Spearman correlation over the removed sets, with a bootstrap confidence interval (resampling sets).

Retrains are resumable: each finished one is a `retrain-XXXX.safetensors` file written atomically, so a killed
run loses at most the retrains in flight. With workers > 1 they run as Ray tasks, one torch thread each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, one_line
from ..fileio import write_json
from ..store import REPO_ROOT
from .runs import MagicRun, load_theta, open_run, save_theta


def check_fraction(fraction: float) -> float:
    if not 0 < fraction < 1:
        raise ConfigError(f"removal fraction must be strictly between 0 and 1, got {fraction}")
    return float(fraction)


def removed_sets(n: int, fraction: float, n_sets: int, seed: int) -> np.ndarray:
    """(n_sets, k) indices, k = max(1, round(fraction * n)); set j depends only on (seed, j)."""
    check_fraction(fraction)
    if int(n_sets) < 1:
        raise ConfigError(f"number of removed sets must be >= 1, got {n_sets}")
    k = max(1, round(fraction * n))
    return np.stack([np.sort(np.random.default_rng([seed, j]).choice(n, size=k, replace=False))
                     for j in range(int(n_sets))])


def validation_dir(run: MagicRun, fraction: float, seed: int) -> Path:
    return run.path / "validation" / f"{fraction:g}-seed{seed}"


def _retrain_one(run: MagicRun, removed: np.ndarray) -> torch.Tensor:
    w = torch.ones(run.run.n, dtype=run.spec.train.torch_dtype)
    w[torch.from_numpy(removed)] = 0
    return run.run.train(w)


def _ray_retrain(run_path: str, removed: np.ndarray, target: str) -> str:
    torch.set_num_threads(1)

    run = open_run(run_path)
    save_theta(Path(target), _retrain_one(run, removed))
    return target


def retrain(run: MagicRun, fraction: float, n_sets: int, seed: int = 0, workers: int = 1, progress=None) -> Path:
    """Make sure retrains 0..n_sets-1 exist; returns the validation folder."""
    sets = removed_sets(run.run.n, fraction, n_sets, seed)
    folder = validation_dir(run, fraction, seed)
    write_json(folder / "sets.json", {"fraction": fraction, "seed": seed, "n": run.run.n,
                                      "sets": sets.tolist()})
    todo = [j for j in range(len(sets)) if not (folder / f"retrain-{j:04d}.safetensors").is_file()]
    done = len(sets) - len(todo)
    if progress:
        progress(done, len(sets))
    if workers > 1 and todo:
        try:
            import ray  # lazy: importing Ray takes seconds; only a running cluster needs it
        except ImportError:
            raise ConfigError("--workers > 1 runs retrains on Ray, which is not installed: pip install ray "
                              "(or use --workers 1)") from None

        # address="local": always a private cluster, never one another job on this machine started

        ray.init(address="local", num_cpus=workers, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT),
                                                                "OMP_NUM_THREADS": "1"}})
        task = ray.remote(num_cpus=1)(_ray_retrain)
        pending = [task.remote(str(run.path), sets[j], str(folder / f"retrain-{j:04d}.safetensors")) for j in todo]
        failures: list[str] = []
        while pending:
            ready, pending = ray.wait(pending)
            try:
                ray.get(ready)
            except Exception as exc:  # retries used up: the other retrains go on and are kept
                failures.append(one_line(exc))
                continue
            done += len(ready)
            if progress:
                progress(done, len(sets))
        if failures:
            raise ConfigError(f"{len(failures)} of {len(todo)} retrains failed, e.g. {failures[0]}; rerun to retry "
                              "them (the finished retrains are kept)")
    else:
        for j in todo:
            save_theta(folder / f"retrain-{j:04d}.safetensors", _retrain_one(run, sets[j]))
            done += 1
            if progress:
                progress(done, len(sets))
    return folder


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr  # lazy: scipy submodules load slowly and only this step needs them

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        v = spearman(a[idx], b[idx])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def evaluate(run: MagicRun, query: dict, fraction: float, seed: int = 0) -> dict:
    """Predicted vs actual bpd change of one cached query over every finished retrain."""
    folder = validation_dir(run, fraction, seed)
    sets = np.asarray(json.loads((folder / "sets.json").read_text())["sets"])
    finished = [j for j in range(len(sets)) if (folder / f"retrain-{j:04d}.safetensors").is_file()]
    cache_path = folder / f"bpd-{query['id']}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    x = torch.as_tensor(query["x"]).reshape(1, -1)
    base = float(query["meta"]["bpd"])
    new = False
    for j in finished:
        if str(j) not in cache:
            theta = load_theta(folder / f"retrain-{j:04d}.safetensors").to(run.spec.train.torch_dtype)
            with torch.no_grad():
                cache[str(j)] = float(run.bpd(theta, x)[0])
            new = True
    if new:
        write_json(cache_path, cache)
    grad = np.asarray(query["grad"])
    actual = np.array([cache[str(j)] - base for j in finished])
    predicted = np.array([-grad[sets[j]].sum() for j in finished])
    rho = spearman(predicted, actual) if len(finished) >= 3 else float("nan")
    lo, hi = bootstrap_ci(predicted, actual) if len(finished) >= 3 else (float("nan"), float("nan"))
    return {"query": query["id"], "n_sets": len(finished), "spearman": rho, "ci": [lo, hi],
            "pearson": float(np.corrcoef(predicted, actual)[0, 1]) if len(finished) >= 3 else float("nan"),
            "predicted": predicted.tolist(), "actual": actual.tolist(), "base_bpd": base}


def finite_difference_check(run: MagicRun, query: dict, indices, h: float = 0.5) -> list[dict]:
    """Central differences of retraining in single weights w_i = 1 +- h against the metagradient."""
    x = torch.as_tensor(query["x"]).reshape(1, -1)
    out = []
    for i in indices:
        vals = []
        for s in (1, -1):
            w = torch.ones(run.run.n, dtype=run.spec.train.torch_dtype)
            w[int(i)] += s * h
            start = time.perf_counter()
            with torch.no_grad():
                vals.append(float(run.bpd(run.run.train(w), x)[0]))
        out.append({"index": int(i), "metagradient": float(query["grad"][int(i)]),
                    "finite_difference": (vals[0] - vals[1]) / (2 * h), "h": h,
                    "seconds": time.perf_counter() - start})
    return out


def fit_summary(run: MagicRun, n: int = 8) -> dict:
    """How well the run has learnt its data, as mean bits/dim of n images each: training images (a seeded subset),
    the run's own samples (seeds 0..n-1) and uniform noise; `gap`, where the samples sit from the training images
    (0) to noise (1; None when the training images are no likelier than noise). Samples nearer noise than the
    training images mean a run that has barely learnt to generate
    (BENCHMARKS.md: the default 300-step run's samples score 9.9-10.7, its training images 7.9, noise 10.7; a
    1,000-step run's samples 7.7-8.2, training images 7.5). Computed once per run (fit.json in its folder)."""
    path = run.path / "fit.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("n") == n:
            return record
    theta = run.theta()
    rows = np.sort(np.random.default_rng(0).choice(run.run.n, min(n, run.run.n), replace=False))
    images = {"train": run.data[torch.from_numpy(rows)],
              "generated": torch.from_numpy(run.sample(theta, n, 0).reshape(n, -1).astype(np.float64) / 255.0),
              "noise": torch.from_numpy(np.random.default_rng(1).random((n, run.spec.model.dim)))}
    record = {"n": n, **{name: float(run.bpd(theta, x).mean()) for name, x in images.items()}}
    span = record["noise"] - record["train"]
    record["gap"] = (record["generated"] - record["train"]) / span if span > 0 else None
    write_json(path, record)
    return record
