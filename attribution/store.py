"""The feature store: the only module that reads and writes `cache/`.

Layout (one folder per feature set; the name carries a readable slug and a hash of the full identity):

    cache/
      features/
        <checkpoint hash>/
          <dataset slug>-<split>/
            <feature slug>-<identity hash>/
              config.json     the identity (checkpoint, dataset, split, feature config, projector) + provenance
              features.npy    float32 (N, k) memmap, rows in dataset order
              done.npy        bool (N,): rows that are finished (written after their rows are flushed)
              kernel.npz      U (N, r), sigma (r,), V (k, r): thin SVD of the features, once complete
      curvature/
        <checkpoint hash>/<dataset slug>-<split>/<curvature slug>-<identity hash>/
          config.json     the identity (checkpoint, dataset, split, curvature spec, tracked layers)
          partial.npz     a fit in progress (partial sums and the rows done in each pass), saved every ~30 s
          factors.npz     the fitted EK-FAC factors (Q_A, Q_S, eigenvalues per tracked layer)
      stats/
        <checkpoint hash>/<dataset slug>-<split>/<statistic>-<identity hash>/   one number per training image
                                                                                (a one-column feature store)
      retrain/
        <recipe key>/
          <index-set hash>-seed-<S>/   a training run folder (run.json with the subset indices, epoch-N/), plus
            retrain.json               written last: subset index hash, seed, recipe key, hardware, seconds
      throughput.json                  featurization speed per checkpoint on this machine (`record_throughput`)
      counterfactual/
        <checkpoint hash>/<slug>-<identity hash>/   one counterfactual study (evaluation/counterfactual.py)
      uploads/
        <sha256 prefix>/<file name>    an image uploaded in the app (a link names it by the hash)

Featurizing writes rows in batches: rows first (flushed), then the done mask (atomically replaced), so a kill at
any point loses at most the batch in flight and a rerun resumes at the first unfinished row. A folder appears
under its final name only once config.json and empty arrays exist (created in a temporary folder, then renamed).
Opening a folder whose config.json differs from the identity asked for is refused, naming what differs.

Several sessions (threads of the app, or other processes) may ask for one store at once. Creating it is
first-come (the others open what the first made), and featurizing holds `exclusive()`, an `fcntl.flock` on
`.lock` in the folder: one featurization per store; the others wait, then find the rows done and reuse them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import CacheMismatchError, ConfigError, FileFormatError
from .fileio import atomic_dir, read_json, reason, save_npy, save_npz, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]


UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError)  # what a damaged array or JSON file raises


def recompute_fix(folder: Path, what: str = "its features") -> str:
    """What to do about a damaged file inside the cache (the end of its one-line error)."""
    return f"delete the folder {folder} to recompute {what} (nothing else in the cache is affected)"


def damaged(path: Path, exc: BaseException, what: str = "its features") -> FileFormatError:
    """The one line for a damaged array inside the cache: which file, why, and that deleting its folder recomputes
    `what`."""
    return FileFormatError(f"cache file {path} is damaged ({reason(exc)}); {recompute_fix(path.parent, what)}")


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: `root`, else $ATTRIBUTION_CACHE, else cache/ in the repository."""
    return Path(root or os.environ.get("ATTRIBUTION_CACHE") or REPO_ROOT / "cache")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "x"


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def journey_dir(checkpoint_hash: str, slug: str, identity: dict, root: str | os.PathLike | None = None) -> Path:
    """cache/journey/<checkpoint hash>/<readable slug>-<identity hash>: one journey (arrays .npz + .json)."""
    return cache_root(root) / "journey" / checkpoint_hash / f"{_slug(slug)}-{identity_hash(identity)}"


def norms_dir(checkpoint_hash: str, dataset: str, split: str, slug: str, identity: dict,
              root: str | os.PathLike | None = None) -> Path:
    """cache/norms/<checkpoint hash>/<dataset>-<split>/<slug>-<identity hash>: gradient norms of training images
    (a one-column FeatureStore)."""
    return (cache_root(root) / "norms" / checkpoint_hash / f"{_slug(dataset)}-{split}"
            / f"{slug}-{identity_hash(identity)}")


def stats_dir(checkpoint_hash: str, dataset: str, split: str, slug: str, identity: dict,
              root: str | os.PathLike | None = None) -> Path:
    """cache/stats/<checkpoint hash>/<dataset>-<split>/<slug>-<identity hash>: a per-training-image statistic a
    scoring rule needs beside the features (DAS's residual weights; a one-column FeatureStore)."""
    return (cache_root(root) / "stats" / checkpoint_hash / f"{_slug(dataset)}-{split}"
            / f"{_slug(slug)}-{identity_hash(identity)}")


def identity_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """How a stored identity `a` differs from the one asked for `b`, one phrase per differing leaf ("recipe.lr:
    0.001 there, 0.002 asked"; a long list as its length)."""
    def short(v):
        return f"{len(v)} items" if isinstance(v, list) and len(v) > 4 else repr(v)

    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += identity_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {short(va)} there, {short(vb)} asked")
    return out


class FeatureStore:
    """One feature set on disk (see the module docstring)."""

    def __init__(self, path: Path, identity: dict, n_rows: int, dim: int, provenance: dict | None = None):
        self.path, self.identity, self.n_rows, self.dim = Path(path), identity, n_rows, dim
        self.provenance = provenance or {}

    # -- locating and opening --------------------------------------------------------------------------------

    @classmethod
    def default_path(cls, root: Path, identity: dict, feature_slug: str) -> Path:
        ds = f"{_slug(identity['dataset'])}-{identity['split']}"
        return root / "features" / identity["checkpoint"] / ds / f"{feature_slug}-{identity_hash(identity)}"

    @classmethod
    def open(cls, path: Path, identity: dict, n_rows: int, dim: int, provenance: dict | None = None,
             create: bool = True) -> "FeatureStore":
        """Open the store at `path`, creating it when absent; refuse one made for another identity."""
        store = cls(path, identity, n_rows, dim, provenance)
        cfg_path = path / "config.json"
        if cfg_path.is_file():
            stored = read_json(cfg_path, recompute_fix(path))
            differences = identity_differences(stored.get("identity", {}), identity)
            if any(d.startswith("projection") for d in differences):
                raise CacheMismatchError(
                    f"feature store {path} was projected with another matrix ({'; '.join(differences[:2])}): its "
                    "features cannot be scored against targets projected here; re-featurize on this device into "
                    "a new folder (drop --store, or delete the folder), or use --projector sjlt, whose matrix is "
                    "the same on every device")
            if differences:
                raise CacheMismatchError(f"cache folder {path} was made for another configuration "
                                         f"({'; '.join(differences[:4])}); use another folder or delete it")
            return store
        if path.exists() and any(path.iterdir()):
            if cfg_path.is_file():  # another session's complete store was renamed into place since the check
                return cls.open(path, identity, n_rows, dim, provenance, create=False)
            raise CacheMismatchError(f"{path} exists but is not a feature store (no config.json); "
                                     "choose an empty or new folder")
        if not create:
            raise CacheMismatchError(f"no features at {path}; run featurize first")
        with atomic_dir(path, replace=False) as tmp:  # another session creating it at once: theirs is kept
            (tmp / "config.json").write_text(json.dumps({"identity": identity, "provenance": provenance or {},
                                                         "shape": [n_rows, dim]}, indent=2, sort_keys=True) + "\n")
            mm = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=(n_rows, dim))
            del mm
            np.save(tmp / "done.npy", np.zeros(n_rows, dtype=bool))
        return cls.open(path, identity, n_rows, dim, provenance, create=False)  # checks the one that won

    @contextlib.contextmanager
    def exclusive(self, waiting: Callable[[], None] | None = None, poll: float = 0.5) -> Iterator[None]:
        """Hold this store's lock (across threads and processes) while the block runs; `waiting()` is called
        every `poll` seconds while another holder has it. A killed holder's lock is released by the OS."""
        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a read-only store (shipped, shared): nobody can write it, so there is nothing to guard
            yield
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if waiting:
                        waiting()
                    time.sleep(poll)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def peek_done(path: Path) -> np.ndarray | None:
        """The done mask of the store at `path` without opening (or creating) it; None when there is none."""
        try:
            return np.load(Path(path) / "done.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None

    # -- rows --------------------------------------------------------------------------------------------------

    def done(self) -> np.ndarray:
        """Which rows are finished; a damaged or wrong-sized mask is one line (the rows are kept: see `damaged`)."""
        return self._array("done.npy", (self.n_rows,))

    def _array(self, name: str, shape: tuple[int, ...], mmap_mode: str | None = None) -> np.ndarray:
        path = self.path / name
        try:
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":  # numpy would call text a pickle
                    raise ValueError("empty" if path.stat().st_size == 0 else "not a .npy array")
            array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        except UNREADABLE as exc:
            raise damaged(path, exc) from None
        if array.shape != shape:
            raise damaged(path, ValueError(f"shape {array.shape}, expected {shape}"))
        return array

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write finished rows, flush them, then mark them done (atomically)."""
        mm = self._array("features.npy", (self.n_rows, self.dim), "r+")
        mm[rows] = values.astype(np.float32)
        mm.flush()
        del mm
        done = self.done()
        done[rows] = True
        save_npy(self.path / "done.npy", done)

    def features(self) -> np.ndarray:
        """The (N, k) float32 features, memory-mapped read-only."""
        return self._array("features.npy", (self.n_rows, self.dim), "r")

    # -- kernel ------------------------------------------------------------------------------------------------

    def load_kernel_arrays(self) -> dict[str, np.ndarray] | None:
        """The stored decomposition; None when there is none or it is damaged (it is recomputed from the features
        and saved over it)."""
        return load_arrays(self.path / "kernel.npz")

    def save_kernel_arrays(self, **arrays: np.ndarray) -> None:
        save_npz(self.path / "kernel.npz", compress=False, **arrays)

    def config(self) -> dict:
        return read_json(self.path / "config.json", recompute_fix(self.path))


class CurvatureStore:
    """The EK-FAC factors of one (checkpoint, training set, curvature spec), and a fit in progress (see the layout
    above): a killed fit resumes from partial.npz; factors.npz appears (atomically) once the fit is complete."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = Path(path), identity

    exclusive = FeatureStore.exclusive  # the same lock file protocol (.lock in the folder)

    @classmethod
    def open(cls, identity: dict, slug: str, root: str | os.PathLike | None = None) -> "CurvatureStore":
        ds = f"{_slug(identity['dataset'])}-{identity['split']}"
        path = (cache_root(root) / "curvature" / identity["checkpoint"] / ds
                / f"{_slug(slug)}-{identity_hash(identity)}")
        cfg_path = path / "config.json"
        if cfg_path.is_file():
            differences = identity_differences(read_json(cfg_path, recompute_fix(path, "its curvature"))
                                               .get("identity", {}), identity)
            if differences:
                raise CacheMismatchError(f"curvature folder {path} was made for another configuration "
                                         f"({'; '.join(differences[:4])}); delete it")
        else:
            path.mkdir(parents=True, exist_ok=True)
            write_json(cfg_path, {"identity": identity})
        return cls(path, identity)

    def load_factors(self) -> dict[str, np.ndarray] | None:
        return load_arrays(self.path / "factors.npz")  # a damaged file: refitted and saved over

    def save_factors(self, arrays: dict[str, np.ndarray]) -> None:
        save_npz(self.path / "factors.npz", compress=False, **arrays)
        (self.path / "partial.npz").unlink(missing_ok=True)

    def load_partial(self) -> dict | None:
        arrays = load_arrays(self.path / "partial.npz")  # a damaged one: the fit starts again
        if arrays is None:
            return None
        return {k: (v.item() if v.ndim == 0 else v) for k, v in arrays.items()}

    def save_partial(self, state: dict) -> None:
        save_npz(self.path / "partial.npz", compress=False, **{k: np.asarray(v) for k, v in state.items()})



def saved_targets_path(store_path: Path, name: str) -> Path:
    """`<feature folder>/bank-targets/<name>.npy`: one member's features of a fixed set of targets (a bank's), kept
    beside the training features they are scored against (`engine.Attribution.target_features(saved_as=name)`)."""
    return Path(store_path) / "bank-targets" / f"{name}.npy"


def load_array(path: Path) -> np.ndarray | None:
    """The array of an .npy the cache can recompute (a bank's target features); None when absent or damaged."""
    try:
        return np.load(path, allow_pickle=False) if path.is_file() else None
    except UNREADABLE:
        return None


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Every array of an .npz the cache can recompute (a kernel decomposition, curvature factors, a fit in
    progress); None when it is absent or damaged, so the caller recomputes it and saves over it."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except UNREADABLE:
        return None


# Heavy computations (featurizing a training set) of several processes on one cache root: the app's server and a
# command beside it, or two commands. Two processes at once with torch's default threads oversubscribe the cores (on
# 2 cores, 400 images: 6.2 s alone, 48 s each for two at once), so processes take turns, each with every core
# (5.9 and 12.8 s). Threads of one process share its slot and run together: one process's torch pool does not
# oversubscribe (two at once in the server: 11.4 s each). BENCHMARKS.md, "Several featurizations at once".
# ATTRIBUTION_PARALLEL_JOBS raises the number of processes that may run at once (a machine with many cores).
PARALLEL_JOBS_ENV = "ATTRIBUTION_PARALLEL_JOBS"
_slot = {"fd": None, "users": 0, "acquiring": False}  # this process's slot, shared by its threads
_slot_changed = threading.Condition()


def parallel_jobs() -> int:
    value = os.environ.get(PARALLEL_JOBS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{PARALLEL_JOBS_ENV} must be a whole number of at least 1, got {value!r}")
    return int(value)


@contextlib.contextmanager
def compute_slot(root: str | os.PathLike | None = None, waiting: Callable[[], None] | None = None,
                 poll: float = 0.5) -> Iterator[None]:
    """Hold this process's heavy-computation slot of cache root `root` while the block runs: processes take turns
    (`parallel_jobs()` at once, default 1); threads of a process that holds it join it at once. `waiting()` is called
    at once and then every `poll` seconds while this process waits. A slot is an `fcntl.flock` on
    `<root>/locks/compute-<i>.lock` (released by the OS when its process is killed); a read-only cache has nothing
    to guard. (One slot per process: a process works on one cache root at a time.)"""
    with _slot_changed:
        _slot["users"] += 1
    try:
        must_acquire = False
        with _slot_changed:
            while _slot["fd"] is None and _slot["acquiring"]:  # another thread of this process is getting it
                _slot_changed.wait(poll)
                if _slot["fd"] is None and _slot["acquiring"] and waiting:  # still: another process has it
                    waiting()
            if _slot["fd"] is None:
                _slot["acquiring"] = must_acquire = True
        if must_acquire:
            fd = None
            try:
                fd = _acquire_slot(root, waiting, poll)
            finally:
                with _slot_changed:
                    _slot["fd"], _slot["acquiring"] = fd, False
                    _slot_changed.notify_all()
        yield
    finally:
        with _slot_changed:
            _slot["users"] -= 1
            if _slot["users"] == 0 and _slot["fd"] is not None:
                if _slot["fd"] >= 0:
                    os.close(_slot["fd"])  # releases the lock
                _slot["fd"] = None


def _acquire_slot(root, waiting, poll: float) -> int:
    """The file descriptor of a free slot's lock, once one is free (-1: a read-only cache, nothing to hold)."""
    folder = cache_root(root) / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fds = [os.open(folder / f"compute-{i}.lock", os.O_RDWR | os.O_CREAT, 0o666) for i in range(parallel_jobs())]
    except OSError:
        return -1
    first = True
    while True:
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            for other in fds:
                if other != fd:
                    os.close(other)
            return fd
        if waiting:
            waiting()
        time.sleep(0 if first else poll)
        first = False


def retrain_dir(recipe_key: str, index_set_hash: str, seed: int, root: str | os.PathLike | None = None) -> Path:
    """The run folder of one retrained model of a ground-truth bank (see the layout above)."""
    return cache_root(root) / "retrain" / recipe_key / f"{index_set_hash}-seed-{int(seed)}"


def counterfactual_root(root: str | os.PathLike | None = None) -> Path:
    """cache/counterfactual: counterfactual studies of checkpoints (a bank's studies live in its own folder)."""
    return cache_root(root) / "counterfactual"


def counterfactual_dir(checkpoint_hash: str, slug: str, identity: dict,
                       root: str | os.PathLike | None = None) -> Path:
    """cache/counterfactual/<checkpoint hash>/<slug>-<identity hash>: one counterfactual study."""
    return counterfactual_root(root) / checkpoint_hash / f"{_slug(slug)}-{identity_hash(identity)}"


# -- MAGIC (attribution/magic): weighted runs, per-query metagradients, leave-out retrains --------------------------

def uploads_dir(root: str | os.PathLike | None = None) -> Path:
    """Images uploaded in the app, one folder per content hash (`<sha256 prefix>/<file name>`), so that a link that
    names an upload by its hash reopens it on this server."""
    return cache_root(root) / "uploads"


def magic_root(root: str | os.PathLike | None = None) -> Path:
    """cache/magic: one folder per deterministic weighted run (see attribution/magic/runs.py)."""
    return cache_root(root) / "magic"


def magic_run_dir(run_id: str, root: str | os.PathLike | None = None) -> Path:
    return magic_root(root) / _slug(run_id)


def record_throughput(root: Path, key: str, sample_timesteps_per_s: float, seconds: float, rough: bool = False,
                      ) -> None:
    """Remember how fast this machine featurized this checkpoint (cache root, throughput.json): the estimate
    shown before a run. Measurements over less than 2 s are too noisy to keep unless marked `rough` (a one-image
    probe), and a rough one never replaces a measured one."""
    if (seconds < 2 and not rough) or not np.isfinite(sample_timesteps_per_s):
        return
    path = root / "throughput.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if rough and key in data and not data[key].get("rough"):
        return
    data[key] = {"sample_timesteps_per_s": float(sample_timesteps_per_s), "rough": rough,
                 "measured": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(seconds, 1)}
    try:
        write_json(path, data)
    except OSError:
        pass  # a read-only cache keeps working without estimates


def recorded_throughput(root: Path, key: str) -> dict | None:
    """The recorded entry for this checkpoint: {"sample_timesteps_per_s", "rough", "measured", "seconds"}."""
    path = root / "throughput.json"
    try:
        entry = json.loads(path.read_text()).get(key) if path.is_file() else None
        return entry if entry and float(entry["sample_timesteps_per_s"]) > 0 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
