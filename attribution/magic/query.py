"""The two user-level operations on a MAGIC run: train it, and attribute a query's bits/dim to training examples."""

from __future__ import annotations

import platform
import time

import torch

from .metagrad import metagradient
from .runs import MagicRun


def hardware() -> str:
    parts = [platform.machine(), platform.processor(), f"torch {torch.__version__}",
             f"threads {torch.get_num_threads()}"]
    return " ".join(p for p in parts if p)


def train_run(run: MagicRun, progress=None) -> torch.Tensor:
    """Train with all weights 1 and save; returns the final parameters (reuses a finished run)."""
    if run.trained:
        return run.theta()
    start = time.perf_counter()
    theta = run.run.train(progress=progress)
    seconds = time.perf_counter() - start
    run.save(theta, {"train_seconds": seconds, "train_loss": run.run.train_loss(theta), "hardware": hardware(),
                     "n_train": run.run.n, "n_params": run.spec.model.n_params})
    return theta


def query_metagradient(run: MagicRun, x: torch.Tensor, policy: str = "auto", progress=None,
                       use_cache: bool = True) -> dict:
    """d bpd(x) / d w for every training example, cached per query. Returns the cache record."""
    qid = run.query_id(x)
    cached = run.load_query(qid) if use_cache else None
    if cached is not None:
        return {"id": qid, **cached, "cached": True}
    xq = x.to(run.spec.train.torch_dtype).reshape(1, -1)
    res = metagradient(run.run, lambda th: run.bpd(th, xq, create_graph=True)[0], policy=policy, progress=progress)
    # the forward replay is one training run timed in this process under the same load: the fair unit of cost
    meta = {"bpd": res.value, "seconds": res.seconds, "seconds_forward": res.seconds_forward,
            "policy": res.policy, "stored_states": res.stored_states, "state_bytes": res.state_bytes,
            "peak_rss_bytes": res.peak_rss_bytes,
            "runs_of_training": res.seconds / res.seconds_forward, "hardware": hardware()}
    run.save_query(qid, x, res.grad, meta)
    return {"id": qid, **run.load_query(qid), "cached": False}
