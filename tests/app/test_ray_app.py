"""A server started with $RAY_ADDRESS featurizes in the background as Ray tasks (`RAY_ADDRESS=local`: a Ray on this
machine): the Attribute page's job runs on it, says so in its progress, and writes the features one process
would."""

from __future__ import annotations

import numpy as np
import pytest
from page_support import press_run_attribution

from app_pages._attr import find_job
from attribution.engine import open_attribution
from attribution.run_options import RunOptions

RUN_TIMEOUT = 300  # starts a local Ray, then featurizes (the machine is shared)
RTOL = 1e-5  # as tests/evaluation/test_ray_featurize.py: float32 summation order, one thread per task


@pytest.mark.slow
def test_the_attribute_pages_job_runs_on_the_servers_ray(start_app, tiny_run, npz12, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    dataset = f"npz:{npz12}"
    at = start_app(str(tiny_run), tmp_path / "cache", dataset=dataset, timeout=RUN_TIMEOUT)
    at.switch_page("app_pages/attribute.py").run()
    at.radio(key="attr_source").set_value("Validation image").run()
    at.number_input(key="attr_val_idx").set_value(1)
    press_run_attribution(at, K=1, k=512, timeout=RUN_TIMEOUT)
    assert not at.exception, at.exception
    assert not at.main.error, [e.value for e in at.main.error]

    base = dict(checkpoint=str(tiny_run), method="dtrak", dataset=dataset, timesteps=1, proj_dim=512, device="cpu")
    member = open_attribution(RunOptions(**base, cache=str(tmp_path / "cache"))).members[0]
    job = find_job(str(member.store_path))
    assert job is not None and job.error is None and "on a local Ray" in job.message, job and job.message
    alone = open_attribution(RunOptions(**base, cache=str(tmp_path / "alone")))
    alone.featurize()
    want = np.array(alone.members[0].store.features())
    assert member.store.complete
    np.testing.assert_allclose(np.array(member.store.features()), want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.slow
def test_a_ray_address_that_does_not_answer_is_one_line_on_the_page(start_app, tiny_run, npz12, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # the discard port: nothing listens there
    at = start_app(str(tiny_run), tmp_path / "cache", dataset=f"npz:{npz12}", timeout=RUN_TIMEOUT)
    at.switch_page("app_pages/attribute.py").run()
    # the estimate before Run says it is this machine's one-process speed, not the cluster's
    note = next(c.value for c in at.main.caption if c.value.startswith("Not cached yet"))
    assert "run as tasks on the Ray cluster at 127.0.0.1:9" in note and "not the cluster's" in note, note
    press_run_attribution(at, K=1, k=512, timeout=RUN_TIMEOUT)
    assert not at.exception, at.exception
    errors = [e.value for e in at.main.error]
    assert len(errors) == 1 and "no Ray cluster answers at 127.0.0.1:9" in errors[0] and "\n" not in errors[0], errors
