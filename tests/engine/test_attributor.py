"""The Attributor and the Attribution ensemble (attribution/engine.py) against independent computations: scores from
exact (identity-projected) features equal the direct dense float64 formula, each training image is its own top
proponent, featurizing is deterministic, cached and resumes after an interruption, a store made for another
checkpoint, training set or feature config is refused, bad options are one-line errors that leave nothing in the
cache, and an ensemble's default lambda comes from every member. Everything runs on a randomly initialised "tiny"
UNet (41,609 parameters) and a few digits images: the checks are numerical identities that hold for any weights, so
no training is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_support import CPU, TWO_STEPS, keys_for, one_line, rel_err, subset, tiny_model

from attribution.data.datasets import ImageDataset
from attribution.engine import Attribution, Attributor, open_attributor
from attribution.run_options import RunOptions
from attribution.report import rank
from attribution.errors import AttributionError, CacheMismatchError, ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientFeatures, param_count, per_sample_gradients
from attribution.features.projectors import make_projector
from attribution.methods import get_method


def files_under(root) -> list:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# -- the Attributor: exactness, caching, resume, refusal -------------------------------------------------------


def test_identity_projection_scores_equal_the_direct_formula(model, digits, digits_val, tmp_path):
    train = subset(digits, 24)
    att = Attributor(model, train, FeatureConfig(fn="square", projector="identity", **TWO_STEPS), cache=tmp_path)
    att.featurize()
    P = param_count(model)
    X = per_sample_gradients(model, train.tensors(), keys_for("train", range(24)), att.featurizer.grad_spec)
    stored = np.asarray(att.store.features())
    assert stored.shape == (24, P) and att.proj_dim == P
    assert rel_err(stored, X) < 1e-6  # the very same float32 computation
    Gt = att.features_of(digits_val.tensors(range(4)), keys_for("val", range(4)))
    G = per_sample_gradients(model, digits_val.tensors(range(4)), keys_for("val", range(4)), att.featurizer.grad_spec)
    assert rel_err(Gt, G) < 1e-6
    X, G = X.double().numpy(), G.double().numpy()
    gram = X @ X.T
    mean_eig = np.trace(gram) / 24  # N < P: the 24 non-zero eigenvalues of X^T X are those of X X^T
    method = get_method("dtrak")
    for factor in (1e-3, 1e-1, 10.0):
        lam = factor * mean_eig
        # (X^T X + lam I)^{-1} X^T = X^T (X X^T + lam I)^{-1} (push-through; the P x P system would need 14 GB).
        direct = G @ X.T @ np.linalg.solve(gram + lam * np.eye(24), np.eye(24))
        # The kernel is stored with float32 U and V (relative 6e-8), amplified by at most the condition number of
        # X X^T + lam I at the smallest lambda (~1e4 here): measured ~3e-8; bound 1e-4.
        assert rel_err(att.scores(method, Gt, lam), direct) < 1e-4, factor
        assert rel_err(att.self_influence(method, lam), np.diag(gram @ np.linalg.inv(gram + lam * np.eye(24)))) < 1e-4


def test_identity_projection_over_a_parameter_subset_equals_the_textbook_formula(model, digits, digits_val,
                                                                                 tmp_path):
    """With few parameters (1,424) the k x k system itself is small: G (X^T X + lam I)^{-1} X^T literally."""
    train = subset(digits, 24)
    cfg = FeatureConfig(fn="simple", projector="identity", params="conv_in,time_embedding", **TWO_STEPS)
    att = Attributor(model, train, cfg, cache=tmp_path)
    att.featurize()
    X = np.asarray(att.store.features(), dtype=np.float64)
    P = param_count(model, "conv_in,time_embedding")
    assert X.shape == (24, P) and P < 2000
    G = att.features_of(digits_val.tensors(range(3)), keys_for("val", range(3))).astype(np.float64)
    mean_eig = np.trace(X @ X.T) / 24
    for factor in (1e-3, 1e-1, 10.0):
        lam = factor * mean_eig
        direct = G @ np.linalg.solve(X.T @ X + lam * np.eye(P), X.T)
        assert rel_err(att.scores(get_method("trak"), G, lam), direct) < 1e-4, factor  # as above


def test_each_training_image_is_its_own_top_proponent(model, digits, tmp_path):
    train = subset(digits, 24)
    att = Attributor(model, train, FeatureConfig(fn="square", projector="identity", **TWO_STEPS), cache=tmp_path)
    att.featurize()
    rows = [0, 5, 9, 17, 23]
    # Targets recomputed from pixels with their training keys: the same noise as their training rows.
    G = att.features_of(train.tensors(rows), keys_for("train", rows))
    lam = 1e-6 * att.train_features().kernel.eigenvalues.mean()
    S = att.scores(get_method("dtrak"), G, lam)
    # With N < P and lambda -> 0, X (X^T X + lam I)^{-1} X^T is the projection onto the row space: S -> identity.
    assert S.argmax(1).tolist() == rows
    for m, i in enumerate(rows):
        assert S[m, i] > 0.99
        assert np.abs(np.delete(S[m], i)).max() < 0.05
    top = rank(S[0], train, top=3)
    assert top[0].index == 0 and top[0].label == int(train.labels[0]) and top[0].score == pytest.approx(S[0, 0])


def test_featurize_is_deterministic_and_cached_and_the_seed_matters(model, digits, tmp_path, monkeypatch):
    train = subset(digits, 8)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=128, **TWO_STEPS)
    a = Attributor(model, train, cfg, cache=tmp_path / "a")
    b = Attributor(model, train, cfg, cache=tmp_path / "b")
    fa = np.array(a.featurize().features())
    fb = np.array(b.featurize().features())
    np.testing.assert_array_equal(fa, fb)  # same inputs, same single-threaded CPU kernels: bitwise equal
    assert a.store_path.relative_to(tmp_path / "a") == b.store_path.relative_to(tmp_path / "b")
    # A training image used as a target gets exactly the noise of its row (batching differs: rounding only).
    assert rel_err(a.features_of(train.tensors([3, 5]), ["train/3", "train/5"]), fa[[3, 5]]) < 1e-5
    # Another seed: other noise and another projection.
    c = Attributor(model, train, FeatureConfig(fn="square", projector="sjlt", proj_dim=128, seed=1, **TWO_STEPS),
                   cache=tmp_path / "a")
    fc = np.array(c.featurize().features())
    assert c.store_path != a.store_path
    assert rel_err(fc, fa) > 0.5
    # A fresh attributor on the same cache computes nothing and reports "cached".
    monkeypatch.setattr(GradientFeatures, "train_rows", lambda *args: pytest.fail("recomputed cached features"))
    seen = []
    again = Attributor(model, train, cfg, cache=tmp_path / "a")
    np.testing.assert_array_equal(np.array(again.featurize(progress=lambda *x: seen.append(x)).features()), fa)
    assert seen == [(8, 8, "cached")]
    cfg_json = again.store.config()
    assert cfg_json["identity"]["features"]["proj_dim"] == 128 and "scaling" in cfg_json["identity"]
    assert cfg_json["provenance"]["timesteps"] == [0, 500]


def test_featurize_resumes_after_an_interruption(model, digits, tmp_path, monkeypatch):
    train = subset(digits, 10)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=64, **TWO_STEPS)
    reference = np.array(Attributor(model, train, cfg, cache=tmp_path / "ref", batch_size=3).featurize().features())

    original = GradientFeatures.train_rows
    calls: list[list[str]] = []

    def killed_after_two_batches(self, rows):
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        calls.append(self.train_keys(rows))
        return original(self, rows)

    monkeypatch.setattr(GradientFeatures, "train_rows", killed_after_two_batches)
    att = Attributor(model, train, cfg, cache=tmp_path / "run", batch_size=3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        att.featurize()
    done = att.store.done()
    assert done.tolist() == [True] * 6 + [False] * 4  # exactly the two finished batches
    np.testing.assert_array_equal(np.array(att.store.features())[:6], reference[:6])
    with pytest.raises(ConfigError, match=r"incomplete \(6/10 rows\)") as exc:
        att.scores(get_method("dtrak"), reference[:1], 1.0)
    one_line(exc)

    calls.clear()

    def counting(self, rows):
        calls.append(self.train_keys(rows))
        return original(self, rows)

    monkeypatch.setattr(GradientFeatures, "train_rows", counting)
    progress = []
    resumed = Attributor(model, train, cfg, cache=tmp_path / "run", batch_size=3)
    store = resumed.featurize(progress=lambda done, n, msg: progress.append((done, n)))
    assert calls == [["train/6", "train/7", "train/8"], ["train/9"]]  # only the missing rows
    assert progress == [(9, 10), (10, 10)]
    assert store.complete
    # Same rows in the same batches as the uninterrupted run: bitwise equal.
    np.testing.assert_array_equal(np.array(store.features()), reference)


def test_store_made_for_another_checkpoint_is_refused(model, digits, tmp_path):
    train = subset(digits, 4)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=64, **TWO_STEPS)
    folder = tmp_path / "store"
    Attributor(model, train, cfg, store_dir=folder).featurize()
    before = (folder / "features.npy").read_bytes(), (folder / "config.json").read_text()
    other = Attributor(tiny_model(1), train, cfg, store_dir=folder)
    with pytest.raises(CacheMismatchError) as exc:
        other.featurize()
    assert "checkpoint" in one_line(exc)
    # and another training set, or another feature config, in the same folder
    with pytest.raises(CacheMismatchError, match="dataset_hash"):
        Attributor(model, subset(digits, 5), cfg, store_dir=folder).featurize()
    with pytest.raises(CacheMismatchError, match="fn"):
        Attributor(model, train, FeatureConfig(fn="simple", projector="sjlt", proj_dim=64, **TWO_STEPS),
                   store_dir=folder).featurize()
    assert ((folder / "features.npy").read_bytes(), (folder / "config.json").read_text()) == before  # untouched
    # a non-empty folder that is not a store is refused too
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not a feature store"):
        Attributor(model, train, cfg, store_dir=stranger).featurize()


@pytest.mark.parametrize("make, match", [
    (lambda: FeatureConfig(fn="bogus"), "unknown output function"),
    (lambda: FeatureConfig(projector="bogus"), "unknown projector"),
    (lambda: FeatureConfig(strategy="bogus"), "unknown timestep strategy"),
    (lambda: FeatureConfig(timesteps=0), "timesteps K must be positive"),
    (lambda: FeatureConfig(timesteps=-3), "timesteps K must be positive"),
    (lambda: FeatureConfig(noises=0), "noises"),
    (lambda: FeatureConfig(proj_dim=0), "projection dimension k must be positive"),
    (lambda: FeatureConfig(proj_dim=-5, projector="gaussian"), "projection dimension k must be positive"),
    (lambda: FeatureConfig(fn="square", eta=0.5), "eta applies only"),
    (lambda: FeatureConfig(fn="interp", eta=1.5), "eta must be within"),
    (lambda: FeatureConfig(timesteps=5000).gradient_spec(1000), "within 1..1000"),
    (lambda: make_projector("bogus", 10, 4, 0, CPU), "unknown projector"),
    (lambda: make_projector("sjlt", 10, 0, 0, CPU), "projection dimension"),
    (lambda: get_method("bogus"), "unknown method"),
    (lambda: get_method("trak").check_fn("square"), "TRAK uses the simple output function"),
])
def test_bad_feature_options_raise_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match) as exc:
        make()
    one_line(exc)


def test_failed_configs_leave_nothing_in_the_cache(model, digits, tmp_path):
    root = tmp_path / "cache"
    train = subset(digits, 4)
    bad = [
        lambda: Attributor(model, train, FeatureConfig(timesteps=5000), cache=root),
        lambda: Attributor(model, train, FeatureConfig(params="nonexistent", **TWO_STEPS), cache=root),
        # a projection to more dimensions than the gradient has (it cannot carry more than `identity`)
        lambda: Attributor(model, train, FeatureConfig(proj_dim=param_count(model) + 4, **TWO_STEPS), cache=root),
        # trak-cuda needs CUDA and fast_jl: refused when the projector is built, before the store is created.
        lambda: Attributor(model, train, FeatureConfig(projector="trak-cuda", **TWO_STEPS), cache=root).featurize(),
        # a dataset at another resolution than the model's
        lambda: Attributor(model, ImageDataset("x", "train", np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, np.int64),
                                               ["a"], np.arange(2)), FeatureConfig(**TWO_STEPS), cache=root),
        lambda: open_attributor(model, RunOptions(method="trak", dataset="digits", fn="square", cache=str(root))),
        lambda: open_attributor(model, RunOptions(method="dtrak", dataset="digits", timesteps=1001, cache=str(root))),
        lambda: open_attributor(model, RunOptions(method="dtrak", dataset="digits", eta=2.0, cache=str(root))),
        lambda: open_attributor(model, RunOptions(method="dtrak", dataset=None, cache=str(root))),
                                                   # no recorded training set
    ]
    for make in bad:
        with pytest.raises(AttributionError) as exc:
            make()
        one_line(exc)
        assert files_under(root) == [], exc.value
    with pytest.raises(ConfigError, match=f"k = {param_count(model) + 4} is more than the {param_count(model):,} "
                       f"parameters .* choose k <= {param_count(model)} \\(--proj-dim\\) or the identity projector"):
        bad[2]()
    Attributor(model, train, FeatureConfig(proj_dim=param_count(model), **TWO_STEPS), cache=root)  # k = P: allowed
    # lambda <= 0 on a featurized attributor: refused, nothing new written.
    att = Attributor(model, train, FeatureConfig(projector="sjlt", proj_dim=64, **TWO_STEPS), cache=root)
    att.featurize()
    att_simple = Attributor(model, train, FeatureConfig(fn="simple", projector="sjlt", proj_dim=64, **TWO_STEPS),
                            cache=root)
    att_simple.featurize()
    before = files_under(root)
    G = np.ones((1, 64), np.float32)
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lambda must be a positive number") as exc:
            att.scores(get_method("dtrak"), G, lam)
        one_line(exc)
    # Methods with a fixed output function refuse features of another one (these are Square features).
    for method in ("trak", "relative-if", "renorm-if", "grad-dot"):
        with pytest.raises(ConfigError, match="needs simple features") as exc:
            att.scores(get_method(method), G, 1.0)
        one_line(exc)
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lambda"):
            att.self_influence(get_method("dtrak"), lam)
    # methods without lambda ignore it
    assert att_simple.scores(get_method("grad-dot"), G, -1.0).shape == (1, 4)
    assert files_under(root) == before


# -- the ensemble's default lambda (GPU readiness, issue 9, item 9) ----------------------------------------------


def test_an_ensembles_default_lambda_comes_from_every_member(digits, tmp_path):
    """Two members whose features differ in scale by 10 (a checkpoint early and late in training): the default
    lambda is the mean of the members' defaults, not the first member's."""
    train = subset(digits, 6)
    cfg = FeatureConfig(fn="simple", timesteps=2, proj_dim=64)
    late = tiny_model(0)
    with torch.no_grad():  # member 2: the same UNet with its output layer scaled (another checkpoint)
        late.unet.conv_out.weight.mul_(10.0)
        late.unet.conv_out.bias.mul_(10.0)
    members = [Attributor(m, train, cfg, cache=tmp_path) for m in (tiny_model(0), late)]
    for att in members:
        att.featurize()
    trak = get_method("trak")
    own = [att.resolve_lambda(trak, None) for att in members]
    assert own[1] > 3 * own[0]  # the scaled member's eigenvalues are larger
    lam = Attribution(trak, members).resolve_lambda(None)
    assert lam == pytest.approx(np.mean(own), rel=1e-12)
    assert Attribution(trak, members).resolve_lambda(2.5) == 2.5
