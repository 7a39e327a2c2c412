"""A server's background featurizations on Ray (`evaluation.ray_featurize.featurize_on_cluster`, what the app runs
when started with $RAY_ADDRESS): each opens its own connection, several at once take turns for the process's one
Ray connection, one whose store another featurization holds says so and waits, and the features equal a single
process's.

Not with the module-scoped `local_ray` fixture: every call here starts and stops its own local Ray, which would
stop a shared one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from attribution.engine import Attributor, open_attribution
from attribution.errors import ConfigError
from attribution.evaluation.ray_engine import RayCluster
from attribution.evaluation.ray_featurize import featurize_on_cluster
from attribution.features.config import FeatureConfig
from attribution.run_options import RunOptions

RTOL = 1e-5  # as tests/evaluation/test_ray_featurize.py: float32 summation order, one thread per task


def test_local_is_rays_word_for_a_local_ray(monkeypatch):
    assert RayCluster("local").address is None and RayCluster(" LOCAL ").address is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert RayCluster().address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert RayCluster().address == "10.0.0.5:6379"


def test_features_not_opened_from_options_are_refused(tiny_run, npz12):
    from attribution.models import load_model

    model = load_model(str(tiny_run), "cpu")
    from attribution.data import load_dataset

    att = Attributor(model, load_dataset(f"npz:{npz12}"), FeatureConfig(timesteps=1, proj_dim=64))
    with pytest.raises(ConfigError, match="not opened from run options"):
        featurize_on_cluster(att, "local")


@pytest.mark.slow
def test_two_background_jobs_take_turns_and_equal_one_process(tiny_run, npz12, tmp_path):
    base = dict(checkpoint=str(tiny_run), dataset=f"npz:{npz12}", proj_dim=64, device="cpu")
    kinds = [dict(method="dtrak", timesteps=2), dict(method="trak", timesteps=1)]
    alone = [open_attribution(RunOptions(**base, **k, cache=str(tmp_path / "alone"))) for k in kinds]
    on_ray = [open_attribution(RunOptions(**base, **k, cache=str(tmp_path / "ray"))) for k in kinds]
    messages, errors = [[], []], []

    def job(i):
        try:
            featurize_on_cluster(on_ray[i].members[0], "local", lambda *a, i=i: messages[i].append(a))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # the first job's store is held by another featurization (another cluster's driver, say) until the job says so
    held = on_ray[0].members[0].store.exclusive()
    held.__enter__()
    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while not any("waiting for it" in m[2] for m in messages[0]) and time.monotonic() < deadline and not errors:
        time.sleep(0.2)
    held.__exit__(None, None, None)
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    waited = next(m for m in messages[0] if "waiting for it" in m[2])
    assert waited[:2] == (0, 12) and "its rows are kept" in waited[2]
    for a, r, seen in zip(alone, on_ray, messages):
        a.featurize()
        want = np.array(a.members[0].store.features())
        store = r.members[0].store
        assert store.complete and store.path.name == a.members[0].store_path.name
        np.testing.assert_allclose(np.array(store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())
        assert seen[-1][:2] == (12, 12) and "on a local Ray" in seen[-1][2]
