"""Featurization fanned out on Ray (`evaluation.ray_featurize`): the features a single process computes, in the
same store, resumable, with progress; DAS's residual statistics and EK-FAC's factors through the same path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from attribution.engine import Attribution, open_attribution
from attribution.errors import ConfigError
from attribution.evaluation.ray_featurize import featurize_on_ray, shard_rows
from attribution.run_options import RunOptions

# Rows do not depend on the process that computes them; a Ray task runs one torch thread, the single process two,
# so float32 sums may differ in order: relative 1e-5 is ~100x float32's epsilon and far below any score's meaning.
RTOL = 1e-5


def test_shards_cover_the_rows_once():
    rows = np.arange(3, 50)
    shards = shard_rows(rows, slots=2)
    assert len(shards) == 8 and np.array_equal(np.concatenate(shards), rows)  # ~4 per slot
    assert [len(s) for s in shard_rows(rows, 2, shard_size=20)] == [20, 20, 7]
    with pytest.raises(ConfigError, match="--shard-size must be at least 1"):
        shard_rows(rows, 2, shard_size=0)


@pytest.mark.slow
def test_ray_features_equal_one_process_and_resume(tiny_run, npz12, tmp_path, local_ray):
    base = dict(checkpoint=str(tiny_run), dataset=f"npz:{npz12}", timesteps=2, proj_dim=64, device="cpu")
    alone = open_attribution(RunOptions(**base, method="dtrak", cache=str(tmp_path / "alone")))
    alone.featurize()
    want = np.array(alone.members[0].store.features())

    options = RunOptions(**base, method="dtrak", cache=str(tmp_path / "ray"))
    seen = []
    att = featurize_on_ray(options, local_ray, shard_size=5, progress=lambda m: lambda *a: seen.append(a))
    store = att.members[0].store
    assert store.complete and store.path.name == alone.members[0].store_path.name  # the same identity and folder
    np.testing.assert_allclose(np.array(store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    # n / N as each shard arrives (in whatever order they finish): shards of 5, 5 and 2 rows
    assert sorted(np.diff([0] + [s[0] for s in seen])) == [2, 5, 5] and all(s[1] == 12 for s in seen)
    assert "images/s" in seen[0][2] and "shards left" in seen[0][2]

    # a run killed after some shards: the next computes only the missing rows
    done = store.done()
    done[4:] = False
    np.save(store.path / "done.npy", done)
    seen.clear()
    featurize_on_ray(options, local_ray, shard_size=5, progress=lambda m: lambda *a: seen.append(a))
    assert sorted(np.diff([4] + [s[0] for s in seen])) == [3, 5] and seen[-1][0] == 12 and store.complete
    np.testing.assert_allclose(np.array(store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    seen.clear()
    featurize_on_ray(options, local_ray, progress=lambda m: lambda *a: seen.append(a))
    assert seen == [(12, 12, "cached")]


def _kill_first_shard_task(killed: list, timeout: float = 120.0) -> None:
    """SIGKILL the first Ray worker seen running a shard (Ray titles a busy worker `ray::<task>`)."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if title.startswith(b"ray::_shard"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_redone(tiny_run, npz12, tmp_path, local_ray):
    """A Ray worker killed while it featurizes a shard: Ray runs that shard again on another worker, and the store
    ends complete and equal to one process's features. With Ray's retries used up, one line, and nothing lost."""
    import threading

    base = dict(checkpoint=str(tiny_run), dataset=f"npz:{npz12}", timesteps=2, proj_dim=64, device="cpu",
                method="dtrak")
    alone = open_attribution(RunOptions(**base, cache=str(tmp_path / "alone")))
    alone.featurize()
    want = np.array(alone.members[0].store.features())

    killed: list[int] = []
    killer = threading.Thread(target=_kill_first_shard_task, args=(killed,))
    killer.start()
    att = featurize_on_ray(RunOptions(**base, cache=str(tmp_path / "ray")), local_ray, shard_size=6)
    killer.join()
    store = att.members[0].store
    assert killed and store.complete
    np.testing.assert_allclose(np.array(store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())

    # with no retry left, the killed shard ends the run in one line; the other shards are written, a rerun adds it
    killed.clear()
    killer = threading.Thread(target=_kill_first_shard_task, args=(killed,))
    killer.start()
    with pytest.raises(ConfigError) as err:
        featurize_on_ray(RunOptions(**base, cache=str(tmp_path / "no-retry")), _NoRetries(local_ray), shard_size=6)
    killer.join()
    assert killed and re.fullmatch(r"1 of 2 shards failed after Ray's retries, e\.g\. \w+: .+; rerun to compute "
                                   r"their rows \(the other shards are kept\)", str(err.value)), str(err.value)
    store = open_attribution(RunOptions(**base, cache=str(tmp_path / "no-retry"))).members[0].store
    assert store.done().sum() == 6 and not store.complete
    store = featurize_on_ray(RunOptions(**base, cache=str(tmp_path / "no-retry")), local_ray).members[0].store
    np.testing.assert_allclose(np.array(store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())


class _NoRetries:
    """The module's Ray with Ray's task retries turned off."""

    def __init__(self, cluster):
        self.cluster = cluster

    def __getattr__(self, name):
        return getattr(self.cluster, name)

    def task_options(self) -> dict:
        return {**self.cluster.task_options(), "max_retries": 0, "retry_exceptions": False}


@pytest.mark.slow
def test_kinds_with_a_step_before_or_after_the_rows(tiny_run, npz12, tmp_path, local_ray):
    """EK-FAC's factors are fitted by the driver before the fan-out (the tasks load them); DAS's residual
    statistics after it: both as a single process computes them."""
    base = dict(checkpoint=str(tiny_run), dataset=f"npz:{npz12}", timesteps=2, proj_dim=64, device="cpu")
    for method in ("ekfac", "das"):
        alone = open_attribution(RunOptions(**base, method=method, cache=str(tmp_path / f"alone-{method}")))
        alone.featurize()
        ray = featurize_on_ray(RunOptions(**base, method=method, cache=str(tmp_path / f"ray-{method}")), local_ray,
                               shard_size=4)
        a, b = alone.members[0], ray.members[0]
        want = np.array(a.store.features())
        np.testing.assert_allclose(np.array(b.store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())
        if method == "das":
            np.testing.assert_allclose(b.train_features().stat("das-residual"),
                                       a.train_features().stat("das-residual"), rtol=RTOL)


def test_featurize_on_ray_bad_input_is_one_line(capsys):
    from attribution.cli import main

    for argv, says in ((["--shard-size", "0"], "--shard-size must be at least 1"),
                       (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
                       (["--ray", "--num-cpus", "0"], "--num-cpus must be at least 1")):
        assert main(["featurize", "--checkpoint", "digits", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err


@pytest.mark.slow
def test_featurize_command_on_ray(tiny_run, npz12, tmp_path):
    """`featurize --ray` as a user runs it (its own local Ray, in a process of its own): the folder it prints holds
    the features one process computes."""
    import os
    import subprocess
    import sys

    args = ["featurize", "--checkpoint", str(tiny_run), "--dataset", f"npz:{npz12}", "--timesteps", "2",
            "--proj-dim", "64", "--device", "cpu"]
    out = subprocess.run([sys.executable, "-m", "attribution", *args, "--ray", "--num-cpus", "1", "--shard-size",
                          "5", "--cache", str(tmp_path / "ray")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    folder = out.stdout.strip().splitlines()[-1]
    alone = open_attribution(RunOptions(str(tiny_run), dataset=f"npz:{npz12}", timesteps=2, proj_dim=64,
                                        device="cpu", cache=str(tmp_path / "alone")))
    alone.featurize()
    want = np.array(alone.members[0].store.features())
    got = np.load(f"{folder}/features.npy")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    assert "3 of 3 shards" not in out.stderr and "0 of 3 shards left" in out.stderr


@pytest.mark.parametrize("command", ["lds", "estimators"])
def test_bank_tables_with_ray_score_what_they_featurized_with_one_model_load(command, fake_bank_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """`lds --ray` and `estimators --ray` load the bank's model once for all their methods (they share the loaded
    model), hand the opened attributions to the fan-out and score those, reporting what the command reports
    without --ray. The fan-out itself is stood in for by in-process featurization here (the Ray path is the test
    below)."""
    import attribution.engine
    import attribution.models
    from attribution.cli import main
    from attribution.evaluation import ray_engine, ray_featurize

    args = [command, "--bank", str(fake_bank_dir), "--method", "trak,dtrak:avg", "--split", "val", "--timesteps",
            "1", "--proj-dim", "64", "--resamples", "20", "--device", "cpu"]
    assert main([*args, "--cache", str(tmp_path / "plain")]) == 0
    plain = capsys.readouterr().out

    loads, fanned = [], []
    real_load = attribution.models.load_model

    def counting_load(spec, device="auto"):
        loads.append(spec)
        return real_load(spec, device)

    class Cluster:  # stands in for a local Ray
        def __init__(self, address, num_cpus):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def describe(self):
            return "a stand-in cluster"

    def fan_out(what, cluster, shard_size=None, progress=None):
        fanned.append(what)
        what.featurize()
        return what

    monkeypatch.setattr(attribution.models, "load_model", counting_load)
    monkeypatch.setattr(attribution.engine, "load_model", counting_load)
    monkeypatch.setattr(ray_engine, "RayCluster", Cluster)
    monkeypatch.setattr(ray_featurize, "featurize_on_ray", fan_out)
    assert main([*args, "--ray", "--cache", str(tmp_path / "ray")]) == 0
    assert len(loads) == 1 and len(fanned) == 2 and all(isinstance(a, Attribution) for a in fanned)
    assert fanned[0].members[0].model is fanned[1].members[0].model
    assert capsys.readouterr().out == plain  # the same features (one process), so the same table


@pytest.mark.slow
def test_lds_with_ray_reports_the_same_table(fake_bank_dir, tmp_path):
    """`lds --ray` featurizes each method on Ray first, then reports the table a plain `lds` reports."""
    import os
    import subprocess
    import sys

    def lds(*extra, cache):
        out = subprocess.run([sys.executable, "-m", "attribution", "lds", "--bank", str(fake_bank_dir), "--method",
                              "trak,dtrak:avg", "--split", "val", "--timesteps", "1", "--proj-dim", "64",
                              "--resamples", "20", "--device", "cpu", "--cache", str(cache), *extra],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stderr
        return out.stdout, out.stderr

    plain, _ = lds(cache=tmp_path / "plain")
    ray, said = lds("--ray", "--num-cpus", "1", cache=tmp_path / "ray")
    assert "featurizing on a local Ray (1 CPUs)" in said and "shards left" in said  # the fan-out ran
    # Ray's shards batch the rows differently, so features agree to float32 summation order (RTOL), not bit for
    # bit. Every LDS figure (rank-based, three decimals) must come out the same; the GCV lambda is the argmin of a
    # curve that is flat on this bank (4 validation targets, k = 64), so it may land on the neighbouring point of
    # its grid (8 per decade: a factor 10^(1/8)), as it did on one CPU (0.237 against 0.178).
    gcv = re.compile(r"\(GCV\) ([0-9.e+-]+)")
    assert gcv.sub("(GCV) _", ray) == gcv.sub("(GCV) _", plain) and "trak" in plain and "dtrak:avg" in plain
    pairs = list(zip(gcv.findall(ray), gcv.findall(plain)))
    assert len(pairs) == 2 and all(abs(np.log10(float(a) / float(b))) <= 1 / 8 + 1e-3 for a, b in pairs), pairs
