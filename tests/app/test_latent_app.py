"""The Attribute and Journey pages on the shipped text-conditional latent model `digits-latent` (a LoRA finetune on
"digits:5,6,7,8,9"), driven with a prompt: what each page shows equals what the library computes for the same
options and the same prompt-carrying noise key ("gen/0/p=TEXT"), and another prompt changes the key and the result.

Smallest settings the pages offer (K=1 training timestep, k=512, a 4-step journey with R=2), one CPU thread. The
library side uses its own feature cache, so the page's cached features are not what it is compared with.
"""

from __future__ import annotations

import numpy as np
import pytest

from attribution.data import load_dataset
from attribution.engine import open_attribution
from attribution.run_options import RunOptions
from attribution.methods import get_method
from attribution.models import load_model
from attribution.sampling import Prompt
from page_support import tiles

DATASET = "digits:5,6,7,8,9"  # the finetuning set its prompts.json was recorded for
RUN_TIMEOUT = 240  # seconds for one rerun that featurizes 807 images (about 11 s alone; the machine is shared)
PROMPT, OTHER = "a handwritten digit 7", "a handwritten digit 9"
# The page and the library run the same float32 code on the same inputs but with separate feature caches and
# models loaded twice: equal up to the order of float32 sums (~1e-6 relative), so 1e-4 leaves room and no more.
RTOL = 1e-4


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """`open_attribution` of a method with options for the library's side, in a cache of its own."""
    cache = tmp_path_factory.mktemp("library-cache")
    models = {}

    def open_(method: str, **options):
        return open_attribution(RunOptions("digits-latent", method=method, device="cpu", dataset=DATASET,
                                           cache=str(cache), **options),
                                load=lambda s: models.setdefault(s, load_model(s, "cpu")))

    return open_


def run_attribute(at, prompt: str):
    at.text_input(key="attr_prompt").set_value(prompt)
    next(b for b in at.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not at.exception, at.exception
    assert not at.main.error, [e.value for e in at.main.error]
    column, = at.session_state["attr_computed"].columns
    return column.opts, column.result


@pytest.mark.slow
def test_attribute_page_with_a_prompt(start_app, tmp_path, library):
    """A generated target (seed 0, DDPM 50 steps, as the CLI's gen:0) under the typed prompt: its noise key carries
    the prompt, and the page's scores and top proponents are `Attribution.run`'s for that key and options."""
    from attribution.targets import resolve_targets

    at = start_app("digits-latent", tmp_path / "cache", dataset=DATASET, timeout=RUN_TIMEOUT)
    at.switch_page("app_pages/attribute.py").run()
    assert not at.exception, at.exception
    assert at.radio(key="attr_source").value == "Generated"
    assert at.text_input(key="attr_prompt").value == PROMPT  # the model's demo prompt (demo.json)
    at.number_input(key="attr_seed").set_value(0)
    at.selectbox(key="attr_method").set_value("dtrak").run()
    at.number_input(key="attr_K").set_value(1)
    at.selectbox(key="attr_k").set_value(512)
    at.number_input(key="attr_guidance").set_value(3.0)
    opts, result = run_attribute(at, PROMPT)
    assert (opts.checkpoint, opts.dataset, opts.method, opts.timesteps, opts.proj_dim) == \
        ("digits-latent@epoch-60", DATASET, "dtrak", 1, 512)  # the shipped alias names its last checkpoint
    assert result.targets.keys == [f"gen/0/p={PROMPT}"]
    code = at.main.get_by_key("attr_result_0").code[0].value
    assert f"--prompt '{PROMPT}' --guidance 3" in code and "--target gen:0" in code

    att = library("dtrak", timesteps=1, proj_dim=512)
    train = load_dataset(DATASET, "train", 16, 3)
    targets = resolve_targets("gen:0", att.target_model, DATASET, prompt=Prompt(PROMPT, "", 3.0))
    assert targets.keys == result.targets.keys
    np.testing.assert_array_equal(targets.images.numpy(), result.targets.images.numpy())  # same uint8 round trip
    lam = at.main.get_by_key("attr_result_0").select_slider[0].value  # the default λ of the page's slider
    expected = att.run(targets).at(lam).scores[0]
    shown = at.session_state["scored_rankings"][(DATASET, "D-TRAK · gen:0")]
    np.testing.assert_allclose(shown, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    pro = tiles(at, "attr_pro_0")
    top = np.argsort(-expected, kind="stable")[:len(pro)]
    assert [i for i, _, _ in pro] == top.tolist()
    assert [c for _, c, _ in pro] == [train.class_names[train.labels[i]] for i in top]
    np.testing.assert_allclose([s for _, _, s in pro], expected[top], rtol=5e-3)  # captions show 3 digits

    # another prompt: another noise key and another image (the seed is the same), so other scores
    _, again = run_attribute(at, OTHER)
    assert again.targets.keys == [f"gen/0/p={OTHER}"]
    assert not np.array_equal(again.targets.images.numpy(), result.targets.images.numpy())
    other = at.session_state["scored_rankings"][(DATASET, "D-TRAK · gen:0")]
    assert np.abs(other - shown).max() > 0.1 * np.abs(shown).max()


@pytest.mark.slow
def test_journey_page_with_a_prompt(start_app, tmp_path, library):
    """The journey of seed 0 under the typed prompt: the page's steps, features and last-step proponents are the
    journey module's for the same configuration; another prompt gives another final image."""
    from attribution.journey import JourneyConfig, run_journey

    at = start_app("digits-latent", tmp_path / "cache", dataset=DATASET, timeout=RUN_TIMEOUT)
    at.switch_page("app_pages/journey.py").run()
    assert not at.exception, at.exception
    assert at.radio(key="jr_source").value == "Generated"
    assert at.text_input(key="jr_prompt").value == PROMPT  # the model's demo prompt (demo.json)
    at.number_input(key="jr_seed").set_value(0)

    def compute(prompt: str):
        at.text_input(key="jr_prompt").set_value(prompt)
        at.selectbox(key="jr_method").set_value("dtrak")
        at.selectbox(key="jr_sampler").set_value("ddim")
        at.number_input(key="jr_steps").set_value(4)
        at.number_input(key="jr_every").set_value(2)
        at.number_input(key="jr_R").set_value(2)
        at.number_input(key="jr_K").set_value(1)
        at.selectbox(key="jr_k").set_value(512)
        next(b for b in at.button if b.label == "Compute journey").click().run(timeout=RUN_TIMEOUT)
        assert not at.exception, at.exception
        assert not at.main.error, [e.value for e in at.main.error]
        return at.session_state["jr_result"]

    shown = compute(PROMPT)
    cfg = shown["cfg"]
    assert (cfg.prompt, cfg.negative, cfg.guidance) == (PROMPT, "", 3.0)  # the demo guidance
    assert f"--prompt '{PROMPT}'" in at.main.code[-1].value

    att = library("dtrak", timesteps=1, proj_dim=512).members[0]
    att.featurize()
    cfg_lib = JourneyConfig(seed=0, steps=4, sampler="ddim", every=2, resamples=2, prompt=PROMPT, guidance=3.0)
    expected = run_journey(att, cfg_lib, cache=str(tmp_path / "library-journeys"))
    journey = shown["journey"]
    assert journey.xt.shape == (2, 4, 8, 8) and journey.xt_images().shape == (2, 3, 16, 16)  # latents shown decoded
    np.testing.assert_array_equal(journey.steps, expected.steps)
    np.testing.assert_allclose(journey.final, expected.final, atol=1e-5)
    np.testing.assert_allclose(journey.features, expected.features, rtol=RTOL,
                               atol=RTOL * np.abs(expected.features).max())
    lam = next(s for s in at.main.select_slider if s.label == "λ").value
    scores = att.scores(get_method("dtrak"), expected.features, lam)
    pro = tiles(at, "jr_pro")
    assert len(pro) == 6 and [i for i, _, _ in pro] == np.argsort(-scores[-1], kind="stable")[:6].tolist()
    np.testing.assert_allclose([s for _, _, s in pro], scores[-1][[i for i, _, _ in pro]], rtol=5e-3)

    other = compute(OTHER)
    assert other["cfg"].prompt == OTHER
    assert np.abs(other["journey"].final - journey.final).max() > 0.05


def test_attribute_page_refuses_another_training_set(start_app, tmp_path):
    """The sidebar's dataset "digits" is not the finetuning set: Run shows the one line of the library (and no
    results); a training-image target says it as soon as it is picked."""
    at = start_app("digits-latent", tmp_path / "cache", dataset="digits")
    at.switch_page("app_pages/attribute.py").run()
    assert not at.exception, at.exception
    at.number_input(key="attr_K").set_value(1)
    at.selectbox(key="attr_k").set_value(512)
    next(b for b in at.button if b.label == "Run attribution").click().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.main.error]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "finetuned on digits:5,6,7,8,9, not on digits (1618 training images" in errors[0]
    assert "attr_computed" not in at.session_state and not list(tmp_path.glob("cache/**/*.npy"))
    at.radio(key="attr_source").set_value("Training image").run()
    assert [e.value for e in at.main.error] == errors and not at.main.button  # stopped before the form
    # the sidebar offers the way out: one click attributes against the finetuning set
    at.sidebar.button(key="use_recorded").click().run()
    assert at.session_state["dataset"] == DATASET and not at.main.error


def test_pages_start_on_the_models_demo_defaults(start_app, tmp_path):
    """Issue 24, 8: the default guidance 7.5 gave blobs for "a handwritten digit 7" on digits-latent (3 gives 7s).
    Each shipped model records its demo defaults (demo.json: a good seed, and the prompt and guidance of a
    text-conditional model), and the Generate, Attribute and Journey pages start on them."""
    from attribution.models import resolve_checkpoint

    at = start_app("digits-latent", tmp_path / "cache", dataset=DATASET)
    at.switch_page("app_pages/generate.py").run()
    assert not at.exception, at.exception
    assert (at.number_input(key="gen_seed").value, at.text_input(key="gen_prompt").value,
            at.number_input(key="gen_guidance").value) == (4, PROMPT, 3.0)
    at.switch_page("app_pages/attribute.py").run()
    assert not at.exception, at.exception
    assert (at.number_input(key="attr_seed").value, at.text_input(key="attr_prompt").value,
            at.number_input(key="attr_guidance").value) == (4, PROMPT, 3.0)
    assert at.get("image")[0].proto.imgs[0].caption == f"gen:4 · “{PROMPT}”, guidance 3"
    at.switch_page("app_pages/journey.py").run()
    assert (at.number_input(key="jr_seed").value, at.number_input(key="jr_guidance").value) == (4, 3.0)
    demo = resolve_checkpoint("digits-latent").demo()
    assert (demo.seed, demo.prompt, demo.guidance) == (4, PROMPT, 3.0)
    # the unconditional shipped models record a seed whose image shows them well
    assert resolve_checkpoint("digits").demo().seed == 2 and resolve_checkpoint("animals-2").demo().prompt is None
    at = start_app("digits", tmp_path / "cache")
    at.switch_page("app_pages/generate.py").run()
    assert at.number_input(key="gen_seed").value == 2
