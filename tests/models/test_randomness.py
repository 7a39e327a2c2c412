"""Where a training run's random draws come from (`TrainConfig.randomness`): common random numbers (`crn`) against
the single stream (`stream`) every run before them used.

- an image's draws (timestep, noise, flip, and its place among the other images present) do not depend on which
  other images a CRN run trains on: checked on the draw functions directly and on recorded training timesteps;
- a CRN run on the unchanged full split reproduces itself bit for bit;
- two models trained on subsets that differ by one image are much closer, in weights and in a bank's F, under CRN
  than under the stream (the distances are printed: `pytest -s`);
- the stream is what train.py did before CRN existed: a copy of that loop gives the same bits, and the shipped
  `digits` bank's recipe key (which names its retrained models in cache/) is unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attribution.data import load_dataset
from attribution.errors import ConfigError
from attribution.evaluation.bank import simple_loss_outputs
from attribution.evaluation.recipes import RECIPES
from attribution.models import load_model
from attribution.train import (CrnDraws, CrnSlotDraws, StreamDraws, TrainConfig, _model_and_data, crn_order,
                               image_draws, lr_lambda, subset_indices, train)

N_DIGITS = 1618
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny(out, randomness: str, indices=None, seed: int = 0, epochs: int = 2, **kw) -> TrainConfig:
    return TrainConfig(dataset="digits", out=str(out), epochs=epochs, preset="tiny", batch_size=32, checkpoints=1,
                       indices=indices, seed=seed, device="cpu", randomness=randomness, **kw)


def weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"epoch-{epoch}" / WEIGHTS))


def timesteps(run: Path, epoch: int) -> np.ndarray:
    return np.load(run / f"epoch-{epoch}" / "training_timesteps.npy")


def weight_distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


# -- the draws -----------------------------------------------------------------------------------------------------

def test_an_images_draws_do_not_depend_on_the_other_images():
    """Image i's timestep, noise and flip, and its order among the images present, are the same whichever subset
    it is trained in; they differ between images and between epochs."""
    rng = np.random.default_rng(0)
    big = np.sort(rng.choice(N_DIGITS, 400, replace=False))
    small = np.sort(np.setdiff1d(big, rng.choice(big, 150, replace=False)))  # a subset of big
    other = np.sort(rng.choice(N_DIGITS, 300, replace=False))  # overlaps both partly
    runs = {name: CrnDraws(7, idx, N_DIGITS) for name, idx in [("big", big), ("small", small), ("other", other)]}
    idx = {"big": big, "small": small, "other": other}
    for epoch in (1, 2):
        full = crn_order(7, epoch, N_DIGITS)
        drawn = {}
        for name, draws in runs.items():
            order = idx[name][draws.order(epoch).numpy()]  # full-split indices in training order
            assert sorted(order.tolist()) == idx[name].tolist()  # every image once
            # the full split's permutation restricted to the images present
            assert order.tolist() == [i for i in full.tolist() if i in set(idx[name].tolist())]
            rows = torch.arange(len(idx[name]))
            t, eps, flip = draws.batch(epoch, rows, 1000, (1, 16, 16), True)
            drawn[name] = {int(i): (int(t[r]), eps[r], bool(flip[r])) for r, i in enumerate(idx[name])}
        for a, b in [("big", "small"), ("big", "other"), ("small", "other")]:
            shared = sorted(set(drawn[a]) & set(drawn[b]))
            assert len(shared) > 20
            for i in shared:
                assert drawn[a][i][0] == drawn[b][i][0] and drawn[a][i][2] == drawn[b][i][2]
                assert torch.equal(drawn[a][i][1], drawn[b][i][1])
        # and the same as the draw function gives for that image alone
        i = int(small[3])
        t, eps, flip = image_draws(7, epoch, i, 1000, (1, 16, 16), True)
        assert (t, flip) == (drawn["small"][i][0], drawn["small"][i][2]) and torch.equal(eps, drawn["small"][i][1])
    # draws differ between images, epochs and seeds (a constant or a shared generator would not)
    ts = [image_draws(7, 1, i, 1000, (1, 16, 16), True)[0] for i in range(200)]
    assert len(set(ts)) > 150
    assert not torch.equal(image_draws(7, 1, 5, 1000, (4,), False)[1], image_draws(7, 2, 5, 1000, (4,), False)[1])
    assert not torch.equal(image_draws(7, 1, 5, 1000, (4,), False)[1], image_draws(8, 1, 5, 1000, (4,), False)[1])
    assert not torch.equal(crn_order(7, 1, 50), crn_order(7, 2, 50))
    flips = [image_draws(7, 1, i, 1000, (1,), True)[2] for i in range(200)]
    assert 60 < sum(flips) < 140


def test_stream_draws_are_the_single_stream_of_before():
    """StreamDraws consumes one generator in the old loop's order: the epoch's permutation, then per batch the
    timesteps, the noises and the flips."""
    draws = StreamDraws(3, np.arange(10, 60), N_DIGITS)
    gen = torch.Generator().manual_seed(3)
    for epoch in (1, 2):
        perm = torch.randperm(50, generator=gen)
        assert torch.equal(draws.order(epoch), perm)
        for b in range(0, 50, 16):
            bi = perm[b:b + 16]
            t, eps, mask = draws.batch(epoch, bi, 1000, (1, 16, 16), True)
            assert torch.equal(t, torch.randint(0, 1000, (len(bi),), generator=gen))
            assert torch.equal(eps, torch.randn((len(bi), 1, 16, 16), generator=gen))
            assert torch.equal(mask, torch.rand(len(bi), generator=gen) < 0.5)


def test_bad_randomness_is_one_line(tmp_path, tiny_run, capsys):
    from attribution.cli import main

    with pytest.raises(ConfigError, match="--randomness must be one of crn, crn-slots, stream") as exc:
        tiny(tmp_path, "fixed")
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="--randomness"):
        replace(RECIPES["tiny-test"], randomness="CRN")
    for cmd in (["train", "--dataset", "digits", "--preset", "tiny", "--out", str(tmp_path / "run")],
                ["bank", "build", "--name", "b", "--recipe", "tiny-test", "--out", str(tmp_path / "bank")],
                ["counterfactual", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "study")]):
        assert main(cmd + ["--randomness", "fixed"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --randomness must be one of crn, crn-slots, stream, got 'fixed'", err
    assert not list(tmp_path.iterdir())


# -- whole runs ----------------------------------------------------------------------------------------------------

def old_stream_train(cfg: TrainConfig) -> tuple[dict, np.ndarray]:
    """The training loop of train.py before CRN existed (one generator for everything), without its bookkeeping:
    (final weights, the last epoch's training timesteps)."""
    torch.manual_seed(cfg.seed)
    model, data = _model_and_data(cfg, torch.device("cpu"))
    idx = subset_indices(cfg, len(data))
    x_all = data.tensors(idx)
    n = len(x_all)
    keys = np.array([f"train/{i}" for i in idx])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, int(cfg.warmup_fraction * total))))
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        epoch_t = torch.empty(n, dtype=torch.long)
        for b in range(steps_per_epoch):
            bi = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x0 = x_all[bi]
            t = torch.randint(0, model.num_timesteps, (len(bi),), generator=gen)
            eps = torch.randn((len(bi), *model.latent_shape), generator=gen)
            if cfg.flip:
                mask = torch.rand(len(bi), generator=gen) < 0.5
                x0 = torch.where(mask[:, None, None, None], x0.flip(-1), x0)
            epoch_t[bi] = t
            loss = model.training_loss(x0, eps, t, model.condition(keys[bi.tolist()]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}, epoch_t.numpy()


def test_stream_training_is_unchanged(tmp_path):
    """The stream mode against a copy of the old loop, in this process, with flips on (bit for bit), and the
    shipped digits bank's recipe key (its retrained models in cache/ are keyed by it)."""
    cfg = tiny(tmp_path / "new", "stream", indices=list(range(100, 200)), seed=4, flip=True)
    run = train(cfg)
    old_w, old_t = old_stream_train(cfg)
    new_w = weights(run, 2)
    assert new_w.keys() == old_w.keys() and all(torch.equal(new_w[k], old_w[k]) for k in old_w)
    assert np.array_equal(timesteps(run, 2), old_t)
    assert json.loads((run / "run.json").read_text())["config"]["randomness"] == "stream"
    bank = json.loads((REPO_ROOT / "banks" / "digits" / "bank.json").read_text())["identity"]
    recipe = RECIPES["digits-eval"]
    assert recipe.randomness == "stream" and "randomness" not in recipe.identity()
    assert recipe.key(bank["dataset_hash"]) == bank["recipe_key"] == "5168f50fd8b8aabb"
    crn = replace(recipe, randomness="crn")
    assert crn.identity()["randomness"] == "crn" and crn.key(bank["dataset_hash"]) != bank["recipe_key"]


@pytest.mark.slow
def test_crn_run_reproduces_itself_and_records_its_timesteps(tmp_path):
    """CRN on the unchanged full split, given as no index file and as every index: the same bits; the recorded
    training timesteps are each image's own draw of that epoch."""
    a = train(tiny(tmp_path / "a", "crn", epochs=1))
    b = train(tiny(tmp_path / "b", "crn", indices=list(range(N_DIGITS)), epochs=1))
    wa, wb = weights(a, 1), weights(b, 1)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert np.array_equal(timesteps(a, 1), timesteps(b, 1))
    want = [image_draws(0, 1, i, 1000, (1, 16, 16), False)[0] for i in range(N_DIGITS)]
    assert timesteps(a, 1).tolist() == want
    assert json.loads((a / "run.json").read_text())["config"]["randomness"] == "crn"
    # a stream run of the same seed is another model
    s = train(tiny(tmp_path / "s", "stream", epochs=1))
    assert not all(torch.equal(wa[k], v) for k, v in weights(s, 1).items())


def test_crn_slots_keep_the_full_runs_batches(tmp_path):
    """crn-slots: a subset's batches are the full run's batches with the absent images left out, so every run takes
    the full run's steps and an image meets the same batch mates in every run that holds them; under crn a half
    subset is re-batched (about half the steps, other mates)."""
    rng = np.random.default_rng(5)
    half = np.sort(rng.choice(N_DIGITS, N_DIGITS // 2, replace=False))
    full_slots, half_slots = CrnSlotDraws(3, np.arange(N_DIGITS), N_DIGITS), CrnSlotDraws(3, half, N_DIGITS)
    for epoch in (1, 2):
        fb, hb = full_slots.batches(epoch, 64), half_slots.batches(epoch, 64)
        assert len(fb) == len(hb) == math.ceil(N_DIGITS / 64)
        assert [set(half[b].tolist()) for b in hb] == [set(b.tolist()) & set(half.tolist()) for b in fb]
        # the full run's slots are crn's full-split batches: same order, same cuts
        crn = CrnDraws(3, np.arange(N_DIGITS), N_DIGITS).batches(epoch, 64)
        assert all(torch.equal(a, b) for a, b in zip(fb, crn))
    assert len(CrnDraws(3, half, N_DIGITS).batches(1, 64)) == math.ceil(len(half) / 64)
    # training: a subset of 40 images keeps the full run's schedule of 51 batches of 32 an epoch (most of them empty
    # here, and skipped); the run records it
    run = train(tiny(tmp_path / "slots", "crn-slots", indices=list(range(40)), epochs=1))
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["randomness"] == "crn-slots" and meta["checkpoints"][0]["step"] == math.ceil(N_DIGITS / 32)
    assert timesteps(run, 1).tolist() == [image_draws(0, 1, i, 1000, (1, 16, 16), False)[0] for i in range(40)]


@pytest.mark.slow
def test_one_image_removed_moves_a_crn_model_far_less(tmp_path):
    """Subsets of 256 digits that differ by one image, 3 epochs of 8 steps: under CRN the two models are much
    closer in weights and in F (the Simple loss over timesteps of validation targets, a bank's output) than under
    the stream, where removing the image re-draws everything after it."""
    full = list(range(256))
    minus = [i for i in full if i != 77]
    val = load_dataset("digits", "val")
    images, keys = val.tensors(list(range(16))), [f"val/{i}" for i in range(16)]
    dist = {}
    for mode in ("crn", "stream"):
        runs = [train(tiny(tmp_path / f"{mode}-{k}", mode, indices=idx, epochs=3)) for k, idx in
                [("full", full), ("minus", minus)]]
        w = [weights(r, 3) for r in runs]
        F = [simple_loss_outputs(load_model(str(r), "cpu"), images, keys, k=20, noise_sets=1)[0] for r in runs]
        dist[mode] = (weight_distance(*w), float(np.sqrt(((F[0] - F[1]) ** 2).mean())))
        if mode == "crn":  # every shared image drew the same timestep (the last epoch's, recorded)
            assert np.array_equal(np.delete(timesteps(runs[0], 3), 77), timesteps(runs[1], 3))
    seed_w = weight_distance(weights(tmp_path / "crn-full", 3),
                             weights(train(tiny(tmp_path / "crn-seed1", "crn", indices=full, seed=1, epochs=3)), 3))
    print(f"\none image removed: weight L2 crn {dist['crn'][0]:.4f} vs stream {dist['stream'][0]:.4f}; "
          f"F RMS crn {dist['crn'][1]:.2e} vs stream {dist['stream'][1]:.2e}; another seed (crn) weight L2 "
          f"{seed_w:.4f}")
    assert dist["crn"][0] < 0.3 * dist["stream"][0]
    assert dist["crn"][1] < 0.3 * dist["stream"][1]
    assert dist["crn"][0] > 0  # the removal did change the model
