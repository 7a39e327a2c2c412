"""Training runs, checkpoints (resolve, save, load, refuse) and generation.

Training and checkpoint I/O are compared bitwise: the same seed on the same machine must give the same bytes.
Sampling across different batch sizes is compared with a tolerance (see `BATCH_ATOL`).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from attribution.errors import AttributionError, CheckpointError, ConfigError
from attribution.models import DEFAULT_SCHEDULE, load_model, resolve_checkpoint, save_checkpoint, unet_for
from attribution.models.checkpoint import load_schedule_config
from attribution.sampling import sample
from attribution.train import TrainConfig, index_hash, train

SUBSET = list(range(64))
WEIGHTS = "diffusion_pytorch_model.safetensors"

# An image's noise comes only from its own seed, but the UNet runs on the whole batch, and CPU convolution
# kernels pick different blockings for different batch sizes, so float32 rounding differs (~1e-7 relative per
# op). 50 DDIM steps amplify that to at most ~1.2e-4 on x_t and the final image (measured on tiny and small
# models). 1e-3 leaves 8x headroom and is still 1/8 of one grey level (2/255 in [-1, 1]), so the images are
# the same picture.
BATCH_ATOL = 1e-3


def assert_one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    assert isinstance(exc_info.value, AttributionError)
    return msg


def train_subset(out, seed=0):
    cfg = TrainConfig(dataset="digits", out=str(out), epochs=2, preset="tiny", checkpoints=2, indices=SUBSET,
                      seed=seed, device="cpu")
    return train(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-epoch runs on 64 digits: seed 0 twice and seed 1 (under a second each)."""
    root = tmp_path_factory.mktemp("runs")
    return {name: train_subset(root / name, seed) for name, seed in [("a", 0), ("b", 0), ("c", 1)]}


# -- training runs ----------------------------------------------------------------------------------------------------

def test_run_folder_layout(runs):
    run = runs["a"]
    assert sorted(p.name for p in run.iterdir()) == ["epoch-1", "epoch-2", "run.json"]  # no stray temporary files
    meta = json.loads((run / "run.json").read_text())
    assert meta["n_train"] == 64 and meta["indices"] == SUBSET
    assert meta["index_set_hash"] == index_hash(SUBSET, 1618)
    assert meta["index_set_hash"] != index_hash(None, 1618)
    assert [c["epoch"] for c in meta["checkpoints"]] == [1, 2]
    assert len(meta["epoch_loss"]) == 2 and all(np.isfinite(meta["epoch_loss"]))
    for epoch in (1, 2):
        ckpt = run / f"epoch-{epoch}"
        for name in ("model_index.json", "unet/config.json", f"unet/{WEIGHTS}", "scheduler/scheduler_config.json"):
            assert (ckpt / name).is_file(), name
        t = np.load(ckpt / "training_timesteps.npy")
        assert t.shape == (64,) and t.min() >= 0 and t.max() < 1000
        assert len(np.unique(t)) > 32  # one uniform draw per image, not a constant
    # Epochs 1 and 2 draw different timesteps and hold different weights.
    assert not np.array_equal(np.load(run / "epoch-1/training_timesteps.npy"),
                              np.load(run / "epoch-2/training_timesteps.npy"))
    assert (run / f"epoch-1/unet/{WEIGHTS}").read_bytes() != (run / f"epoch-2/unet/{WEIGHTS}").read_bytes()


def test_same_seed_same_weights_other_seed_differs(runs):
    for epoch in (1, 2):
        a, b, c = ((runs[k] / f"epoch-{epoch}/unet/{WEIGHTS}").read_bytes() for k in "abc")
        assert a == b
        assert a != c
    assert np.array_equal(np.load(runs["a"] / "epoch-2/training_timesteps.npy"),
                          np.load(runs["b"] / "epoch-2/training_timesteps.npy"))


@pytest.mark.parametrize("kwargs,expected", [({"epochs": 0}, "--epochs"), ({"preset": "huge"}, "unknown preset"),
                                             ({"save_epochs": [3]}, "within 1..2"), ({"lr": 0.0}, "--lr")])
def test_train_config_errors(tmp_path, kwargs, expected):
    with pytest.raises(ConfigError, match=expected) as exc:
        TrainConfig(**{"dataset": "digits", "out": str(tmp_path), "epochs": 2, **kwargs})
    assert_one_line(exc)


def test_train_index_out_of_range(tmp_path):
    cfg = TrainConfig(dataset="digits", out=str(tmp_path / "r"), epochs=1, preset="tiny", indices=[0, 5000],
                      device="cpu")
    with pytest.raises(ConfigError, match="outside 0..1617") as exc:
        train(cfg)
    assert_one_line(exc)
    assert not (tmp_path / "r").exists()


# -- save, load, resolve ----------------------------------------------------------------------------------------------

def fresh_unet(seed=0):
    torch.manual_seed(seed)
    return unet_for(16, 1, "tiny")


def assert_same_weights(model, unet):
    loaded = model.unet.state_dict()
    expected = unet.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_save_load_round_trip(tmp_path):
    unet = fresh_unet()
    save_checkpoint(tmp_path / "ck", unet, DEFAULT_SCHEDULE, {"note": "test"})
    model = load_model(str(tmp_path / "ck"), "cpu")
    assert_same_weights(model, unet)
    assert (model.resolution, model.channels, model.num_timesteps) == (16, 1, 1000)
    assert model.schedule.betas[0].item() == pytest.approx(1e-4)
    assert model.schedule.betas[-1].item() == pytest.approx(0.02)
    first_id = model.identity()
    assert first_id == model.info.content_hash() == load_model(str(tmp_path / "ck"), "cpu").identity()
    save_checkpoint(tmp_path / "ck", fresh_unet(1), DEFAULT_SCHEDULE)  # overwrite in place
    other = load_model(str(tmp_path / "ck"), "cpu")
    assert other.identity() != first_id
    assert_same_weights(other, fresh_unet(1))


def test_resolve_run_epochs(runs):
    run = runs["a"]
    first = resolve_checkpoint(f"{run}@epoch-1")
    assert first.epoch == 1 and first.run_dir == run and first.spec == f"{run}@epoch-1"
    assert first.unet_dir == run / "epoch-1" / "unet"
    assert first.scheduler_config == run / "epoch-1" / "scheduler" / "scheduler_config.json"
    assert first.siblings == [f"{run}@epoch-1", f"{run}@epoch-2"]
    assert first.run_metadata()["n_train"] == 64
    for spec in (str(run), f"{run}@final", f"{run}@epoch2"):
        final = resolve_checkpoint(spec)
        assert final.epoch == 2 and final.unet_dir == run / "epoch-2" / "unet", spec
    assert first.content_hash() != resolve_checkpoint(str(run)).content_hash()
    with pytest.raises(CheckpointError, match="epoch-1, epoch-2") as exc:
        resolve_checkpoint(f"{run}@epoch-3")
    assert_one_line(exc)


def test_resolve_pipeline_folder(runs, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(runs["a"] / "epoch-2", pipe)
    info = resolve_checkpoint(str(pipe))
    assert info.unet_dir == pipe / "unet" and info.scheduler_config == pipe / "scheduler" / "scheduler_config.json"
    assert info.epoch is None and info.run_dir is None and info.siblings == [str(pipe)]
    assert "noise schedule from" in info.schedule_note
    with pytest.raises(CheckpointError, match="single checkpoint") as exc:
        resolve_checkpoint(f"{pipe}@epoch-1")
    assert_one_line(exc)


def make_bare(tmp_path, unet, weights="safetensors"):
    """A bare UNet folder: config.json + weights, nothing else."""
    save_checkpoint(tmp_path / "src", unet, DEFAULT_SCHEDULE)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "src" / "unet" / "config.json", bare / "config.json")
    if weights == "safetensors":
        shutil.copy(tmp_path / "src" / "unet" / WEIGHTS, bare / WEIGHTS)
    return bare


def test_bare_unet_folder_uses_default_schedule_unless_given(tmp_path):
    unet = fresh_unet()
    bare = make_bare(tmp_path, unet)
    info = resolve_checkpoint(str(bare))
    assert info.unet_dir == bare and info.scheduler_config is None
    assert "DDPM default" in info.schedule_note
    assert load_schedule_config(info) == DEFAULT_SCHEDULE
    assert_same_weights(load_model(str(bare), "cpu"), unet)
    sched = dict(DEFAULT_SCHEDULE, beta_end=0.03, num_train_timesteps=500, _class_name="DDPMScheduler")
    (bare / "scheduler_config.json").write_text(json.dumps(sched))
    info = resolve_checkpoint(str(bare))
    assert info.scheduler_config == bare / "scheduler_config.json" and str(bare) in info.schedule_note
    model = load_model(str(bare), "cpu")
    assert model.num_timesteps == 500 and model.schedule.betas[-1].item() == pytest.approx(0.03)


def test_plain_bin_state_dict_loads(tmp_path):
    unet = fresh_unet()
    bare = make_bare(tmp_path, unet, weights=None)
    torch.save(unet.state_dict(), bare / "diffusion_pytorch_model.bin")
    assert_same_weights(load_model(str(bare), "cpu"), unet)


class _Payload:
    """Unpickling this would create a file: weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Custom:
    pass


@pytest.mark.parametrize("payload", ["code", "custom class"])
def test_pickle_with_objects_is_refused(tmp_path, payload):
    unet = fresh_unet()
    bare = make_bare(tmp_path, unet, weights=None)
    marker = tmp_path / "pwned"
    state = dict(unet.state_dict())
    state["extra"] = _Payload(str(marker)) if payload == "code" else _Custom()
    torch.save(state, bare / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True") as exc:
        load_model(str(bare), "cpu")
    assert_one_line(exc)
    assert not marker.exists()


@pytest.mark.parametrize("case,expected", [
    ("missing", "checkpoint not found"),
    ("file", "is a file"),
    ("empty", "missing"),
    ("no weights", "no weights"),
    ("corrupt safetensors", "not a readable safetensors"),
    ("wrong config", "do not match its config.json"),
])
def test_bad_checkpoint_folders(tmp_path, case, expected):
    unet = fresh_unet()
    target = tmp_path / "ck"
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
    elif case != "missing":
        target = make_bare(tmp_path, unet)
        if case == "no weights":
            (target / WEIGHTS).unlink()
        elif case == "corrupt safetensors":
            (target / WEIGHTS).write_bytes(b"\x00" * 64)
        elif case == "wrong config":  # the small preset's config with the tiny preset's weights
            (target / "config.json").write_text(json.dumps(dict(unet_for(16, 1, "small").config), default=list))
    with pytest.raises(CheckpointError, match=expected) as exc:
        load_model(str(target), "cpu")
    assert_one_line(exc)


# -- generation -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(str(tiny_run), "cpu")


def test_sample_is_deterministic(model):
    a, b = sample(model, 3, seed=5), sample(model, 3, seed=5)
    for key, arr in a.arrays().items():
        assert np.array_equal(arr, b.arrays()[key]), key
    assert a.final.shape == (3, 1, 16, 16) and a.xt.shape == (50, 3, 1, 16, 16) == a.x0_pred.shape
    assert a.final.min() >= -1 and a.final.max() <= 1
    assert list(a.seeds) == [5, 6, 7]
    assert len(a.timesteps) == 50 and np.all(np.diff(a.timesteps) < 0)  # high t first
    assert not np.array_equal(a.final[0], a.final[1])
    assert not np.array_equal(sample(model, 1, seed=4).final[0], a.final[0])


def test_image_depends_only_on_its_seed(model):
    batch = sample(model, 3, seed=5)
    for i in range(3):
        single = sample(model, 1, seed=5 + i)
        np.testing.assert_allclose(batch.final[i], single.final[0], atol=BATCH_ATOL, rtol=0)
        np.testing.assert_allclose(batch.xt[:, i], single.xt[:, 0], atol=BATCH_ATOL, rtol=0)


def test_ddim_trajectory_matches_diffusers_loop(model):
    """The same loop written with diffusers' DDIMScheduler directly (eta = 0), on the same noise and batch."""
    from diffusers import DDIMScheduler

    traj = sample(model, 2, seed=11, steps=20, sampler="ddim")
    sched = DDIMScheduler(**DEFAULT_SCHEDULE, clip_sample=True, set_alpha_to_one=False)
    sched.set_timesteps(20)
    x = torch.stack([torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    xts, x0s = [], []
    with torch.no_grad():
        for t in sched.timesteps:
            xts.append(x)
            out = sched.step(model.unet(x, t).sample, t, x)
            x0s.append(out.pred_original_sample)
            x = out.prev_sample
    assert np.array_equal(traj.timesteps, sched.timesteps.numpy())
    # Same kernels on the same batch: equal up to float32 noise; 1e-5 is ~100 ulps at |x| ~ 1.
    np.testing.assert_allclose(traj.xt, torch.stack(xts).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(traj.x0_pred, torch.stack(x0s).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(traj.final, x.clamp(-1, 1).numpy(), atol=1e-5, rtol=0)


def test_ddpm_sampler(model):
    a = sample(model, 2, seed=3, steps=10, sampler="ddpm")
    b = sample(model, 2, seed=3, steps=10, sampler="ddpm")
    assert np.array_equal(a.final, b.final) and a.sampler == "ddpm"
    assert np.isfinite(a.xt).all() and a.final.min() >= -1 and a.final.max() <= 1
    ddim = sample(model, 2, seed=3, steps=10, sampler="ddim")
    assert np.abs(a.final - ddim.final).max() > 0.1  # DDPM adds fresh noise each step: a different image
    single = sample(model, 1, seed=4, steps=10, sampler="ddpm")  # each image's step noise is its own too
    np.testing.assert_allclose(a.final[1], single.final[0], atol=BATCH_ATOL, rtol=0)


@pytest.mark.parametrize("kwargs,expected", [
    ({"n": 0}, "--n must be at least 1"),
    ({"steps": 0}, "--steps must be within 1..1000"),
    ({"steps": 1001}, "--steps must be within 1..1000"),
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
])
def test_sample_bad_options(model, kwargs, expected):
    with pytest.raises(ConfigError, match=expected) as exc:
        sample(model, **{"n": 1, **kwargs})
    assert_one_line(exc)
