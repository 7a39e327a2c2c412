"""Similarity-baseline embeddings: pixels, and an open_clip image tower loaded only from a local file."""

import numpy as np
import pytest
import torch

from attribution.errors import ConfigError
from attribution.features.embeddings import CLIP_MEAN, CLIP_STD, ClipEmbedder, pixel_embeddings


def test_pixel_embeddings_are_the_flattened_pixels():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    emb = pixel_embeddings(x)
    assert emb.shape == (2, 48) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[1], x[1].numpy().ravel())


def test_clip_preprocess_matches_a_direct_computation(tiny_clip_name):
    emb = ClipEmbedder.random(tiny_clip_name)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    got = emb.preprocess(x)
    rgb = ((x + 1) / 2).repeat(1, 3, 1, 1)
    up = torch.nn.functional.interpolate(rgb, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    want = (up - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want)


def test_clip_weights_round_trip_through_a_local_file(tiny_clip_name, tmp_path):
    emb = ClipEmbedder.random(tiny_clip_name, seed=3)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    torch.save(emb.model.state_dict(), tmp_path / "w.pt")
    loaded = ClipEmbedder.from_file(tmp_path / "w.pt", tiny_clip_name)
    np.testing.assert_array_equal(loaded.embed(x), emb.embed(x))
    # batching does not change an embedding
    loaded.batch_size = 2
    np.testing.assert_allclose(loaded.embed(x), emb.embed(x), atol=1e-5)
    assert loaded.identity.startswith(f"{tiny_clip_name}:")


@pytest.mark.parametrize("case", ["missing", "none", "junk", "unknown-model"])
def test_clip_bad_input_is_one_line(tiny_clip_name, tmp_path, case):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    args = {"missing": (tmp_path / "nope.pt", tiny_clip_name), "none": (None, tiny_clip_name),
            "junk": (tmp_path / "junk.pt", tiny_clip_name), "unknown-model": (tmp_path / "junk.pt", "ViT-nope")}[case]
    with pytest.raises(ConfigError) as err:
        ClipEmbedder.from_file(*args)
    assert "\n" not in str(err.value)
    if case in ("missing", "none"):
        assert "none ship and nothing is downloaded" in str(err.value)


def test_similarity_methods_score_the_embeddings_directly(tiny_run, tmp_path, tiny_clip_name):
    """pixel-dot / pixel-cos through the engine equal a direct computation on the flattened pixels; clip-cos with
    a (random, tiny) tower from a local file equals the cosine of that tower's embeddings."""
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.targets import resolve_targets

    emb = ClipEmbedder.random(tiny_clip_name, seed=1)
    torch.save(emb.model.state_dict(), tmp_path / "clip.pt")
    ckpt = str(tiny_run / "epoch-2")
    for name in ("pixel-dot", "pixel-cos", "clip-cos"):
        att = open_attribution(RunOptions.for_method(name, checkpoint=ckpt, device="cpu", dataset="digits",
                                          cache=str(tmp_path / "cache"), clip_model=tiny_clip_name,
                                          clip_weights=str(tmp_path / "clip.pt")))
        att.featurize()
        targets = resolve_targets("val:0-2", att.target_model, "digits")
        scores = att.scores(att.target_features(targets))
        train = att.train.tensors()
        if name.startswith("pixel"):
            X, G = train.reshape(len(train), -1).double(), targets.images.reshape(3, -1).double()
        else:
            X, G = torch.from_numpy(emb.embed(train)).double(), torch.from_numpy(emb.embed(targets.images)).double()
        want = G @ X.T
        if name.endswith("cos"):
            want = want / G.norm(dim=1, keepdim=True) / X.norm(dim=1)[None, :]
        np.testing.assert_allclose(scores, want.numpy(), rtol=2e-5, atol=1e-6)
        assert att.resolve_lambda(None) is None


def test_similarity_methods_refuse_self_influence_and_missing_weights(tiny_run, tmp_path):
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions

    att = open_attribution(RunOptions(str(tiny_run / "epoch-2"), method="pixel-cos", device="cpu", dataset="digits",
                                      cache=str(tmp_path)))
    att.featurize()
    with pytest.raises(ConfigError, match="no self-influence"):
        att.self_influence()
    with pytest.raises(ConfigError, match="need CLIP weights"):
        open_attribution(RunOptions(str(tiny_run / "epoch-2"), method="clip-dot", device="cpu", dataset="digits",
                                    cache=str(tmp_path)))
