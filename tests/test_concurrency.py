"""Several sessions at once (the app serves a classroom from one process): shared models give every thread the
answer it would get alone, one featurization per feature store, an interrupted featurization (a browser that
disconnects) leaves only whole rows and is resumed by the next session, written files get normal permissions.

Everything runs on the randomly initialised tiny UNet of engine_support.py and a few digits images.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from attribution.engine import Attributor, format_duration, progress_message
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientFeatures
from attribution.fileio import atomic_dir, save_npy, write_json
from attribution.sampling import sample
from engine_support import keys_for, subset

THREADS = 8
CFG = FeatureConfig(fn="square", projector="sjlt", proj_dim=64, timesteps=2)


def test_threads_sharing_one_model_get_the_serial_features(model, digits, tmp_path):
    """Each thread computes target features of its own images on one shared model: bitwise the serial result.
    (Before the adapter's lock, functional_call swapped other threads' parameters into the UNet mid-pass and
    every thread got wrong gradients, off by ~0.2 in absolute value.)"""
    att = Attributor(model, subset(digits, 4), CFG, cache=tmp_path)

    def job(i):
        rows = [2 * i, 2 * i + 1]
        return att.features_of(digits.tensors(rows), keys_for("train", rows))

    serial = [job(i) for i in range(THREADS)]
    for _ in range(2):  # interleavings vary from run to run
        with ThreadPoolExecutor(THREADS) as ex:
            parallel = list(ex.map(job, range(THREADS)))
        for a, b in zip(serial, parallel):
            np.testing.assert_array_equal(a, b)


def test_threads_sampling_on_one_model_get_the_serial_images(model):
    serial = [sample(model, 1, seed, steps=3).final for seed in range(4)]
    with ThreadPoolExecutor(4) as ex:
        parallel = list(ex.map(lambda seed: sample(model, 1, seed, steps=3).final, range(4)))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def counting_train_rows(monkeypatch):
    """Patch the training-row step of gradient features to record the keys of every batch it computes
    (thread-safe)."""
    original, calls, lock = GradientFeatures.train_rows, [], threading.Lock()

    def counting(self, rows):
        with lock:
            calls.append(self.train_keys(rows))
        return original(self, rows)

    monkeypatch.setattr(GradientFeatures, "train_rows", counting)
    return calls


def test_threads_featurizing_one_store_do_the_work_once(model, digits, tmp_path, monkeypatch):
    train = subset(digits, 12)
    reference = np.array(Attributor(model, train, CFG, cache=tmp_path / "ref", batch_size=4).featurize().features())
    calls = counting_train_rows(monkeypatch)
    # Separate Attributors (separate sessions or processes), one cache folder: the store is created once too.
    atts = [Attributor(model, train, CFG, cache=tmp_path / "shared", batch_size=4) for _ in range(4)]
    barrier = threading.Barrier(len(atts))
    messages = [[] for _ in atts]

    def job(i):
        barrier.wait()
        store = atts[i].featurize(progress=lambda done, n, msg: messages[i].append((done, n, msg)))
        return np.array(store.features())

    with ThreadPoolExecutor(len(atts)) as ex:
        results = list(ex.map(job, range(len(atts))))
    assert sorted(k for batch in calls for k in batch) == sorted(keys_for("train", range(12)))  # each row once
    for r in results:
        np.testing.assert_array_equal(r, reference)
    workers = [m for m in messages if any("images/s" in msg for _, _, msg in m)]
    assert len(workers) == 1  # the others waited and then found everything cached
    for m in messages:
        if m is not workers[0]:
            assert m[-1] == (12, 12, "cached")
    stores = list((tmp_path / "shared").glob("features/*/*/*/config.json"))
    assert len(stores) == 1 and not list((tmp_path / "shared").rglob(".tmp-*"))


class Disconnected(Exception):
    """What Streamlit raises in a script thread when its session goes away (StopException) - any exception."""


def test_featurizations_in_one_process_share_its_compute_slot(model, digits, tmp_path, monkeypatch):
    """Two sessions of one server featurize two different feature stores at once (another seed each): threads of
    one process share its compute slot (`store.compute_slot`: one torch pool does not oversubscribe the cores), so
    neither is queued, their batches interleave, and each gets the features it computes alone."""
    import time

    train = subset(digits, 16)
    cfgs = [FeatureConfig(fn="square", projector="sjlt", proj_dim=64, timesteps=2, seed=s) for s in (0, 1)]
    alone = [np.array(Attributor(model, train, c, cache=tmp_path / "alone", batch_size=4).featurize().features())
             for c in cfgs]
    original, order, lock = GradientFeatures.train_rows, [], threading.Lock()

    def slow(self, rows):
        with lock:
            order.append(self.cfg.seed)
        time.sleep(0.2)  # each batch waits long enough for the other thread to start one
        return original(self, rows)

    monkeypatch.setattr(GradientFeatures, "train_rows", slow)
    import attribution.store as store_mod

    getting = store_mod._acquire_slot

    def slow_lock(*args):  # the first thread takes a moment to get the lock: the second arrives meanwhile
        time.sleep(0.3)
        return getting(*args)

    monkeypatch.setattr(store_mod, "_acquire_slot", slow_lock)
    atts = [Attributor(model, train, c, cache=tmp_path / "shared", batch_size=4) for c in cfgs]
    barrier, messages = threading.Barrier(2), [[], []]

    def job(i):
        barrier.wait()
        return np.array(atts[i].featurize(lambda d, n, m, i=i: messages[i].append(m)).features())

    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(job, range(2)))
    assert sorted(order) == [0] * 4 + [1] * 4 and order not in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4), order
    assert not any(m.startswith("queued") for ms in messages for m in ms), messages
    for a, b in zip(alone, got):
        np.testing.assert_array_equal(a, b)


def test_a_featurization_waits_for_another_process_on_the_same_cache(model, digits, tmp_path):
    """A command beside the app's server (another process, the same cache root) holds the compute slot: this
    featurization says it is queued, waits, then runs; a killed holder would release it (an OS file lock)."""
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom attribution.store import compute_slot\n"
        f"with compute_slot({str(cache)!r}):\n    print('held', flush=True)\n    time.sleep(3)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        messages, start = [], time.perf_counter()
        Attributor(model, subset(digits, 8), CFG, cache=cache, batch_size=4).featurize(
            lambda d, n, m: messages.append((time.perf_counter() - start, m)))
    finally:
        holder.wait(timeout=30)
    assert messages[0][1].startswith("queued: another featurization is running on this machine"), messages
    computed = [t for t, m in messages if m.startswith(("4 / 8", "8 / 8"))]
    assert computed and min(computed) > 1.0, messages  # the rows came after the other process let go


def test_an_interrupted_featurization_is_resumed_by_the_waiting_session(model, digits, tmp_path, monkeypatch):
    """Session A stops after two batches (its browser went away) while B waits on the lock: A leaves whole rows
    only and releases the lock, B computes just the rest, and the result equals an uninterrupted run."""
    train = subset(digits, 10)
    reference = np.array(Attributor(model, train, CFG, cache=tmp_path / "ref", batch_size=3).featurize().features())
    calls = counting_train_rows(monkeypatch)
    a = Attributor(model, train, CFG, cache=tmp_path / "run", batch_size=3)
    b = Attributor(model, train, CFG, cache=tmp_path / "run", batch_size=3)
    a_started, b_waiting = threading.Event(), threading.Event()

    def a_progress(done, n, msg):
        a_started.set()
        b_waiting.wait(30)
        if done >= 6:
            raise Disconnected

    def run_a():
        with pytest.raises(Disconnected):
            a.featurize(progress=a_progress)

    def run_b():
        a_started.wait(30)
        return np.array(b.featurize(progress=lambda done, n, msg: b_waiting.set()).features())

    with ThreadPoolExecutor(2) as ex:
        fa, fb = ex.submit(run_a), ex.submit(run_b)
        fa.result()
        result = fb.result()
    assert calls == [keys_for("train", [0, 1, 2]), keys_for("train", [3, 4, 5]),  # A, then B resumes
                     keys_for("train", [6, 7, 8]), keys_for("train", [9])]
    np.testing.assert_array_equal(result, reference)


def test_progress_says_images_rate_and_time_left():
    assert progress_message(30, 100, 20, 10.0) == "30 / 100 images, 2 images/s, about 35 s left"
    assert progress_message(100, 3100, 100, 10.0) == "100 / 3100 images, 10 images/s, about 5 min left"
    assert progress_message(100, 100, 100, 10.0) == "100 / 100 images, 10 images/s"
    assert progress_message(10, 3000, 10, 0.05) == "10 / 3000 images, 200 images/s, about 15 s left"
    assert progress_message(1, 3000, 1, 20.0) == "1 / 3000 images, 0.05 images/s, about 16.7 h left"
    assert format_duration(2 * 3600) == "2.0 h"


def test_featurize_estimate_from_the_measured_throughput(model, digits, tmp_path, monkeypatch):
    from attribution.store import record_throughput

    train = subset(digits, 8)
    att = Attributor(model, train, CFG, cache=tmp_path, batch_size=4)
    seconds, basis = att.featurize_estimate()
    assert seconds is None and "timed" in basis
    # times three images after a warm-up, keeps it as a rough measurement
    seconds, basis = att.featurize_estimate(probe=True)
    assert seconds > 0 and "rough" in basis and att.featurize_estimate()[1] == basis
    record_throughput(att.cache_dir, att.throughput_key, 4.0, 3.0)  # measured: 4 sample-timesteps/s
    seconds, basis = att.featurize_estimate()
    assert seconds == pytest.approx(8 * 2 / 4.0) and "8 images" in basis and "measured here" in basis
    record_throughput(att.cache_dir, att.throughput_key, 100.0, 0.1,
                      rough=True)  # a later probe does not replace a measurement
    assert att.featurize_estimate()[0] == pytest.approx(8 * 2 / 4.0)
    att.featurize()
    assert att.featurize_estimate() == (0.0, "cached")
    # the same kind of features at another K or seed uses the same measurement; the targets' features too
    other = Attributor(model, train, FeatureConfig(fn="square", projector="sjlt", proj_dim=64, timesteps=4, seed=3),
                       cache=tmp_path)
    assert other.featurize_estimate()[0] == pytest.approx(8 * 4 / 4.0)
    assert other.targets_estimate(5) == (pytest.approx(5 * 4 / 4.0), other.targets_estimate(5)[1])
    # another kind does not: TRAK's Simple-loss features, or another k, were estimated from D-TRAK's (issue 24, 4)
    for cfg in (FeatureConfig(fn="simple", projector="sjlt", proj_dim=64, timesteps=2),
                FeatureConfig(fn="square", projector="sjlt", proj_dim=128, timesteps=2)):
        seconds, basis = Attributor(model, train, cfg, cache=tmp_path).featurize_estimate()
        assert seconds is None and "timed here" in basis


def test_written_files_get_normal_permissions(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (owner-only 0600/0700); the results get 0666/0777 less the
    umask, like any file the user writes (0644/0755 under the usual umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    save_npy(tmp_path / "a.npy", np.zeros(3))
    write_json(tmp_path / "b.json", {"x": 1})
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "c.txt").write_text("x")
    for path, mode in [("a.npy", 0o666), ("b.json", 0o666), ("folder", 0o777), ("folder/c.txt", 0o666)]:
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode & ~mask, path


def test_concurrent_store_creation_keeps_the_first(tmp_path):
    """Two creators of one folder: the second's temporary folder is discarded, the first's content kept."""
    with atomic_dir(tmp_path / "s", replace=False) as first:
        (first / "who").write_text("first")
    with atomic_dir(tmp_path / "s", replace=False) as second:
        (second / "who").write_text("second")
    assert (tmp_path / "s" / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_app_featurization_runs_on_when_the_session_goes_away(model, digits, tmp_path, monkeypatch):
    """The app featurizes in one background job per store: a second session watches the same job, and a session
    whose browser disconnects (its script stopped: its progress callback raises) leaves the job running to the
    end; every row is computed once."""
    from app_pages import _attr, _ui

    train = subset(digits, 12)
    calls = counting_train_rows(monkeypatch)
    first = Attributor(model, train, CFG, cache=tmp_path, batch_size=4)
    second = Attributor(model, train, CFG, cache=tmp_path, batch_size=4)  # another session's attributor

    def disconnected(label):
        def update(done, total, message):
            raise Disconnected
        return update

    monkeypatch.setattr(_ui, "progress_bar", disconnected)
    with pytest.raises(Disconnected):
        _attr.featurize_with_progress(_attr.Attribution(_attr.get_method("dtrak"), [first]))
    job = _attr._JOBS[str(first.store_path)]  # left running by the session that went away
    assert _attr.featurize_job(second) is job or not job.thread.is_alive()  # the other session watches it
    job.thread.join(120)  # nobody watching: it runs to the end
    assert job.error is None and first.store.complete
    seen = []
    _attr.featurize_job(second).watch(lambda done, total, message: seen.append((done, total, message)))
    assert seen[-1] == (12, 12, "cached")
    assert sorted(k for batch in calls for k in batch) == sorted(keys_for("train", range(12)))  # each row once


def test_a_read_only_complete_store_needs_no_lock(model, digits, tmp_path, monkeypatch):
    """A store nobody may write (shipped or shared read-only; chmod does not stop root, so the lock file's
    creation is refused directly): a complete one is used as is."""
    import attribution.store as store_mod

    train = subset(digits, 4)
    att = Attributor(model, train, CFG, cache=tmp_path)
    reference = np.array(att.featurize().features())
    real_open = os.open

    def refusing_open(path, flags, *args):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_mod.os, "open", refusing_open)
    again = Attributor(model, train, CFG, cache=tmp_path)
    seen = []
    np.testing.assert_array_equal(np.array(again.featurize(lambda *x: seen.append(x)).features()), reference)
    assert seen == [(4, 4, "cached")]
    again.kernel()  # fitted without the lock (saving needs a writable folder, which this one is)
