"""Featurization fanned out on Ray: the training set split into shards, each featurized by a Ray task, the rows
written into the same resumable store by the driver.

    with RayCluster(address, num_cpus) as cluster:
        featurize_on_ray(options, cluster, progress=...)   # the features `Attribution.featurize` would compute

Each task loads the checkpoint, opens the member's Attributor with the same options (the same kind of features,
identity and folder: checked) and computes its shard's rows (`Featurizer.train_rows`); the driver, holding the
store's lock and this machine's compute slot like a local featurization, writes each shard as it arrives and
reports n / N images, the rate and the time left. What a kind of features needs first (the EK-FAC factors) is
computed by the driver before the fan-out and cached, so the tasks load it; what it computes after the rows (DAS's
residual statistics) runs in the driver afterwards. A task whose worker dies is retried by Ray; a shard whose retries
are used up ends the run in one line after the other shards are written; a killed driver leaves every shard written
so far, and the next run computes only the missing rows.

Rows do not depend on which task computes them (noise is keyed by each image, the projection by the seed), so the
features equal a single process's up to float32 summation order (one torch thread per task): the test compares
them at a relative tolerance of 1e-5.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..engine import Attribution, Attributor, lock_messages, open_attribution, open_attributor, progress_message
from ..errors import ConfigError, one_line
from ..run_options import RunOptions
from ..store import compute_slot
from .ray_engine import RayCluster, single_thread

Progress = Callable[[int, int, str], None]
SHARDS_PER_SLOT = 4  # shards per task slot: small enough to balance and to lose little to a killed worker


def shard_rows(rows: np.ndarray, slots: int, shard_size: int | None = None) -> list[np.ndarray]:
    """The missing rows in shards: `shard_size` each, else about SHARDS_PER_SLOT per task slot (at least 1 row)."""
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    size = shard_size or max(1, -(-len(rows) // (SHARDS_PER_SLOT * max(1, slots))))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _shard(payload: tuple) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task: the features of one shard's training rows under one member (loaded here, on CPU or the GPU)."""
    single_thread()
    from ..models import load_model  # lazy: in the worker

    options, spec, proj_seed, store_path, rows = payload
    att = open_attributor(load_model(spec, options.device), options, proj_seed=proj_seed)
    if str(att.store_path) != store_path:
        raise ConfigError(f"a Ray worker made other features ({att.store_path}) than the driver ({store_path}); "
                          "give it the same repository and cache (a shared filesystem on a multi-node cluster)")
    return rows, att.featurizer.train_rows(rows)


def featurize_on_ray(what: RunOptions | Attribution, cluster: RayCluster, shard_size: int | None = None,
                     progress: Callable[[object], Progress | None] | None = None) -> Attribution:
    """Featurize every member of the attribution `what` defines (run options) or is (already opened from run
    options) with its missing training rows fanned out as Ray tasks (see the module docstring); `progress(member)`
    returns that member's `(done, total, message)` callback. Returns the attribution (its stores complete)."""
    attribution = what if isinstance(what, Attribution) else open_attribution(what)
    for att in attribution.members:
        _ = att.store  # every member's folder opened (or refused) before any work
    for att in attribution.members:
        featurize_member_on_ray(att, cluster, shard_size, progress(att) if progress else None)
    return attribution


def featurize_member_on_ray(att: Attributor, cluster: RayCluster, shard_size: int | None = None,
                            report: Progress | None = None) -> None:
    """One member's missing training rows as Ray tasks on `cluster`, written into its store as they arrive. `att`
    must have been opened from run options (`open_attribution` / `open_attributor`): its `options` say how a task
    opens the same one."""
    if att.options is None:
        raise ConfigError("these features were not opened from run options, so Ray tasks cannot open them again; "
                          "featurize them in this process")
    import ray  # lazy: importing Ray takes seconds; only a fan-out needs it

    remote = ray.remote(_shard).options(**cluster.task_options())
    device, where = "cuda" if cluster.uses_gpu() else "cpu", cluster.describe()
    store, n = att.store, len(att.train)
    waiting, queued = lock_messages(store, n, report)
    with store.exclusive(waiting), contextlib.ExitStack() as stack:
        todo = np.flatnonzero(~store.done())
        if len(todo):
            stack.enter_context(compute_slot(att.cache_dir, queued))
            att.featurizer.prepare(report)  # the EK-FAC factors first (cached: the tasks load them)
            member_options = replace(att.options, checkpoint=att.model.spec, device=device)
            shards = shard_rows(todo, cluster.slots(), shard_size)
            pending = [remote.remote((member_options, att.model.spec, att.cfg.proj_seed, str(att.store_path), rows))
                       for rows in shards]
            done_before, finished, start = n - len(todo), 0, time.perf_counter()
            failures: list[str] = []
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    rows, values = ray.get(ready[0])
                except Exception as exc:  # Ray's retries used up: the other shards go on and are written
                    failures.append(one_line(exc))
                    continue
                store.write_rows(rows, values)
                finished += len(rows)
                if report:
                    report(done_before + finished, n, progress_message(
                        done_before + finished, n, finished, time.perf_counter() - start)
                           + f" ({len(pending)} of {len(shards)} shards left on {where})")
            if failures:
                raise ConfigError(f"{len(failures)} of {len(shards)} shards failed after Ray's retries, e.g. "
                                  f"{failures[0]}; rerun to compute their rows (the other shards are kept)")
        elif report:
            report(n, n, "cached")
    att.featurizer.finish(report)  # what the scores use beside the features (DAS's residual statistics)


_CONNECTION = threading.Lock()  # Ray keeps one connection per process: fan-outs of one process take turns


def featurize_on_cluster(att: Attributor, address: str, report: Progress | None = None) -> None:
    """`att`'s training features fanned out on the Ray cluster at `address` (a server's background job, several
    of which may run at once: they take turns for this process's one Ray connection). `att` must have been opened
    by `open_attribution` / `open_attributor` (its `options` say how a task opens it again)."""
    with _CONNECTION, RayCluster(address) as cluster:
        featurize_member_on_ray(att, cluster, report=report)
