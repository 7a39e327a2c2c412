"""A class-conditional diffusion transformer (attribution/models/dit.py), built from a small config here (random
weights, ~20k parameters, 16x16 digits): a DiTPipeline folder loads through the model registry with either noise
process, its per-sample gradients equal a plain autograd loop through diffusers' own forward with the recorded class
labels, its scores equal the direct dense formula, class names condition sampling (with guidance against the null
class), a learned-variance DiT is attributed on its prediction half, and bad classes are one line, in the library
and on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine_support import keys_for, one_line, rel_err, subset, tiny_dit

from attribution.data import load_dataset
from attribution.engine import Attributor
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientSpec, per_sample_gradients
from attribution.features.outputs import output_value
from attribution.features.timesteps import noise_for
from attribution.methods import get_method
from attribution.models import load_model
from attribution.models.dit import DiT
from attribution.sampling import Prompt, sample


@pytest.fixture(scope="module")
def train24(digits):
    return subset(digits, 24)


@pytest.fixture(scope="module", params=["flow-matching", "ddpm"])
def dit(request, tmp_path_factory, train24, digits_val):
    """A DiT saved as a DiTPipeline folder and loaded back through the registry."""
    folder = tmp_path_factory.mktemp("dit") / "model"
    tiny_dit(request.param, train24, digits_val).save(folder)
    return load_model(str(folder), "cpu")


def test_a_dit_folder_loads_through_the_registry(dit, digits):
    assert isinstance(dit, DiT) and dit.kind == "dit" and dit.conditional and dit.conditioned_on == "class"
    assert dit.classes == list(digits.class_names) and dit.latent_shape == (1, 16, 16) and dit.resolution == 16
    index = json.loads((dit.info.pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["transformer"] == ["diffusers", "DiTTransformer2DModel"]


def test_dit_gradients_equal_a_loop_through_diffusers_forward(dit, train24):
    """vmap per-sample gradients against one image at a time through `DiTTransformer2DModel.forward` with the class
    label of the training image (from the dataset, not the model's table) and the schedule's time input."""
    rows = [0, 7, 13]
    x0, keys = train24.tensors(rows), keys_for("train", rows)
    spec = GradientSpec("simple", (0, 500, 999), draws=1, seed=2)
    ts = torch.tensor(spec.timesteps)
    noise = noise_for(keys, ts, (1, 16, 16), spec.seed, 1)
    net = dit.transformer
    out = []
    for i, r in enumerate(rows):
        x_t = dit.schedule.add_noise(x0[i].expand_as(noise[i]), noise[i], ts)
        labels = torch.full((len(ts),), int(train24.labels[r]))
        with torch.enable_grad():
            ps = [p.requires_grad_(True) for p in net.parameters()]
            pred = net(x_t, dit.schedule.model_time(ts), class_labels=labels).sample
            value = output_value("simple", pred, dit.schedule.prediction_target(x0[i], noise[i], ts),
                                 dit.schedule.elbo_weight(ts)) / len(ts)
            grads = torch.autograd.grad(value, ps)
            for p in ps:
                p.requires_grad_(False)
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(per_sample_gradients(dit, x0, keys, spec), torch.stack(out), rtol=1e-4, atol=1e-6)


def test_dit_scores_equal_the_direct_formula(dit, train24, digits_val, tmp_path):
    att = Attributor(dit, train24, FeatureConfig(fn="square", projector="identity", timesteps=2), cache=tmp_path)
    att.featurize()
    X = per_sample_gradients(dit, train24.tensors(), keys_for("train", range(24)), att.featurizer.grad_spec)
    assert rel_err(np.asarray(att.store.features()), X) < 1e-6
    keys = [f"val/{i}" for i in range(3)]
    G = att.features_of(digits_val.tensors(range(3)), keys)
    X, G = X.double().numpy(), G.astype(np.float64)
    gram = X @ X.T
    lam = 0.1 * np.trace(gram) / 24
    direct = G @ X.T @ np.linalg.solve(gram + lam * np.eye(24), np.eye(24))
    assert rel_err(att.scores(get_method("dtrak"), G, lam), direct) < 1e-4  # float32 kernel factors, as elsewhere


def test_class_names_condition_sampling_with_guidance(dit):
    plain = sample(dit, 1, seed=4, steps=3, prompt=Prompt("3", guidance=1.0))
    other = sample(dit, 1, seed=4, steps=3, prompt=Prompt("8", guidance=1.0))
    guided = sample(dit, 1, seed=4, steps=3, prompt=Prompt("3", guidance=3.0))
    assert np.abs(plain.final - other.final).max() > 1e-4  # the class is an input
    assert np.abs(plain.final - guided.final).max() > 1e-4  # guidance against the null class moves it
    # one guided output by hand: out_null + 3 (out_3 - out_null), at the first step's x_t and time
    x, t = torch.from_numpy(guided.xt[0]), torch.from_numpy(guided.timesteps[:1])
    with torch.no_grad():
        o3 = dit.transformer(x, dit.schedule.model_time(t), class_labels=torch.tensor([3])).sample
        on = dit.transformer(x, dit.schedule.model_time(t), class_labels=torch.tensor([10])).sample
        want = dit.schedule.x0_from_raw(on + 3 * (o3 - on), x, t)
    if dit.schedule.name == "flow-matching":  # diffusers' DDPM step clips x̂0; the flow's is the formula's
        torch.testing.assert_close(torch.from_numpy(guided.x0_pred[0]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt, match", [
    (Prompt("eleven", guidance=1.0), "class 'eleven' is not one of .*'s 10 classes: 0, 1, 2"),
    (None, "give a prompt"),
])
def test_a_bad_class_is_one_line(dit, prompt, match):
    with pytest.raises(ConfigError, match=match) as exc:
        sample(dit, 1, steps=2, prompt=prompt)
    one_line(exc)


def test_a_learned_variance_dit_is_attributed_on_its_prediction(train24):
    """out_channels = 2 x in_channels (the public DiT-XL/2's): the first half is the prediction, the rest is not
    attributed."""
    dit = tiny_dit("ddpm", train24, out_channels=2)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 900])
    cond = dit.condition(["train/0", "train/1"])
    full = dit.transformer(x, t, class_labels=cond["class_labels"]).sample
    assert full.shape[1] == 2
    torch.testing.assert_close(dit.raw(dit.parameters(), x, t, cond), full[:, :1])
    torch.testing.assert_close(dit.forward(x, t, cond), full[:, :1])


def test_the_cli_attributes_a_dit_folder(tmp_path, npz12, capsys):
    from attribution.cli import main

    train = load_dataset(f"npz:{npz12}")
    tiny_dit("flow-matching", train).save(tmp_path / "dit")
    common = ["--checkpoint", str(tmp_path / "dit"), "--dataset", f"npz:{npz12}", "--timesteps", "1", "--proj-dim",
              "128", "--cache", str(tmp_path / "cache")]
    assert main(["score", *common, "--target", "gen:0", "--prompt", "4", "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["proponents"]) == 3 and all(0 <= e["index"] < 12 for e in out["proponents"])
    assert out["target_label"] == "4"  # a class-conditional model's image belongs to the class it was asked for
    assert main(["score", *common, "--target", "gen:0", "--prompt", "four"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: class 'four' is not one of") and "\n" not in err
