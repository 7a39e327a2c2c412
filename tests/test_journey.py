"""Journey (per-denoising-step attribution): the trajectory, the per-step features, the Journey TRAK baseline, the
formation measures, the cache, the `journey` command and the Journey page.

Everything runs on the tiny 2-epoch model of `tiny_run` against a 96-image subset of digits (an npz dataset for
the CLI and the page), with exact (identity) or small projections and a few sampling steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution import journey as journey_mod
from attribution.data import load_dataset
from attribution.data.datasets import ImageDataset
from attribution.engine import Attribution, Attributor
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.timesteps import noise_for
from attribution.analysis.formation import formation, pixel_correlation, top_indices
from attribution.figures import formation_figure
from attribution.journey import JourneyConfig, run_journey
from attribution.methods import get_method
from attribution.models import load_model
from attribution.models.schedules import DEFAULT_SCHEDULE, DDPMSchedule
from attribution.targets import from_pixels, resolve_targets

N_TRAIN = 96
APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(str(tiny_run), "cpu")


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    d = load_dataset("digits")
    return ImageDataset(d.spec, d.split, d.pixels[:N_TRAIN].copy(), d.labels[:N_TRAIN].copy(), list(d.class_names),
                        d.source_index[:N_TRAIN].copy())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("journey-cache")


def attributor(model, train, cache, **cfg) -> Attributor:
    att = Attributor(model, train, FeatureConfig(**{"fn": "simple", "timesteps": 1, "strategy": "cumulative",
                                                    "projector": "identity", **cfg}), cache=str(cache))
    att.featurize()
    return att


@pytest.fixture(scope="module")
def trak_att(model, train, cache) -> Attributor:
    """TRAK features at t=0 only (the timestep of DDPM's last sampling step), exact gradients."""
    return attributor(model, train, cache)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, train) -> Path:
    path = tmp_path_factory.mktemp("npz") / "digits96.npz"
    np.savez(path, images=train.pixels[..., 0], labels=train.labels)
    return path


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


# -- configuration ---------------------------------------------------------------------------------------------


def test_step_choice():
    assert JourneyConfig(steps=50).step_indices().tolist() == list(range(4, 50, 5))  # 10 steps, the last included
    assert JourneyConfig(steps=50, every=1).step_indices().tolist() == list(range(50))
    assert JourneyConfig(steps=10, every=4).step_indices().tolist() == [1, 5, 9]
    assert JourneyConfig(steps=10, at=(9, 0, 9, 3)).step_indices().tolist() == [0, 3, 9]
    assert JourneyConfig(steps=3, every=7).step_indices().tolist() == [2]


@pytest.mark.parametrize("cfg, match", [
    (JourneyConfig(steps=10, at=(10,)), "step 10 is outside the sampler's range 0..9"),
    (JourneyConfig(steps=10, at=(-1,)), "outside the sampler's range"),
    (JourneyConfig(steps=1001), r"--steps must be within 1..1000"),
    (JourneyConfig(steps=0), r"--steps must be within"),
    (JourneyConfig(resamples=0), "--resamples must be at least 1, got 0"),
    (JourneyConfig(every=0), "--every must be at least 1"),
    (JourneyConfig(every=2, at=(1,)), "not both"),
    (JourneyConfig(sampler="lms"), "unknown sampler"),
    (JourneyConfig(sampler="euler"), "a DDPM model samples with ddpm or ddim"),
])
def test_bad_configs_are_one_line_errors(cfg, match):
    with pytest.raises(ConfigError, match=match) as exc:
        cfg.check(DDPMSchedule.from_config(DEFAULT_SCHEDULE))
    one_line(exc)


# -- trajectory and features -----------------------------------------------------------------------------------


def test_trajectory_equals_the_schedulers_own_sampling(tiny_run, trak_att):
    """x_t and x̂0 at every step equal a plain diffusers loop (UNet + DDPMScheduler from the checkpoint folder, one
    CPU generator seeded with the image's seed), and the final image equals DDPMPipeline's."""
    from diffusers import DDPMPipeline

    seed, steps = 5, 8
    j = run_journey(trak_att, JourneyConfig(seed=seed, steps=steps, every=1, resamples=1), use_cache=False)
    pipe = DDPMPipeline.from_pretrained(str(tiny_run / "epoch-2"))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, 16, 16), generator=gen)
    pipe.scheduler.set_timesteps(steps)
    xts, x0s = [], []
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            out = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, generator=gen)
            xts.append(x[0])
            x0s.append(out.pred_original_sample[0])
            x = out.prev_sample
    assert j.timesteps.tolist() == pipe.scheduler.timesteps.tolist()
    np.testing.assert_allclose(j.xt, torch.stack(xts).numpy(), atol=2e-5)
    np.testing.assert_allclose(j.x0, torch.stack(x0s).numpy(), atol=2e-5)
    np.testing.assert_allclose(j.final, x[0].clamp(-1, 1).numpy(), atol=2e-5)
    image = pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="np").images
    np.testing.assert_allclose((j.final[0] + 1) / 2, image[0, :, :, 0], atol=2e-5)
    assert j.x0_distance()[-1] < 1e-6  # DDPM's last update returns x̂0 itself


def test_step_features_equal_a_plain_autograd_computation(model, trak_att):
    """Step i's feature: the Simple loss at x̂0(t_i) re-noised to t_i, gradient over all parameters, averaged over
    R draws of noise keyed ("gen/SEED/step<t>", t, draw); here recomputed draw by draw with torch.autograd."""
    seed, R = 2, 3
    j = run_journey(trak_att, JourneyConfig(seed=seed, steps=6, at=(1, 4), resamples=R), use_cache=False)
    params = dict(model.unet.named_parameters())
    abar = model.schedule.alphas_cumprod
    for i, t in enumerate(j.timesteps.tolist()):
        eps = noise_for([f"gen/{seed}/step{t}"], torch.tensor([t]), (1, 16, 16), seed=0, draws=R)[0]
        total = None
        for d in range(R):
            x0 = torch.from_numpy(j.x0[i])[None]
            xt = abar[t].sqrt().float() * x0 + (1 - abar[t]).sqrt().float() * eps[d:d + 1]
            with torch.enable_grad():
                ps = [p.requires_grad_(True) for p in params.values()]
                loss = ((model.unet(xt, torch.tensor([t])).sample - eps[d:d + 1]) ** 2).mean()
                g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(loss, ps)])
                for p in ps:
                    p.requires_grad_(False)
            total = g if total is None else total + g
        expected = (total / R).numpy()
        assert np.abs(j.features[i] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_forward_noising_of_an_image_without_a_trajectory(model, trak_att, train):
    image = train.tensors([3])[0]
    cfg = JourneyConfig(steps=10, every=3, resamples=1)
    j = run_journey(trak_att, cfg, image=image, name="upload.png", use_cache=False)
    assert j.meta["mode"] == "forward" and j.meta["name"] == "upload.png"
    np.testing.assert_array_equal(j.final, image.numpy())
    key = from_pixels(train.pixels[3:4]).keys[0]
    eps = noise_for([key], torch.as_tensor(j.timesteps), (1, 16, 16), seed=0)[0]
    abar = model.schedule.alphas_cumprod[torch.as_tensor(j.timesteps)].float().reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(j.xt, (abar.sqrt() * image + (1 - abar).sqrt() * eps).numpy(), atol=1e-5)
    d = j.x0_distance()
    assert d[-1] < d[0] and d[-1] < 0.1  # at small t the one-step prediction is close to the image


# -- scores, the baseline, formation -------------------------------------------------------------------------------


def test_last_step_scores_approach_the_final_image_attribution(trak_att):
    """At DDPM's last step (t=0, the features' timestep) x̂0 is the final image, so the step's scores differ from the
    final image's attribution only by the noise draws (R=16 on both sides, independent keys): measured Pearson
    0.92-0.96 for seeds 0-2, while the first step (x̂0 a blurry guess) is at -0.4..-0.6. Thresholds: > 0.8, and
    at least 0.5 above the first step."""
    trak = get_method("trak")
    R = 16
    spec = dataclasses.replace(trak_att.featurizer.grad_spec, draws=R)
    from attribution.features.gradients import per_sample_gradients

    for seed in (0, 1):
        j = run_journey(trak_att, JourneyConfig(seed=seed, steps=10, at=(0, 9), resamples=R), use_cache=False)
        S = j.result(Attribution(trak, [trak_att])).scores
        g = per_sample_gradients(trak_att.model, torch.from_numpy(j.final[None]), [f"gen/{seed}"], spec)
        final = trak_att.scores(trak, trak_att.featurizer.projector.project(g).numpy())[0]
        first, last = (np.corrcoef(s, final)[0, 1] for s in S)
        assert last > 0.8, (seed, last)
        assert last > first + 0.5, (seed, first, last)


def test_journey_trak_baseline_is_the_mean_of_per_step_scores(model, trak_att, cache):
    jt, trak = get_method("journey-trak"), get_method("trak")
    targets = resolve_targets("gen:4", model, "digits", steps=12)
    assert targets.generated[0].seed == 4
    G = jt.target_features(trak_att, targets, cache=str(cache))
    lam = trak_att.resolve_lambda(jt, None)
    baseline = trak_att.scores(jt, G, lam)[0]
    per_step = run_journey(trak_att, JourneyConfig(seed=4, steps=12, every=1, resamples=1), cache=str(cache))
    assert len(per_step) == 12
    steps_scores = per_step.result(Attribution(trak, [trak_att])).at(lam).scores
    np.testing.assert_allclose(baseline, steps_scores.mean(0), rtol=0,
                               atol=1e-5 * np.abs(baseline).max())  # float32 features
    assert np.corrcoef(baseline, steps_scores[-1])[0, 1] < 0.99  # the average is not just the last step

    upload = from_pixels(load_dataset("digits").pixels[:1], ["mine.png"])
    with pytest.raises(ConfigError, match="mine.png has none") as exc:
        jt.target_features(trak_att, upload)
    one_line(exc)
    with pytest.raises(ConfigError, match="self-influence"):
        trak_att.self_influence(jt)


def test_formation_measures_and_figure(trak_att):
    j = run_journey(trak_att, JourneyConfig(seed=1, steps=10, every=2, resamples=2), use_cache=False)
    result = j.result(Attribution(get_method("trak"), [trak_att]))
    S = result.scores
    # the steps' Result is the lifecycle's: scores of the per-step features through the kernel, at any lambda
    np.testing.assert_array_equal(S, trak_att.scores(get_method("trak"), j.features))
    lam = 10 * result.default_lambda
    np.testing.assert_array_equal(result.at(lam).scores, trak_att.scores(get_method("trak"), j.features, lam))
    assert result.targets.names == [f"step {int(s)}" for s in j.steps] and result.ranking.shape == S.shape
    with pytest.raises(ConfigError, match="one checkpoint"):
        j.result(Attribution(get_method("trak"), [trak_att, trak_att]))
    f = formation(j, S, trak_att.train, top=4)
    assert f.overlap[-1] == 1.0 and np.all((0 <= f.overlap) & (f.overlap <= 1))
    idx = top_indices(S, 4)
    assert np.all(S[np.arange(len(S))[:, None], idx] >= np.sort(S, 1)[:, -4:][:, :1])  # really the top 4
    expected = [pixel_correlation(trak_att.train.tensors(row).numpy(), j.final).mean() for row in idx]
    np.testing.assert_allclose(f.proponent_similarity, expected)
    assert pixel_correlation(j.final[None], j.final)[0] == pytest.approx(1.0)
    np.testing.assert_allclose(f.x0_distance, np.sqrt(((j.x0 - j.final) ** 2).reshape(len(j), -1).mean(1)))
    a, b = f.window()
    assert j.steps[0] <= a <= b <= j.steps[-1]
    fig = formation_figure(f, current=int(j.steps[2]))
    assert [len(t.x) for t in fig.data] == [len(j)] * 3
    assert list(fig.data[0].y) == pytest.approx(f.x0_distance.tolist())
    assert any(s.x0 == int(j.steps[2]) and s.x1 == int(j.steps[2]) for s in fig.layout.shapes)  # the step marker


def test_formation_summary_milestones():
    from attribution.analysis.formation import Formation

    steps = np.array([1, 11, 21, 31, 41, 50])
    d = np.array([1.0, 0.9, 0.6, 0.2, 0.05, 0.0])  # covered: 0, .1, .4, .8, .95, 1
    overlap = np.array([0.0, 0.5, 0.25, 0.5, 0.75, 1.0])  # dips below 0.5 at step 21, then stays at or above
    f = Formation(steps, steps * 20, d, np.zeros(6), overlap, top=4)
    assert f.covered(0.5) == 31 and f.covered(0.9) == 41 and f.covered(0.0) == 1
    assert f.settled(0.5) == 31 and f.settled(0.0) == 1 and f.settled(1.0) == 50
    assert f.summary().startswith("x̂0 is halfway to the final image at step 31 and 90% of the way at step 41 (of 50)")
    assert f.summary().endswith("from step 31 on, at least half of the last step's top-4 proponents are among the "
                                "step's top-4.")


def test_formation_summary_says_when_the_proponents_keep_changing():
    """Issue 24, 8: the page said "from step 50 on, at least half of the last step's top-4 are among the step's
    top-4" (true of the last step alone) while no earlier step shared any; the Tour said the proponents settle."""
    from attribution.analysis.formation import Formation

    steps = np.array([1, 11, 21, 31, 41, 50])
    d = np.array([1.0, 0.9, 0.6, 0.2, 0.05, 0.0])
    none = Formation(steps, steps * 20, d, np.zeros(6), np.array([0, 0, 0, 0, 0, 1.0]), top=4)
    assert none.settled(0.5) == 50
    assert none.summary().endswith("the proponents keep changing to the end: an earlier step's top-4 holds none of "
                                   "the last step's top-4.")
    some = Formation(steps, steps * 20, d, np.zeros(6), np.array([0, 0.25, 0, 0.25, 0.25, 1.0]), top=4)
    assert some.summary().endswith("an earlier step's top-4 holds at most 1 of the last step's top-4.")
    assert "from step" not in none.summary() + some.summary()


def test_journeys_are_cached_and_keyed_by_their_options(trak_att, cache, monkeypatch):
    cfg = JourneyConfig(seed=7, steps=6, every=2, resamples=2)
    first = run_journey(trak_att, cfg, cache=str(cache))
    path = journey_mod.journey_path(trak_att, cfg, "gen/7", str(cache))
    assert path.with_suffix(".npz").exists()
    assert json.loads(path.with_suffix(".json").read_text())["config"]["step_indices"] == [1, 3, 5]
    monkeypatch.setattr(journey_mod, "step_features", lambda *a, **k: pytest.fail("recomputed a cached journey"))
    again = run_journey(trak_att, cfg, cache=str(cache))
    for name, arr in first.arrays().items():
        np.testing.assert_array_equal(arr, getattr(again, name))
    other = journey_mod.journey_path(trak_att, dataclasses.replace(cfg, resamples=3), "gen/7", str(cache))
    assert other != path


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, match", [
    (["--resamples", "0"], "--resamples must be at least 1, got 0"),
    (["--every", "0"], "--every must be at least 1, got 0"),
    (["--steps", "6", "--at", "0,6"], "step 6 is outside the sampler's range 0..5"),
    (["--at", "a,b"], "comma-separated step indices"),
    (["--method", "grad-dot"], "journey scores steps with dtrak or trak"),
    (["--lambda", "-1"], "lambda must be a positive number"),
])
def test_journey_cli_bad_input_is_one_line_exit_2(tiny_run, small_npz, tmp_path, capsys, extra, match):
    from attribution.cli import main

    out = tmp_path / "out"
    rc = main(["journey", "--checkpoint", str(tiny_run), "--dataset", f"npz:{small_npz}", "--seed", "1",
               "--cache", str(tmp_path / "cache"), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


def test_journey_cli_writes_steps_scores_and_figure(tiny_run, small_npz, cache, tmp_path, capsys):
    from attribution.cli import main

    out = tmp_path / "out"
    args = ["journey", "--checkpoint", str(tiny_run), "--dataset", f"npz:{small_npz}", "--seed", "3", "--steps",
            "8", "--every", "3", "--resamples", "2", "--method", "trak", "--timesteps", "2", "--proj-dim", "256",
            "--cache", str(cache), "--top", "4", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "attributing 3 step(s) [1, 4, 7]" in captured.err
    with np.load(out / "journey.npz") as z:
        scores, top_i, top_s, bot_i = z["scores"], z["top_index"], z["top_score"], z["bottom_index"]
        assert z["steps"].tolist() == [1, 4, 7] and scores.shape == (3, N_TRAIN) and top_i.shape == (3, 4)
    np.testing.assert_array_equal(top_i, np.argsort(-scores, 1, kind="stable")[:, :4])
    np.testing.assert_array_equal(bot_i, np.argsort(scores, 1, kind="stable")[:, :4])
    np.testing.assert_allclose(top_s, np.sort(scores, 1)[:, ::-1][:, :4])
    meta = json.loads((out / "journey.json").read_text())
    assert meta["method"] == "trak" and meta["name"] == "gen:3" and [s["step"] for s in meta["steps"]] == [1, 4, 7]
    assert [p["index"] for p in meta["steps"][0]["proponents"]] == [int(i) for i in top_i[0] if scores[0, i] > 0]
    assert "plotly" in (out / "formation.html").read_text()[:5000].lower()
    if Path("/usr/bin/chromium").is_file():  # the PNG copy (kaleido drives the machine's Chromium)
        assert (out / "formation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another lambda re-scores the cached journey: same steps, different scores, nothing recomputed
    assert main(args[:-2] + ["--lambda", "1e-3", "--out", str(tmp_path / "out2")]) == 0
    assert "computed in" in capsys.readouterr().err
    with np.load(tmp_path / "out2" / "journey.npz") as z:
        np.testing.assert_array_equal(z["features"], np.load(out / "journey.npz")["features"])
        assert not np.allclose(z["scores"], scores)


def test_score_command_with_journey_trak(tiny_run, small_npz, cache, tmp_path, capsys):
    from attribution.cli import main

    base = ["score", "--checkpoint", str(tiny_run), "--dataset", f"npz:{small_npz}", "--method", "journey-trak",
            "--timesteps", "2", "--proj-dim", "256", "--cache", str(cache)]
    assert main(base + ["--target", "train:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a generated target with a sampling trajectory" in err[0]
    assert main(base + ["--target", "gen:2", "--json", "--out", str(tmp_path / "s.npy")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "journey-trak" and res["proponents"]
    scores = np.load(tmp_path / "s.npy")[0]
    assert res["proponents"][0]["index"] == int(np.argmax(scores))


# -- the Journey page (and Journey TRAK on the Attribute page) -------------------------------------------------------


@pytest.fixture
def app(tiny_run, small_npz, cache, monkeypatch):
    """The app pointed at the tiny run and the 96-image npz training set (a sidebar warning says it differs from
    the run's own dataset, which is fine here)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run))
    monkeypatch.setenv("ATTRIBUTION_DATASET", f"npz:{small_npz}")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(cache))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    return at


def captions(at, key: str) -> list[str]:
    return [img.caption for el in at.main.get_by_key(key).get("image") for img in el.proto.imgs]


def tile_indices(at, key: str) -> list[int]:
    return [int(c.split(" · ")[0].split("#")[1]) for c in captions(at, key)]


def compute_journey(at, **values):
    at.switch_page("app_pages/journey.py").run()
    assert not at.exception
    steps = {} if "jr_fwd_steps" in values else {"jr_steps": 8}  # a generated image's steps, or an upload's
    for key, value in {**steps, "jr_every": 3, "jr_R": 2, "jr_K": 2, **values}.items():
        at.number_input(key=key).set_value(value)
    at.selectbox(key="jr_k").set_value(512)
    at.selectbox(key="jr_method").set_value("trak")
    next(b for b in at.button if b.label == "Compute journey").click().run()
    assert not at.exception, at.exception
    assert not at.main.error, [e.value for e in at.main.error]
    return at.session_state["jr_result"]["journey"]


def test_journey_page_slider_play_and_film_strip(app, tiny_run, small_npz, cache):
    from attribution.engine import open_attributor
    from attribution.run_options import RunOptions

    app.switch_page("app_pages/journey.py").run()
    assert "Compute journey" in app.main.info[0].value
    app.number_input(key="jr_seed").set_value(3)
    j = compute_journey(app)
    assert j.steps.tolist() == [1, 4, 7] and j.meta["mode"] == "sampled" and j.meta["name"] == "gen:3"

    # What the page shows is the library's journey: step 7 (the last) first, its top proponents by score.
    trak = get_method("trak")
    att = open_attributor(load_model(str(tiny_run), "cpu"), RunOptions(method="trak", dataset=f"npz:{small_npz}",
                                                                       timesteps=2, proj_dim=512, cache=str(cache)))
    lam = float(next(s for s in app.main.select_slider if s.label == "λ").value)
    S = att.scores(trak, j.features, lam)  # directly, through the attributor's kernel
    assert app.main.select_slider(key="jr_step").value == 7
    assert captions(app, "jr_images")[0] == f"x_t · step 7, t={int(j.timesteps[2])}"
    pro = tile_indices(app, "jr_pro")
    assert pro == [int(i) for i in np.argsort(-S[2], kind="stable")[:6] if S[2, i] > 0]
    text = " ".join(m.value for m in app.main.markdown)
    f = formation(j, S, att.train, top=8)
    assert f"halfway to the final image at step {f.covered(0.5)}" in text
    assert "the target feature is not the same" in " ".join(c.value for c in app.main.caption)
    film = captions(app, "jr_film")
    assert [c.split(" · ")[0] for c in film] == ["1", "4", "7"]
    assert [int(c.split(" · ")[1].lstrip("#")) for c in film] == np.argmax(S, 1).tolist()

    # Scrubbing re-renders from the stored journey: other proponents, no job, quickly.
    start = time.perf_counter()
    app.main.select_slider(key="jr_step").set_value(1).run()
    assert time.perf_counter() - start < 10
    assert not app.exception and not app.status and not app.get("progress")
    assert captions(app, "jr_images")[0] == f"x_t · step 1, t={int(j.timesteps[0])}"
    assert tile_indices(app, "jr_pro") == [int(i) for i in np.argsort(-S[0], kind="stable")[:6] if S[0, i] > 0]

    # Play starts at the first step (shown first, not skipped) and advances one attributed step per tick, then
    # stops at the last.
    app.main.select_slider(key="jr_step").set_value(7).run()
    app.button(key="jr_play").click().run()
    assert app.session_state["jr_playing"] and app.main.select_slider(key="jr_step").value == 1
    app.run()
    assert app.main.select_slider(key="jr_step").value == 4
    app.run()
    assert app.main.select_slider(key="jr_step").value == 7
    app.run()
    assert not app.session_state["jr_playing"] and app.main.select_slider(key="jr_step").value == 7
    assert app.button(key="jr_play").label == "Play"


def test_journey_page_noises_an_upload_forward(app, train):
    app.session_state["uploaded"] = {"name": "mine.png", "sha256": "abc", "pixels": train.pixels[5],
                                     "resolution": 16, "channels": 1}
    app.switch_page("app_pages/journey.py").run()
    app.radio(key="jr_source").set_value("Uploaded").run()
    assert "noising it forward" in app.main.info[0].value
    j = compute_journey(app, jr_fwd_steps=6, jr_every=2)
    assert j.meta["mode"] == "forward" and j.meta["name"] == "mine.png"
    np.testing.assert_allclose(j.final, train.tensors([5])[0].numpy())
    assert "--image mine.png" in app.main.code[0].value


def test_attribute_page_journey_trak(app, train):
    app.switch_page("app_pages/attribute.py").run()
    app.number_input(key="attr_seed").set_value(2)
    app.selectbox(key="attr_method").set_value("journey-trak")
    app.number_input(key="attr_K").set_value(2)
    app.selectbox(key="attr_k").set_value(512)
    next(b for b in app.button if b.label == "Run attribution").click().run()
    assert not app.exception and not app.main.error
    assert [md.value for md in app.main.markdown if md.value.startswith("#### ")] == ["#### Journey TRAK"]
    scores = [float(c.split(" · ")[2].split()[-1]) for c in captions(app, "attr_pro_0")]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert "--method journey-trak" in app.main.get_by_key("attr_result_0").code[0].value

    app.session_state["uploaded"] = {"name": "mine.png", "sha256": "abc", "pixels": train.pixels[5],
                                     "resolution": 16, "channels": 1}
    app.radio(key="attr_source").set_value("Uploaded").run()
    next(b for b in app.button if b.label == "Run attribution").click().run()
    errors = [e.value for e in app.main.error]
    assert not app.exception and len(errors) == 1 and "mine.png has none" in errors[0] and "\n" not in errors[0]


def test_journey_cli_forward_noises_an_image_file(tiny_run, small_npz, cache, tmp_path, capsys, train):
    from PIL import Image

    from attribution.cli import main

    Image.fromarray(train.pixels[7, :, :, 0]).save(tmp_path / "seven.png")
    base = ["journey", "--checkpoint", str(tiny_run), "--dataset", f"npz:{small_npz}", "--steps", "6", "--every",
            "2", "--resamples", "1", "--method", "trak", "--timesteps", "2", "--proj-dim", "256", "--cache", str(cache)]
    assert main(base + ["--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither train:I, val:I nor an existing image file" in err[0]
    assert main(base + ["--image", str(tmp_path / "seven.png"), "--out", str(tmp_path / "out")]) == 0
    assert "noising it forward" in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "journey.json").read_text())
    assert meta["mode"] == "forward" and meta["name"] == "seven.png"
    with np.load(tmp_path / "out" / "journey.npz") as z:
        np.testing.assert_allclose(z["final"], train.tensors([7])[0].numpy())
        seven = z["scores"]
    # train:I names the same image (what the Journey page's command line says for a dataset image): the same
    # pixels, so the journey cached for seven.png (keyed by the pixels) is the one reused
    assert main(base + ["--image", "train:7", "--out", str(tmp_path / "out-train")]) == 0
    assert "train:7: x̂0 approaches the final image" in capsys.readouterr().out
    with np.load(tmp_path / "out-train" / "journey.npz") as z:
        np.testing.assert_allclose(z["final"], train.tensors([7])[0].numpy())
        np.testing.assert_allclose(z["scores"], seven)


def test_journey_page_resamples_a_generated_image_with_its_sampler(app, tiny_run, model):
    from attribution.sampling import sample

    traj = sample(model, 2, 3, steps=6, sampler="ddim")  # as the Generate page makes seeds 3 and 4
    app.switch_page("app_pages/journey.py").run()
    app.number_input(key="jr_seed").set_value(4)
    app.number_input(key="jr_steps").set_value(6)
    app.selectbox(key="jr_sampler").set_value("ddim").run()
    assert app.query_params["image"] == "gen:4" and app.query_params["sampler"] == "ddim"
    app.number_input(key="jr_every").set_value(2)
    app.number_input(key="jr_R").set_value(1)
    app.number_input(key="jr_K").set_value(2)
    app.selectbox(key="jr_k").set_value(512)
    app.selectbox(key="jr_method").set_value("trak")
    next(b for b in app.button if b.label == "Compute journey").click().run()
    assert not app.exception and not app.main.error
    j = app.session_state["jr_result"]["journey"]
    assert j.meta["config"]["sampler"] == "ddim" and j.meta["config"]["steps"] == 6 and j.meta["name"] == "gen:4"
    np.testing.assert_allclose(j.final, traj.final[1], atol=1e-4)  # the same image (batch of 2 vs 1: ~2e-6)


def test_journey_page_estimates_before_compute(tiny_run, small_npz, tmp_path, monkeypatch):
    """Issue 24, 4: the Journey page showed a spinner only. Before Compute, a line says about how long the training
    features and the attributed steps' features will take here (from the throughput measured for them), for what
    the widgets show (no form: changing R changes the estimate before Compute), and "cached" once computed. On a
    cache of its own, so what other tests computed cannot make it "cached" first."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_resource.clear()  # the app's opened attributions are shared by the process: another test's point
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run))  # at that test's cache, where this one's are done
    monkeypatch.setenv("ATTRIBUTION_DATASET", f"npz:{small_npz}")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=120).run()

    def note() -> str:
        found = [c.value for c in at.main.caption if c.value.startswith(("About ", "This journey is cached"))]
        assert len(found) == 1, [c.value for c in at.main.caption]
        return found[0]

    at.switch_page("app_pages/journey.py").run()
    for key, value in {"jr_steps": 8, "jr_every": 3, "jr_R": 2, "jr_K": 2}.items():
        at.number_input(key=key).set_value(value)
    at.selectbox(key="jr_k").set_value(512)
    at.selectbox(key="jr_method").set_value("trak").run()
    assert not at.exception, at.exception
    before = note()
    assert "96 images at" in before and "a journey of gen:" in before and "sample-timesteps/s" in before
    compute_journey(at)
    at.run()
    assert note() == "This journey is cached: it shows in seconds."
    at.number_input(key="jr_R").set_value(3).run()  # not computed yet: the estimate follows the widget at once
    after = note()
    assert after.startswith("About ") and "a journey of gen:" in after and "96 images" not in after
