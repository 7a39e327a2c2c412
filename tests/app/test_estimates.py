"""Issue 24, 4: estimates before the long runs that showed a spinner only, from the measured throughput.

On a cache of its own and 40 digits, so what other tests cached cannot make a run "cached" first."""

from __future__ import annotations

import numpy as np

from app_pages._attr import METHOD_TITLES


def test_generally_influential_is_estimated_before_compute(tiny_run, tmp_path, start_app):
    """The Timesteps page's "generally influential" tab (403 s in the issue, a spinner only): before Compute, each
    method's featurization and its targets' features, for what the widgets show (no form), then "cached"."""
    from attribution.data import load_dataset

    digits = load_dataset("digits")
    path = tmp_path / "digits40.npz"
    np.savez(path, images=digits.pixels[:40, ..., 0], labels=digits.labels[:40])
    at = start_app(tiny_run, tmp_path / "cache", dataset=f"npz:{path}", timeout=300)
    at.switch_page("app_pages/timesteps.py").run()
    assert not at.exception, at.exception
    at.multiselect(key="ts_infl_methods").set_value(["tracin", "trak"])
    at.number_input(key="ts_infl_n").set_value(2)
    at.number_input(key="ts_infl_k").set_value(2).run()
    note = next(c for c in at.main.caption if c.value.startswith("Not cached yet"))
    for name in ("tracin", "trak"):
        assert f"{METHOD_TITLES[name]}: about" in note.value, note.value
    assert "About " in note.value and "in all" in note.value and "Ray" not in note.value  # (no $RAY_ADDRESS)
    at.button(key="ts_infl_go").click().run()
    assert not at.exception, at.exception
    assert [m.value for m in at.markdown if "distinct of 4" in m.value]
    at.run()
    assert any(c.value.startswith("The training features for these options are cached: a run takes about")
               for c in at.main.caption)
