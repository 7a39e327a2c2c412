"""Shared fixtures for the test suite.

- `fake_bank_dir`: a ground-truth bank made by hand around the tiny model (planted linear F; no retraining), on the
  digits 0 and 1 (`FAKE_BANK_DATASET`).
- `tiny_clip_name`: a tiny open_clip architecture (random weights) for the CLIP baselines.
- `start_app`: the Streamlit app (AppTest) after its first run, with the checkpoint, feature cache and banks a test
  names in the environment.
- `tiny_run`: a training-run folder (preset "tiny", 2 epochs on the digits training split, checkpoints at
  epochs 1 and 2), trained once per session in a temporary folder. About 5 s on two CPU cores.
- `model`, `digits`, `digits_val`: the randomly initialised tiny UNet (engine_support.tiny_model(0), one per module:
  tests may train it) and the digits training and validation splits. Modules that mean another model by `model`
  (a trained run's) define their own fixture of that name, which takes precedence in that module.
- `npz12`: the first 12 digits training images as an .npz file (and the next 4 as `<name>_val.npz` beside it).

Everything is written under pytest's temporary folders, never into the working tree. `./run.sh test` runs the
suite in several processes (pytest-xdist, a module's tests in one); the modules that start Ray take turns
(`one_ray_module_at_a_time`).
"""

from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported anywhere: the reference machine has 2 cores, and one thread keeps runs reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No preparation for class at a test server's first run (app.py): tests that want it set ATTRIBUTION_PREPARE=1.
os.environ.setdefault("ATTRIBUTION_PREPARE", "0")

import numpy as np
import pytest
from engine_support import FAKE_BANK_DATASET

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def model():
    from engine_support import tiny_model

    return tiny_model(0)


@pytest.fixture(scope="session")
def digits():
    from attribution.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_val():
    from attribution.data import load_dataset

    return load_dataset("digits", "val")


@pytest.fixture(scope="session")
def npz12(tmp_path_factory, digits) -> Path:
    path = tmp_path_factory.mktemp("npz12") / "d12.npz"
    np.savez(path, images=digits.pixels[:12, ..., 0], labels=digits.labels[:12])
    np.savez(path.with_name("d12_val.npz"), images=digits.pixels[12:16, ..., 0], labels=digits.labels[12:16])
    return path


@pytest.fixture
def start_app(monkeypatch):
    """`start_app(checkpoint, cache, banks=None, dataset="digits", timeout=120)`: AppTest of app.py after its first
    run, with ATTRIBUTION_CHECKPOINT / _CACHE / _DATASET (and _BANKS) set for this test only."""
    from streamlit.testing.v1 import AppTest

    def start(checkpoint, cache, banks=None, dataset: str = "digits", timeout: int = 120) -> AppTest:
        env = {"ATTRIBUTION_CHECKPOINT": checkpoint, "ATTRIBUTION_CACHE": cache, "ATTRIBUTION_DATASET": dataset}
        if banks is not None:
            env["ATTRIBUTION_BANKS"] = banks
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        return AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=timeout).run()

    return start


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder: run.json, epoch-1/ and epoch-2/ (DDPMPipeline folders), tiny UNet, digits, seed 0."""
    from attribution.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = TrainConfig(dataset="digits", out=str(out), epochs=2, checkpoints=2, preset="tiny", batch_size=128,
                      seed=0, device="cpu")
    return train(cfg)


@pytest.fixture(scope="session")
def fake_bank_dir(tiny_run, tmp_path_factory) -> Path:
    """A ground-truth bank made by hand (no retraining; tests/evaluation/test_evaluation.py says how): banks/fake/
    under a temporary folder, with the true per-image effects in effect.npy."""
    import json
    import shutil

    import numpy as np

    from attribution.data import load_dataset
    from attribution.models import load_model
    from attribution.sampling import sample

    folder = tmp_path_factory.mktemp("banks") / "fake"
    shutil.copytree(tiny_run / "epoch-2", folder / "model")
    model = load_model(str(folder / "model"), "cpu")
    val = load_dataset(FAKE_BANK_DATASET, "val", model.resolution, model.channels)
    gen = sample(model, 2, 0, steps=3)
    images = np.concatenate([val.tensors(list(range(4))).numpy(), gen.final]).astype(np.float32)
    keys = [f"val/{i}" for i in range(4)] + ["gen/0", "gen/1"]
    rng = np.random.default_rng(0)
    N = len(load_dataset(FAKE_BANK_DATASET))
    masks = rng.random((16, N)) < 0.5
    effect = rng.normal(size=(N, len(keys)))  # the true effect of each image on each target's loss
    F = (masks @ effect)[:, None, None, :] + rng.normal(scale=0.5, size=(16, 2, 2, len(keys)))
    (folder / "outputs").mkdir()
    for j in range(16):
        for s in range(2):
            np.savez(folder / "outputs" / f"subset-{j:03d}-seed-{s}.npz", F=F[j, s], targets_hash=np.array("t"))
    np.save(folder / "masks.npy", masks)
    np.savez(folder / "targets.npz", images=images, keys=np.array(keys))
    meta = {"name": "fake", "dataset": FAKE_BANK_DATASET, "seeds": [0, 1], "noise_sets": 2, "targets_hash": "t",
            "status": "complete", "recipe_name": "tiny", "alpha": 0.5, "timesteps": [0, 500],
            "identity": {"recipe_key": "x", "gen_steps": 3}}
    (folder / "bank.json").write_text(json.dumps(meta))
    np.save(folder / "effect.npy", effect)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    """A tiny open_clip architecture registered for the tests (randomly initialised: no CLIP weights exist
    offline); save one with `ClipEmbedder.random(tiny_clip_name)` to get a local weights file."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("clip_cfg")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (folder / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "tiny-clip-test"


# Test modules that start Ray (a local Ray in this process, a `--ray` command, a bank built on Ray, an app server
# with RAY_ADDRESS): `./run.sh test` runs the suite in several processes (pytest-xdist, `--dist loadfile`: a
# module's tests in one process, so its module fixtures are built once), and these modules take turns rather than
# start two Rays at once.
RAY_MODULES = {"test_ray_app.py", "test_counterfactual.py", "test_evaluation_bank.py", "test_latent_sd.py",
               "test_ray_featurize.py", "test_ray_on_cluster.py"}


@pytest.fixture(scope="module", autouse=True)
def one_ray_module_at_a_time(request, tmp_path_factory):
    """Holds a lock shared by the test processes of this run for the length of a module that starts Ray."""
    if Path(request.module.__file__).name not in RAY_MODULES:
        yield
        return
    import fcntl

    # the parent of this process's temporary folder: the run's, shared by its workers (without xdist, the user's)
    lock = tmp_path_factory.getbasetemp().parent / "ray-modules.lock"
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
