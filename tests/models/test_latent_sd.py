"""Latent, text-conditional diffusion with LoRA (models/latent_sd.py), end to end on a tiny Stable-Diffusion-shaped
pipeline built offline (models/tiny_sd.py: random weights, a 30-word tokenizer; nothing is downloaded).

finetune (train-lora) -> featurize -> score -> generate -> journey on 12 digits with class prompts; only the LoRA
weights get gradients; D-TRAK and TRAK scores equal a direct computation (an explicit autograd loop over the LoRA
parameters, then the ridge formula solved directly); a LoRA saved and reloaded gives identical gradients; every bad
input is one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from attribution.cli.main import main
from attribution.errors import CheckpointError, ConfigError
from attribution.models import load_model
from attribution.models.latent_sd import LatentSD
from attribution.models.tiny_sd import TinySDConfig, build_tiny_pipeline

WORDS = ("a", "photo", "of", "digit", "painting")
TEMPLATE = "a photo of digit {class}"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd", WORDS, seed=0)


@pytest.fixture(scope="module")
def lora_run(sd_dir, npz12, tmp_path_factory):
    """`train-lora` through the CLI: rank 2, 2 epochs of 12 images, checkpoints at both epochs."""
    out = tmp_path_factory.mktemp("lora") / "run"
    rc = main(["train-lora", "--pipeline", str(sd_dir), "--dataset", f"npz:{npz12}", "--out", str(out),
               "--rank", "2", "--prompt-template", TEMPLATE, "--epochs", "2", "--batch-size", "6", "--lr", "1e-2",
               "--checkpoints", "2", "--device", "cpu"])
    assert rc == 0
    return out


def test_pipeline_loads_as_latent_conditional_model(sd_dir):
    model = load_model(str(sd_dir), "cpu")
    assert isinstance(model, LatentSD) and model.conditional
    assert model.resolution == 16 and model.channels == 3 and model.latent_shape == (4, 8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    with torch.no_grad():  # encode = the VAE's latent mode x scaling factor, exactly
        direct = model.vae.encode(x).latent_dist.mode() * model.vae.config.scaling_factor
    assert z.shape == (2, 4, 8, 8) and torch.equal(z, direct)
    assert model.decode(z).shape == (2, 3, 16, 16)
    cond = model.prompt_condition(["a photo of digit 3", ""])["encoder_hidden_states"]
    assert cond.shape == (2, 16, 32) and not torch.allclose(cond[0], cond[1])
    assert "no LoRA" in model.describe_parameters()


def test_only_lora_parameters_get_gradients(sd_dir):
    torch.manual_seed(0)
    model = LatentSD.for_finetuning(str(sd_dir), rank=2, device="cpu")
    lora = set(model.trainable_parameters())
    assert lora and all("lora_" in n for n in lora)
    n_lora = sum(p.numel() for p in model.trainable_parameters().values())
    assert n_lora < sum(p.numel() for p in model.unet.parameters()) / 10
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    loss = model.training_loss(x, torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]),
                               model.prompt_condition(["a photo of digit 1"] * 3))
    loss.backward()
    got = {n for n, p in model.unet.named_parameters() if p.grad is not None}
    assert got == lora
    assert all(p.grad is None for p in [*model.vae.parameters(), *model.text_encoder.parameters()])
    assert any(p.grad.abs().sum() > 0 for n, p in model.unet.named_parameters() if "lora_B" in n)


def test_finetune_records_prompts_and_lora(lora_run, sd_dir, npz12):
    meta = json.loads((lora_run / "run.json").read_text())
    assert meta["config"]["pipeline"] == str(sd_dir) and meta["model_kind"] == "latent-sd"
    assert [c["epoch"] for c in meta["checkpoints"]] == [1, 2]
    ckpt = lora_run / "epoch-2"
    assert (ckpt / "unet").is_symlink() and (ckpt / "lora" / "adapter_model.safetensors").is_file()
    model = load_model(str(lora_run), "cpu")
    assert model.spec.endswith("@epoch-2") and model.lora_rank == 2
    labels = np.load(npz12)["labels"]
    assert model.prompt_for("train/4") == f"a photo of digit {labels[4]}"
    val_labels = np.load(str(npz12).replace(".npz", "_val.npz"))["labels"]
    assert model.prompt_for("val/1") == f"a photo of digit {val_labels[1]}"
    assert model.prompt_for("gen/3/p=a photo of digit 7/step500") == "a photo of digit 7"
    # what the sidebar reports ("LoRA (rank R), N parameters attributed", from run.json) is what is attributed
    lora = model.trainable_parameters()
    assert lora and all("lora_" in name for name in lora)
    meta = model.info.run_metadata()
    assert meta["config"]["rank"] == 2 and meta["trained_parameters"] == sum(p.numel() for p in lora.values())
    # the two checkpoints differ only in their LoRA weights, and so in their identity
    assert load_model(f"{lora_run}@epoch-1", "cpu").identity() != model.identity()


def _direct_features(model, att, images, keys):
    """Per-sample gradients by an explicit autograd loop over the LoRA parameters (the UNet's own forward pass, no
    torch.func), projected by the attributor's projector."""
    spec = att.featurizer.grad_spec
    from attribution.features.outputs import output_value
    from attribution.features.timesteps import noise_for

    params = model.trainable_parameters()
    for p in params.values():
        p.requires_grad_(True)
    ts = torch.tensor(spec.timesteps)
    rows = []
    try:
        for x, key in zip(images, keys):
            z0 = model.encode(x[None])
            cond = model.condition([key])
            eps = noise_for([key], ts, tuple(z0.shape[1:]), spec.seed, spec.draws)[0]
            total = [torch.zeros_like(p) for p in params.values()]
            for k, t in enumerate(ts):
                tt = t.reshape(1)
                x_t = model.schedule.add_noise(z0, eps[k:k + 1], tt)
                out = model.unet(x_t, tt, **cond, return_dict=False)[0]
                f = output_value(spec.fn, out, eps[k:k + 1], model.schedule.elbo_weight(tt))
                for acc, g in zip(total, torch.autograd.grad(f, list(params.values()))):
                    acc += g / len(ts)
            rows.append(torch.cat([g.reshape(-1) for g in total]))
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return att.featurizer.projector.project(torch.stack(rows)).cpu().numpy().astype(np.float64)


@pytest.mark.parametrize("name", ["dtrak", "trak"])
def test_scores_match_a_direct_computation(name, lora_run, npz12, tmp_path):
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.sampling import Prompt
    from attribution.targets import resolve_targets

    att_all = open_attribution(RunOptions(str(lora_run), method=name, device="cpu", dataset=f"npz:{npz12}",
                                          timesteps=2, proj_dim=64, cache=str(tmp_path)))
    att = att_all.members[0]
    att_all.featurize()
    prompt = Prompt("a photo of digit 3", guidance=2.0)
    targets = resolve_targets("gen:0", att.model, f"npz:{npz12}", steps=3, prompt=prompt)
    assert targets.keys == ["gen/0/p=a photo of digit 3"]
    scores = att_all.scores(att_all.target_features(targets, cache=str(tmp_path)))
    assert scores.shape == (1, 12) and np.isfinite(scores).all()

    X = _direct_features(att.model, att, att.train.tensors(), [f"train/{i}" for i in range(12)])
    g = _direct_features(att.model, att, targets.images, targets.keys)
    # float32 vmap versus a float32 loop: the same sums in another order (relative differences ~1e-6)
    np.testing.assert_allclose(att.store.features(), X, rtol=1e-4, atol=1e-4 * np.abs(X).max())
    lam = att.resolve_lambda(att_all.method, None)
    direct = g @ np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T)
    np.testing.assert_allclose(scores, direct, rtol=1e-3, atol=1e-3 * np.abs(direct).max())


def test_lora_saved_and_reloaded_gives_identical_gradients(lora_run, npz12, tmp_path):
    from attribution.data import load_dataset
    from attribution.features.gradients import GradientSpec, per_sample_gradients

    model = load_model(str(lora_run), "cpu")
    copy = tmp_path / "again"
    model.save(copy)
    again = load_model(str(copy), "cpu")
    assert again.identity() == model.identity()
    data = load_dataset(f"npz:{npz12}", "train", 16, 3)
    spec = GradientSpec(fn="square", timesteps=(100, 600))
    keys = [f"train/{i}" for i in range(3)]
    a = per_sample_gradients(model, data.tensors([0, 1, 2]), keys, spec)
    b = per_sample_gradients(again, data.tensors([0, 1, 2]), keys, spec)
    assert a.shape[1] == sum(p.numel() for p in model.trainable_parameters().values())
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_generate_and_journey(lora_run, npz12, tmp_path):
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.journey import JourneyConfig, run_journey
    from attribution.sampling import Prompt, sample

    model = load_model(str(lora_run), "cpu")
    p3, p7 = Prompt("a photo of digit 3"), Prompt("a photo of digit 7")
    t3 = sample(model, 2, seed=5, steps=4, sampler="ddim", prompt=p3)
    assert t3.final.shape == (2, 3, 16, 16) and t3.xt.shape == (4, 2, 4, 8, 8) and t3.x0_pred.shape == (4, 2, 3, 16, 16)
    assert not np.allclose(t3.final, sample(model, 2, seed=5, steps=4, sampler="ddim", prompt=p7).final)
    np.testing.assert_array_equal(t3.final, sample(model, 2, seed=5, steps=4, sampler="ddim", prompt=p3).final)
    # guidance 1 is the conditional prediction alone
    one = sample(model, 1, seed=5, steps=2, sampler="ddim", prompt=Prompt(p3.text, guidance=1.0))
    attribution = open_attribution(RunOptions(str(lora_run), method="dtrak", device="cpu", dataset=f"npz:{npz12}",
                                              timesteps=2, proj_dim=64, cache=str(tmp_path)))
    att = attribution.members[0]
    att.featurize()
    cfg = JourneyConfig(seed=5, steps=4, sampler="ddim", every=2, resamples=2, prompt=p3.text)
    journey = run_journey(att, cfg, cache=str(tmp_path))
    assert journey.x0.shape == (2, 3, 16, 16) and journey.xt.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(journey.final, t3.final[0], atol=1e-4)  # batch of 1 vs 2: float32 reordering
    assert journey.features.shape == (2, 64) and np.isfinite(journey.result(attribution).scores).all()
    assert one.final.shape == (1, 3, 16, 16)

    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(lora_run), "--n", "2", "--steps", "2", "--out", str(out),
                 "--prompt", p3.text, "--guidance", "3", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["seed-000000.png", "seed-000001.png"]


# -- bad input: one line each ----------------------------------------------------------------------------------------


def test_missing_component_is_named(sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"vae/ \(AutoencoderKL\) is missing") as exc:
        load_model(str(broken), "cpu")
    assert "\n" not in str(exc.value)


def test_lora_for_another_unet_or_rank(lora_run, sd_dir, tmp_path):
    other = build_tiny_pipeline(tmp_path / "other", WORDS, TinySDConfig(unet_channels=(32, 64)), seed=1)
    shutil.copytree(lora_run / "epoch-2" / "lora", other / "lora")  # a LoRA made for the (16, 32) UNet
    with pytest.raises(CheckpointError, match="do not fit this UNet") as exc:
        load_model(str(other), "cpu")
    assert "\n" not in str(exc.value)
    wrong_rank = tmp_path / "rank"
    shutil.copytree(sd_dir, wrong_rank)
    shutil.copytree(lora_run / "epoch-2" / "lora", wrong_rank / "lora")
    cfg = json.loads((wrong_rank / "lora" / "adapter_config.json").read_text())
    (wrong_rank / "lora" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(CheckpointError, match="another shape or rank") as exc:
        load_model(str(wrong_rank), "cpu")
    assert "\n" not in str(exc.value)


def test_prompt_errors(sd_dir, tmp_path, capsys):
    from attribution.sampling import Prompt, sample

    model = load_model(str(sd_dir), "cpu")
    with pytest.raises(ConfigError, match="give a prompt"):
        sample(model, 1, steps=2)
    with pytest.raises(ConfigError, match="prompt is empty"):
        sample(model, 1, steps=2, prompt=Prompt("  "))
    with pytest.raises(ConfigError, match="prompt is empty"):
        model.condition(["gen/0/p="])
    with pytest.raises(ConfigError, match="at least 1"):
        sample(model, 1, steps=2, prompt=Prompt("a photo", guidance=0.5))
    with pytest.raises(ConfigError, match="no prompt table"):
        model.condition(["train/0"])
    assert main(["generate", "--checkpoint", str(sd_dir), "--n", "1", "--steps", "2", "--out", str(tmp_path / "g"),
                 "--prompt", "a photo", "--guidance", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the guidance scale must be at least 1")
    long = " ".join(["photo"] * 20)  # 22 tokens with the start and end tokens; the tokenizer takes 16
    cond = model.prompt_condition([long])["encoder_hidden_states"]
    assert cond.shape == (1, 16, 32)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "22 tokens" in lines[0] and "truncated" in lines[0]
    model.prompt_condition([long])  # cached: said once
    assert "warning" not in capsys.readouterr().err


def test_unconditional_model_refuses_a_prompt(tiny_run):
    from attribution.sampling import Prompt, sample

    with pytest.raises(ConfigError, match="is not conditional: drop the prompt"):
        sample(load_model(str(tiny_run), "cpu"), 1, steps=2, prompt=Prompt("a cat"))


def test_shipped_latent_model_is_complete():
    """The shipped `digits-latent`: a LoRA run over a base pipeline in the repository, small, with every
    finetuning image's prompt (the sample quality and attribution figures are in BENCHMARKS.md, not asserted)."""
    from attribution.models import list_shipped, resolve_checkpoint

    info = resolve_checkpoint("digits-latent")
    assert len(info.siblings) == 4 and "digits-latent" in list_shipped()
    model = load_model("digits-latent", "cpu")
    assert isinstance(model, LatentSD) and model.lora_rank == 8 and model.resolution == 16
    assert model.prompts.dataset == "digits:5,6,7,8,9" and len(model.prompts.labels["train"]) == 807
    first = model.prompts.classes[model.prompts.labels["train"][0]]
    assert model.prompt_for("train/0") == f"a handwritten digit {first}"
    weights = [p for p in (info.pipeline_dir.resolve().parent / "base").rglob("*.safetensors")]
    assert weights and all(p.stat().st_size < 4 * 2**20 for p in weights)


def test_checkpoint_methods_run_over_the_lora_checkpoints(lora_run, npz12, tmp_path):
    """TracIn over the two LoRA checkpoints of the run (each training image at its recorded training timestep)."""
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.targets import resolve_targets

    att = open_attribution(RunOptions(str(lora_run), method="tracin", device="cpu", dataset=f"npz:{npz12}",
                                      timesteps=2, proj_dim=64, cache=str(tmp_path)))
    assert [m.model.spec.rsplit("@", 1)[1] for m in att.members] == ["epoch-1", "epoch-2"]
    targets = resolve_targets("train:3", att.target_model, f"npz:{npz12}")
    result = att.run(targets, cache=str(tmp_path))
    assert result.scores.shape == (1, 12) and np.isfinite(result.scores).all()
    assert result.scores[0, 3] > 0  # a training image pushes the model toward itself


def test_generate_page_on_the_shipped_latent_model(start_app, tmp_path):
    """The Generate page of a text-conditional model takes a prompt and a guidance scale, and its images are the
    library's samples for that prompt (uint8 pixels equal); the sidebar names the LoRA parameters attributed."""
    from attribution.data.images import tensor_to_pixels
    from app_pages._prompt import demo_of
    from attribution.sampling import Prompt, sample

    at = start_app("digits-latent", tmp_path / "cache", dataset="digits")
    at.switch_page("app_pages/generate.py").run()
    assert not at.exception, at.exception
    sidebar = [e.value for e in list(at.sidebar.caption) + list(at.sidebar.markdown)]
    assert any("LoRA (rank 8)" in v and "parameters" in v for v in sidebar), sidebar
    at.number_input(key="gen_n").set_value(2)
    at.number_input(key="gen_steps").set_value(4)
    at.text_input(key="gen_prompt").set_value("a handwritten digit 7")
    at.number_input(key="gen_guidance").set_value(3.0)
    at.button[0].click().run()  # the form's Generate button
    assert not at.exception, at.exception
    shown = at.session_state["generated"]
    assert shown["prompt"] == {"prompt": "a handwritten digit 7", "negative": "", "guidance": 3.0}
    assert shown["seeds"][0] == demo_of(load_model("digits-latent", "cpu")).seed  # the page opens on the demo seed
    expected = sample(load_model("digits-latent", "cpu"), 2, shown["seeds"][0], steps=4,
                      prompt=Prompt("a handwritten digit 7", "", 3.0))
    np.testing.assert_array_equal(shown["pixels"], tensor_to_pixels(torch.from_numpy(expected.final)))
    assert any("--prompt 'a handwritten digit 7' --guidance 3" in c.value for c in at.code)


@pytest.mark.slow
def test_bank_of_a_lora_run_measures_f_with_prompts(lora_run, sd_dir, tmp_path):
    """`bank build --run` on a LoRA run: subset finetunes on Ray, generated targets from the class prompts (keys
    carry them), the bank's model shares the base pipeline through links, and F equals a direct per-target,
    per-timestep computation in latent space with each target's prompt (a wrong prompt gives another F)."""
    from attribution.evaluation.bank import Bank, BankSpec, build_bank, f_timesteps, simple_loss_outputs
    from attribution.evaluation.evaluate import bank_targets
    from attribution.sampling import Prompt
    from attribution.evaluation.recipes import recipe_from_run
    from attribution.features.timesteps import noise_for
    from attribution.models.adapter import key_prompt, prompt_key

    spec = BankSpec(name="lat", recipe=recipe_from_run(lora_run), out=str(tmp_path / "bank"), subsets=2, seeds=1,
                    val_targets=2, gen_targets=4, gen_steps=2, noise_sets=1, timesteps=3, full_model=str(lora_run),
                    guidance=2.0)
    folder = build_bank(spec, num_cpus=2, log=lambda m: None, cache_root=str(tmp_path / "cache"))
    bank = Bank.load(folder)
    assert bank.meta["status"] == "complete" and np.isfinite(bank.F).all()
    prompts = [TEMPLATE.replace("{class}", str(c)) for c in range(10)]
    assert list(bank.target_keys) == ["val/0", "val/1", prompt_key("gen/0", prompts[0]),
                                      prompt_key("gen/1", prompts[1]), prompt_key("gen/2", prompts[2]),
                                      prompt_key("gen/3", prompts[3])]
    unet = folder / "model" / "unet"
    assert unet.is_symlink() and unet.resolve() == (sd_dir / "unet").resolve()
    assert (folder / "model" / "lora").is_dir() and not (folder / "model" / "lora").is_symlink()
    targets = bank_targets(bank)  # what Journey TRAK re-samples: the prompt and the bank's guidance
    assert bank.gen_guidance == 2.0 and targets.generated[3].prompt == Prompt(prompts[1], guidance=2.0)

    model = load_model(str(folder / "model"), "cpu")
    images = torch.from_numpy(np.asarray(bank.target_images))
    keys = list(bank.target_keys)
    got = simple_loss_outputs(model, images, keys, 3, 1)[0]
    ts = f_timesteps(3)

    def direct(x, key, prompt):
        with torch.no_grad():
            z0 = model.encode(x[None])
            cond = model.prompt_condition([prompt])
            eps = noise_for([f"bank/0/{key}"], ts, tuple(z0.shape[1:]), 0)[0]
            x_t = [model.schedule.add_noise(z0, e[None], t[None]) for t, e in zip(ts, eps)]
            return float(torch.stack([((model.eps(model.parameters(), x, t[None], cond) - e[None]) ** 2).mean()
                                      for x, t, e in zip(x_t, ts, eps)]).mean())

    right = [direct(x, k, key_prompt(k) or model.prompt_for(k)) for x, k in zip(images, keys)]
    np.testing.assert_allclose(got, right, rtol=1e-5)  # float32, batched vs one target and timestep at a time
    # the prompt reaches F: another prompt moves it far beyond float32 noise (the random tiny text encoder makes the
    # effect small, ~1e-3 relative; batched vs one-by-one agree to ~1e-6)
    assert abs(direct(images[2], keys[2], prompts[7]) - got[2]) > 1e-4 * got[2]


def test_crn_lora_finetunes_share_each_images_draws(sd_dir, npz12, tmp_path):
    """LoRA finetunes are the same loop: under CRN, finetunes on the 12 images and on 11 of them (one batch each)
    draw the same timestep for every shared image and end closer than two stream finetunes do (the removed image is
    a twelfth of the data, so its own effect is much of what is left: crn 0.54 against stream 1.14)."""
    from safetensors.torch import load_file

    from attribution.train import TrainConfig, train

    def finetune(name, randomness, indices):
        return train(TrainConfig(dataset=f"npz:{npz12}", out=str(tmp_path / name), epochs=3, batch_size=12,
                                 lr=1e-2, checkpoints=1, indices=indices, device="cpu", pipeline=str(sd_dir),
                                 rank=2, prompt_template=TEMPLATE, randomness=randomness))

    dist = {}
    for mode in ("crn", "stream"):
        a, b = finetune(f"{mode}-all", mode, None), finetune(f"{mode}-minus", mode, [i for i in range(12) if i != 5])
        wa, wb = (load_file(str(r / "epoch-3" / "lora" / "adapter_model.safetensors")) for r in (a, b))
        dist[mode] = float(sum(((wa[k] - wb[k]).double() ** 2).sum() for k in wa) ** 0.5)
        ta, tb = (np.load(r / "epoch-3" / "training_timesteps.npy") for r in (a, b))
        assert np.array_equal(np.delete(ta, 5), tb) == (mode == "crn")
        assert json.loads((a / "run.json").read_text())["config"]["randomness"] == mode
    print(f"\nLoRA weights, one of 12 images removed: L2 crn {dist['crn']:.4f} vs stream {dist['stream']:.4f}")
    assert 0 < dist["crn"] < 0.7 * dist["stream"], dist


# -- the finetuning set: prompts are read by index, so only that set can be attributed ---------------------------------


@pytest.fixture(scope="module")
def shipped_latent():
    return load_model("digits-latent", "cpu")


def test_another_training_set_is_one_line_naming_both(shipped_latent):
    """digits-latent's prompts.json was recorded for "digits:5,6,7,8,9" (807 images): attributing it against all
    digits, or against another 807-image-sized set of other classes, would read the wrong image's prompt."""
    from attribution.data import ImageDataset, training_dataset_of
    from attribution.engine import Attributor
    from attribution.features.config import FeatureConfig

    for spec, why in [("digits", "1618 training images, the finetuning set 807"),
                      ("digits:0,1,2,3,4", "811 training images, the finetuning set 807")]:
        with pytest.raises(ConfigError) as exc:
            training_dataset_of(shipped_latent, spec)
        line = str(exc.value)
        assert "\n" not in line and why in line
        assert line.startswith("digits-latent@epoch-60 was finetuned on digits:5,6,7,8,9, not on " + spec)
        assert line.endswith("--dataset digits:5,6,7,8,9")
    # the same number of images, three of them labelled with another class: still not the finetuning set
    same = training_dataset_of(shipped_latent, "digits:5,6,7,8,9")
    labels = same.labels.copy()
    labels[[0, 10, 20]] = (labels[[0, 10, 20]] + 1) % 5
    shuffled = ImageDataset("npz:/elsewhere.npz", "train", same.pixels, labels, same.class_names, same.source_index)
    with pytest.raises(ConfigError, match=r"not on npz:/elsewhere.npz \(3 of its 807 training images in another "
                                          r"class than the finetuning set's\)"):
        Attributor(shipped_latent, shuffled, FeatureConfig(timesteps=1, proj_dim=64))  # a set built by hand too


def test_the_finetuning_set_passes_however_it_is_written(shipped_latent, tiny_run):
    """The recorded spec, none (the run's own), or its classes listed in another order (the same images, the same
    class per image, other label numbers) all pass; pixel models accept any set, as before."""
    from attribution.data import training_dataset_of

    recorded = training_dataset_of(shipped_latent, "digits:5,6,7,8,9")
    assert len(recorded) == 807 and training_dataset_of(shipped_latent).spec == "digits:5,6,7,8,9"
    reordered = training_dataset_of(shipped_latent, "digits:9,8,7,6,5")
    assert not np.array_equal(reordered.labels, recorded.labels)  # other label numbers, the same class names
    assert [reordered.label_name(i) for i in range(807)] == [recorded.label_name(i) for i in range(807)]
    assert shipped_latent.prompt_for("train/0") == f"a handwritten digit {reordered.label_name(0)}"
    pixel = load_model(str(tiny_run), "cpu")
    assert len(training_dataset_of(pixel, "digits:0,1")) < len(training_dataset_of(pixel, "digits"))


def test_cli_refuses_another_training_set(capsys, tmp_path):
    rc = main(["score", "--checkpoint", "digits-latent", "--dataset", "digits", "--target", "gen:0", "--prompt",
               "a handwritten digit 7", "--timesteps", "1", "--proj-dim", "64", "--device", "cpu",
               "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    errors = [ln for ln in err if ln.startswith("error:")]
    assert errors == [err[-1]]
    assert "finetuned on digits:5,6,7,8,9, not on digits (1618 training images" in err[-1]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))  # nothing featurized
