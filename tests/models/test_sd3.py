"""An SD3-shaped latent flow-matching transformer (attribution/models/sd3.py) on a tiny `StableDiffusion3Pipeline`
folder built here from small configs (random weights; two tiny CLIP text encoders, no T5, SD3's shift-3 scheduler):
it loads through the model registry, its condition is diffusers' own `encode_prompt`, its latents are the VAE's
shifted and scaled mode, its per-sample gradients equal a plain autograd loop through the transformer's forward, and
the command line attributes a generated image against a 12-image set whose prompts the folder records."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from engine_support import one_line

from attribution.data import load_dataset
from attribution.errors import ConfigError
from attribution.features.gradients import GradientSpec, per_sample_gradients
from attribution.features.outputs import output_value
from attribution.features.timesteps import noise_for
from attribution.models import load_model
from attribution.models.latent_sd import PROMPTS_FILE, PromptTable
from attribution.models.sd3 import LatentSD3
from attribution.models.tiny_sd import build_tiny_sd3
from attribution.sampling import Prompt, sample

TEMPLATE = "a handwritten digit {class}"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, npz12):
    train = load_dataset(f"npz:{npz12}")
    folder = build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "model", ["a", "handwritten", "digit"])
    table = PromptTable(TEMPLATE, f"npz:{npz12}", list(train.class_names), {"train": train.labels.tolist()})
    (folder / PROMPTS_FILE).write_text(json.dumps(asdict(table)))
    return folder


@pytest.fixture(scope="module")
def sd3(sd3_folder):
    return load_model(str(sd3_folder), "cpu")


def test_an_sd3_folder_loads_through_the_registry(sd3):
    assert isinstance(sd3, LatentSD3) and sd3.kind == "sd3" and sd3.conditional
    assert sd3.schedule.name == "flow-matching" and sd3.schedule.shift == 3.0
    assert sd3.latent_shape == (4, 8, 8) and (sd3.resolution, sd3.channels) == (16, 3)


def test_latents_are_the_vaes_shifted_scaled_mode(sd3):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mode = sd3.vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(sd3.encode(x), (mode - 0.1) * 1.5)
    with torch.no_grad():
        torch.testing.assert_close(sd3.decode(sd3.encode(x)), sd3.vae.decode(mode).sample, rtol=1e-4, atol=1e-5)


def test_the_output_is_the_transformer_on_diffusers_prompt_embeddings(sd3):
    prompt = "a handwritten digit 5"
    with torch.no_grad():
        states, _, pooled, _ = sd3.pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False)
        x = torch.randn(1, 4, 8, 8)
        t = torch.tensor([700])
        want = sd3.transformer(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled,
                               timestep=sd3.schedule.sigmas()[t] * 1000).sample
        got = sd3.raw(sd3.parameters(), x, t, sd3.prompt_condition([prompt]))
    torch.testing.assert_close(got, want)


def test_sd3_gradients_equal_a_loop_through_the_transformer(sd3, npz12):
    """vmap per-sample gradients of Square against one training image at a time through the transformer's own
    forward, with its recorded prompt embedded by the pipeline and the velocity target written out here."""
    train = load_dataset(f"npz:{npz12}", "train", 16, 3)  # as the model sees it: RGB
    rows = [0, 4]
    x0 = train.tensors(rows)
    keys = [f"train/{i}" for i in rows]
    spec = GradientSpec("simple", (100, 800), draws=1, seed=1)
    ts = torch.tensor(spec.timesteps)
    z0 = sd3.encode(x0)
    noise = noise_for(keys, ts, (4, 8, 8), spec.seed, 1)
    s = sd3.schedule.sigmas()[ts].reshape(-1, 1, 1, 1)
    net = sd3.transformer
    out = []
    for i, r in enumerate(rows):
        prompt = TEMPLATE.replace("{class}", train.class_names[int(train.labels[r])])
        with torch.no_grad():
            states, _, pooled, _ = sd3.pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False)
        with torch.enable_grad():
            ps = [p.requires_grad_(True) for p in net.parameters()]
            v = net(hidden_states=(1 - s) * z0[i] + s * noise[i], encoder_hidden_states=states.expand(2, -1, -1),
                    pooled_projections=pooled.expand(2, -1), timestep=s.flatten() * 1000).sample
            value = output_value("simple", v, noise[i] - z0[i], torch.zeros(2)) / 2
            grads = torch.autograd.grad(value, ps)
            for p in ps:
                p.requires_grad_(False)
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(per_sample_gradients(sd3, x0, keys, spec), torch.stack(out), rtol=1e-4, atol=1e-6)


def test_prompts_are_required_and_guide(sd3):
    with pytest.raises(ConfigError, match="is text-conditional: give a prompt") as exc:
        sample(sd3, 1, steps=2)
    one_line(exc)
    plain = sample(sd3, 1, seed=1, steps=3, prompt=Prompt("a handwritten digit 3", guidance=1.0))
    guided = sample(sd3, 1, seed=1, steps=3, prompt=Prompt("a handwritten digit 3", guidance=4.0))
    assert plain.sampler == "euler" and np.abs(plain.final - guided.final).max() > 1e-4


def test_the_cli_attributes_an_sd3_folder(sd3_folder, npz12, tmp_path, capsys):
    from attribution.cli import main

    common = ["--checkpoint", str(sd3_folder), "--dataset", f"npz:{npz12}", "--timesteps", "1", "--proj-dim", "128",
              "--cache", str(tmp_path / "cache")]
    assert main(["score", *common, "--target", "gen:0", "--prompt", "a handwritten digit 4", "--top", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["proponents"]) == 3 and all(0 <= e["index"] < 12 for e in out["proponents"])
    assert out["target_label"] is None  # free text names no class
    assert main(["score", *common, "--target", "gen:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the libraries' loading progress bars)
    assert err.startswith("error: ") and err.endswith("is text-conditional: give a prompt (--prompt)")
