"""The pages on the newer model families: the shipped rectified-flow model `digits-flow` (its samplers, its
generated image attributed as the command line's gen:SEED is) and a class-conditional DiT folder (a class picker
where a text model has a prompt box; its class reaches the noise key and the scores equal the library's)."""

from __future__ import annotations

import numpy as np
import pytest
from page_support import press_run_attribution

from attribution.data import load_dataset
from attribution.engine import open_attribution
from attribution.models import load_model
from attribution.run_options import RunOptions
from attribution.sampling import Prompt
from attribution.targets import resolve_targets

RUN_TIMEOUT = 240  # one rerun that featurizes (the machine is shared)


def test_generate_page_offers_the_flow_models_samplers(start_app, tmp_path):
    at = start_app("digits-flow", tmp_path / "cache")
    at.switch_page("app_pages/generate.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="gen_sampler").options == ["euler", "heun"]
    at.number_input(key="gen_n").set_value(2)
    at.number_input(key="gen_steps").set_value(4)
    at.selectbox(key="gen_sampler").set_value("heun")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert at.session_state["generated"]["sampler"] == "heun"
    at.switch_page("app_pages/attribute.py").run()  # the picker shows the generated image's sampler
    assert not at.exception, at.exception
    assert at.selectbox(key="attr_sampler").options == ["euler", "heun"]
    assert at.selectbox(key="attr_sampler").value == "heun"
    at.switch_page("app_pages/evaluation.py").run()  # opens on the flow model's own bank, not the first listed
    assert not at.exception, at.exception
    assert at.selectbox(key="eval_bank").value == "digits-flow"


@pytest.mark.slow
def test_attribute_page_on_a_class_conditional_dit(start_app, tmp_path, npz12):
    from engine_support import tiny_dit

    dataset = f"npz:{npz12}"
    folder = tmp_path / "dit"
    tiny_dit("flow-matching", load_dataset(dataset)).save(folder)
    at = start_app(str(folder), tmp_path / "cache", dataset=dataset, timeout=RUN_TIMEOUT)
    at.switch_page("app_pages/attribute.py").run()
    assert not at.exception, at.exception
    picker = at.selectbox(key="attr_prompt")
    assert picker.label == "Class" and picker.options == [str(c) for c in range(10)]
    picker.set_value("7")
    at.number_input(key="attr_seed").set_value(1)
    at.selectbox(key="attr_method").set_value("dtrak").run()
    at.number_input(key="attr_guidance").set_value(2.0)
    press_run_attribution(at, K=1, k=512, timeout=RUN_TIMEOUT)
    assert not at.exception, at.exception
    assert not at.main.error, [e.value for e in at.main.error]
    column, = at.session_state["attr_computed"].columns
    assert column.result.targets.keys == ["gen/1/p=7"]
    att = open_attribution(RunOptions(str(folder), method="dtrak", device="cpu", dataset=dataset, timesteps=1,
                                      proj_dim=512, cache=str(tmp_path / "library")),
                           load=lambda s: load_model(s, "cpu"))
    targets = resolve_targets("gen:1", att.target_model, dataset, prompt=Prompt("7", "", 2.0))
    np.testing.assert_array_equal(targets.images.numpy(), column.result.targets.images.numpy())
    lam = at.main.get_by_key("attr_result_0").select_slider[0].value  # the default λ of the page's slider
    expected = att.run(targets).at(lam).scores[0]
    shown = at.session_state["scored_rankings"][(dataset, "D-TRAK · gen:1")]
    np.testing.assert_allclose(shown, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())  # as the latent test
    # the generated image's class is the one asked for: the proponents' same-class share is computed, not "n/a"
    names = [load_dataset(dataset).label_name(int(i)) for i in np.argsort(-expected, kind="stable")[:5]]
    footer = next(c.value for c in at.main.caption if "Same-class share of the top 5" in c.value)
    assert footer.endswith(f"{np.mean([n == '7' for n in names]):.0%}"), footer
