"""Writes tests/data/adapter_reference.npz: outputs of the shipped digits model and of a short tiny-preset training
run, kept so that tests/models/test_models.py can check that the model adapter changes none of them (within float32
rounding: the file was made on another machine, whose CPU kernels round differently; the test says how far).

The committed .npz was computed with the code of commit c8320f8 (before the adapter became an interface), on the
project's 2-core CPU machine with OMP_NUM_THREADS=1. Rerun only when a result is meant to change:

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/adapter_reference.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]

import numpy as np  # noqa: E402 (OMP_NUM_THREADS is set before torch loads)
import torch  # noqa: E402

OUT = Path(__file__).with_suffix(".npz")
SPEC = "digits"
TRAIN_INDICES = list(range(48))


def reference_features(model, fn: str, timesteps=None) -> np.ndarray:
    """Projected features (4, 64) of train:0-3 at K=2 (or at per-image timesteps), as the engine computes them:
    per-sample gradients over all parameters, then a fixed SJLT projection."""
    from attribution.data import load_dataset
    from attribution.features.gradients import GradientSpec, per_sample_gradients
    from attribution.features.projectors import make_projector

    images = load_dataset("digits", "train", model.resolution, model.channels).tensors([0, 1, 2, 3])
    keys = [f"train/{i}" for i in range(4)]
    g = per_sample_gradients(model, images, keys, GradientSpec(fn, (100, 600), draws=2), timesteps)
    proj = make_projector("sjlt", g.shape[1], 64, 0, model.device)
    return proj.project(g).cpu().numpy()


def reference_forward(model) -> dict[str, np.ndarray]:
    """Journey's forward noising of an image without a trajectory (3 DDPM steps)."""
    from attribution.data import load_dataset
    from attribution.journey import JourneyConfig, forward_trajectory

    image = load_dataset("digits", "train", model.resolution, model.channels).tensors([5])[0]
    traj = forward_trajectory(model, image, JourneyConfig(seed=0, steps=3, every=1), "train/5")
    return {f"forward_{k}": v for k, v in traj.arrays().items()}


def reference_train(tmp: Path, indices: list[int] = TRAIN_INDICES) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    from attribution.train import TrainConfig, train

    cfg = TrainConfig(dataset="digits", out=str(tmp / "run"), epochs=2, checkpoints=1, preset="tiny",
                      batch_size=16, seed=3, device="cpu", indices=indices)
    run = train(cfg)
    state = load_file(str(run / "epoch-2" / "unet" / "diffusion_pytorch_model.safetensors"))
    out = {f"train_w/{k}": v.numpy() for k, v in state.items()}
    out["train_timesteps"] = np.load(run / "epoch-2" / "training_timesteps.npy")
    return out


def main() -> None:
    import tempfile

    from attribution.models import load_model
    from attribution.sampling import sample

    torch.set_num_threads(1)
    model = load_model(SPEC, "cpu")
    arrays: dict[str, np.ndarray] = {}
    arrays["features_square"] = reference_features(model, "square")
    arrays["features_simple"] = reference_features(model, "simple")
    arrays["features_elbo"] = reference_features(model, "elbo")
    arrays["features_square_per_image_t"] = reference_features(model, "square",
                                                               torch.tensor([[5], [250], [500], [990]]))
    for sampler in ("ddpm", "ddim"):
        for k, v in sample(model, 2, 7, steps=3, sampler=sampler).arrays().items():
            arrays[f"sample_{sampler}_{k}"] = v
    arrays.update(reference_forward(model))
    with tempfile.TemporaryDirectory() as tmp:
        arrays.update(reference_train(Path(tmp)))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
