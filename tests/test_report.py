"""Tables, exports, shares and the equivalent CLI line."""

import io
import shlex
from dataclasses import replace

import numpy as np

from attribution.cli import build_parser
from attribution.data.datasets import ImageDataset
from attribution.data.images import grid_image
from attribution.features.config import FeatureConfig
from attribution.report import positive_share, ranking_rows, to_csv, to_npz_bytes
from attribution.run_options import RunOptions, run_options


def _dataset(n=5):
    return ImageDataset("toy", "train", np.zeros((n, 4, 4, 1), np.uint8), np.arange(n) % 2, ["even", "odd"],
                        np.arange(n))


def test_ranking_rows_sorted_with_labels():
    scores = np.array([0.1, -0.5, 0.9, 0.0, 0.3])
    rows = ranking_rows(scores, _dataset())
    assert [r["index"] for r in rows] == [2, 4, 0, 3, 1]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["label"] == "even" and rows[1]["label"] == "even" and rows[-1]["label"] == "odd"
    csv_text = to_csv(rows)
    assert csv_text.splitlines()[0] == "rank,index,label,score"
    assert csv_text.splitlines()[1].startswith("1,2,even,0.9")


def test_positive_share():
    scores = np.array([3.0, 1.0, -2.0, 0.0, 1.0])
    assert positive_share(scores, 1) == 3.0 / 5.0
    assert positive_share(scores, 10) == 1.0
    assert positive_share(-np.ones(3), 2) == 0.0


def test_npz_bytes_round_trip():
    raw = to_npz_bytes(scores=np.arange(6, dtype=np.float32).reshape(2, 3))
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["scores"], np.arange(6).reshape(2, 3))


def test_equivalent_cli_parses_back_to_the_same_options():
    cfg = FeatureConfig(fn="interp", eta=0.25, timesteps=7, strategy="cumulative", proj_dim=1024, projector="sjlt",
                        seed=3)
    opts = RunOptions("digits@epoch-24", None, "dtrak", "interp", 0.25, 7, "cumulative", proj_dim=1024,
                      projector="auto", seed=3)
    line = opts.command_line("score", cfg, "digits", [("--target", "gen:5"), ("--lambda", 0.125), ("--top", 4)])
    argv = shlex.split(line)[3:]  # drop "python -m attribution"
    args = build_parser().parse_args(argv)
    assert (args.command, args.checkpoint, args.dataset, args.method) == ("score", "digits@epoch-24", "digits",
                                                                          "dtrak")
    assert (args.fn, args.eta, args.timesteps, args.strategy, args.proj_dim, args.projector, args.seed) == (
        "interp", 0.25, 7, "cumulative", 1024, "sjlt", 3)  # what was computed: the projector "auto" chose
    assert (args.target, args.lam, args.top) == ("gen:5", 0.125, 4)
    assert run_options(args) == replace(opts, dataset="digits", projector="sjlt")


def test_equivalent_cli_of_a_similarity_baseline_has_no_gradient_options():
    opts = RunOptions("digits", None, "clip-cos", clip_weights="w.pt")
    line = opts.command_line("score", FeatureConfig(kind="clip", clip_weights="w.pt"), "digits",
                             [("--target", "val:1")])
    assert line == ("python -m attribution score --checkpoint digits --dataset digits --method clip-cos "
                    "--clip-model ViT-B-32 --clip-weights w.pt --target val:1")


def test_grid_image_layout():
    pixels = np.stack([np.full((2, 3, 1), 10 * i, np.uint8) for i in range(5)])
    img = np.asarray(grid_image(pixels, scale=1, pad=1))
    # ceil(sqrt(5)) = 3 columns, 2 rows: height 2*(2+1)+1, width 3*(3+1)+1
    assert img.shape == (7, 13)
    assert img[1, 1] == 0 and img[1, 5] == 10 and img[4, 1] == 30 and img[4, 9] == 255  # empty cell stays white


def test_exports_carry_their_metadata_and_distinct_names():
    from attribution.report import export_metadata, export_name

    cfg = FeatureConfig(fn="square", timesteps=10, proj_dim=4096, projector="sjlt")
    meta = export_metadata("gen:0", "dtrak", 0.0123, "runs/digits/epoch-24", "digits", cfg)
    rows = ranking_rows(np.array([0.1, -0.5, 0.9]), _dataset(3), meta)
    lines = to_csv(rows).splitlines()
    assert lines[0] == "rank,index,label,score,target,method,lambda,checkpoint,dataset,features"
    assert lines[1] == f"1,2,even,0.9,gen:0,dtrak,0.0123,runs/digits/epoch-24,digits,{cfg.slug()}"
    name = export_name("scores", meta, "csv")
    assert name == f"scores_gen-0_dtrak_lam0.0123_digits-epoch-24_{cfg.slug()}.csv"
    variants = [export_metadata("gen:1", "dtrak", 0.0123, "runs/digits/epoch-24", "digits", cfg),
                export_metadata("gen:0", "trak", 0.0123, "runs/digits/epoch-24", "digits", cfg),
                export_metadata("gen:0", "dtrak", 0.5, "runs/digits/epoch-24", "digits", cfg),
                export_metadata("gen:0", "dtrak", 0.0123, "runs/digits/epoch-12", "digits", cfg),
                export_metadata("gen:0", "dtrak", 0.0123, "runs/digits/epoch-24", "digits",
                                FeatureConfig(fn="square", timesteps=5, proj_dim=4096, projector="sjlt"))]
    names = {name} | {export_name("scores", m, "csv") for m in variants}
    assert len(names) == 6
    assert export_name("self-influence", export_metadata(None, "grad-dot", None, "digits", "digits", cfg),
                       "csv") == f"self-influence_grad-dot_digits_{cfg.slug()}.csv"


def test_out_follows_the_extension_or_refuses(tmp_path):
    import pytest

    from attribution.errors import ConfigError
    from attribution.report import export_metadata, write_scores

    cfg = FeatureConfig()
    scores = np.array([[0.1, -0.5, 0.9], [0.2, 0.0, -0.1]])  # float64, as the methods return
    metas = [export_metadata(t, "dtrak", 0.5, "digits", "toy", cfg) for t in ("val:0", "val:1")]
    write_scores(str(tmp_path / "s.npy"), scores, _dataset(3), metas)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), scores.astype(np.float32))
    write_scores(str(tmp_path / "s.csv"), scores, _dataset(3), metas)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("rank,index,label,score,target,")
    assert lines[1].startswith("1,2,even,0.9") and ",val:0," in lines[1] and ",val:1," in lines[4]
    write_scores(str(tmp_path / "s.npz"), scores, _dataset(3), metas)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["scores"], scores.astype(np.float32))
        assert z["target"].tolist() == ["val:0", "val:1"] and z["method"].tolist() == ["dtrak"] * 2
        assert z["lambda"].dtype == np.float64 and z["lambda"].tolist() == [0.5, 0.5]  # a number, not text
    write_scores(str(tmp_path / "none.npz"), scores[:1], _dataset(3),
                 [export_metadata("val:0", "pixel-cos", None, "digits", "toy", cfg)])
    with np.load(tmp_path / "none.npz", allow_pickle=False) as z:
        assert np.isnan(z["lambda"]).all()  # a method without λ
    for bad in ("s.txt", "s", "s.json"):
        with pytest.raises(ConfigError, match="unknown file type") as exc:
            write_scores(str(tmp_path / bad), scores, _dataset(3), metas)
        assert "\n" not in str(exc.value) and not (tmp_path / bad).exists()
