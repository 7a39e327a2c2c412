"""Build the shipped tiny latent model `digits-latent`: a miniature of D-TRAK's SD-LoRA setting on a CPU.

    python bench/tiny_latent.py --out models/digits-latent            # ~15 min on a shared CPU (BENCHMARKS.md)

1. A tiny Stable-Diffusion-shaped pipeline (models/tiny_sd.py): VAE, text-conditional UNet, CLIP text encoder with a
   small tokenizer. The text encoder keeps its RANDOM (seeded) weights: no CLIP weights exist offline, and a fixed
   random encoder still maps each prompt to its own embedding, which the UNet learns to read.
2. "Pretraining" on digits 0-4 (the base model, like Stable Diffusion before finetuning): the VAE (reconstruction +
   a small KL term; its scaling factor set to 1 / the latents' standard deviation, as Stable Diffusion's 0.18215),
   then the whole UNet on VAE latents with the prompt "a handwritten digit {class}" (10% of prompts dropped to the
   empty prompt, so classifier-free guidance has an unconditional model).
3. LoRA finetuning on digits 5-9 with the same template, through the project's own command
   (`python -m attribution train-lora`): the run folder OUT (run.json, epoch-N/ LoRA checkpoints linking OUT/base/).

Everything is seeded; same machine -> same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


import torch

from attribution import load_dataset, load_model
from attribution.cli.main import main as cli
from attribution.models.tiny_sd import TinySDConfig, build_tiny_pipeline
from attribution.train import prompt_table

TEMPLATE = "a handwritten digit {class}"
WORDS = ("a", "handwritten", "digit")
PRETRAIN, FINETUNE = "digits:0,1,2,3,4", "digits:5,6,7,8,9"


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, lr: float, kl: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=gen)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, xb) + kl * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"  vae step {step + 1}/{steps}: loss {sum(losses[-250:]) / 250:.4f}", file=sys.stderr)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = float(torch.cat([vae.encode(x[i:i + 256]).latent_dist.mode() for i in range(0, len(x), 256)]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


def train_unet(model, x: torch.Tensor, keys: list[str], epochs: int, batch: int, lr: float, drop: float,
               seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    unet = model.unet
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-6)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    empty = model.prompt_condition([""])["encoder_hidden_states"][0]
    epoch_losses = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        losses = []
        for s in range(0, len(x), batch):
            bi = perm[s:s + batch]
            cond = model.condition([keys[i] for i in bi.tolist()])["encoder_hidden_states"].clone()
            cond[torch.rand(len(bi), generator=gen) < drop] = empty
            t = torch.randint(0, model.num_timesteps, (len(bi),), generator=gen)
            eps = torch.randn((len(bi), *model.latent_shape), generator=gen)
            loss = model.training_loss(x[bi], eps, t, {"encoder_hidden_states": cond})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
        print(f"  unet epoch {epoch + 1}/{epochs}: loss {epoch_losses[-1]:.4f}", file=sys.stderr)
    unet.eval().requires_grad_(False)
    return epoch_losses


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/digits-latent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-epochs", type=int, default=40)
    p.add_argument("--lora-epochs", type=int, default=60)
    p.add_argument("--lora-lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--unet-channels", default="32,64")
    a = p.parse_args()
    out = Path(a.out)
    base = out / "base"
    start = time.time()
    torch.manual_seed(a.seed)
    cfg = TinySDConfig(resolution=16, unet_channels=tuple(int(c) for c in a.unet_channels.split(",")))
    build_tiny_pipeline(base, WORDS, cfg, seed=a.seed)
    model = load_model(str(base), "cpu")
    data = load_dataset(PRETRAIN, "train", model.resolution, model.channels)
    x = data.tensors()
    print(f"pretraining on {PRETRAIN}: {len(x)} images", file=sys.stderr)
    t0 = time.time()
    vae_losses = train_vae(model.vae, x, a.vae_steps, 64, 2e-3, 1e-3, a.seed)
    vae_s = time.time() - t0
    model.vae.save_pretrained(str(base / "vae"), safe_serialization=True)
    model = load_model(str(base), "cpu")  # the saved VAE (and scaling factor), a fresh UNet in classic attention
    model.prompts = prompt_table(PRETRAIN, TEMPLATE, model.resolution, model.channels)
    t0 = time.time()
    unet_losses = train_unet(model, x, [f"train/{i}" for i in range(len(x))], a.unet_epochs, 64, 2e-3, 0.1,
                             a.seed)
    unet_s = time.time() - t0
    model.unet.save_pretrained(str(base / "unet"), safe_serialization=True)
    (base / "pretraining.json").write_text(json.dumps({
        "dataset": PRETRAIN, "template": TEMPLATE, "seed": a.seed, "vae_steps": a.vae_steps,
        "vae_final_loss": round(sum(vae_losses[-100:]) / 100, 5), "vae_seconds": round(vae_s, 1),
        "scaling_factor": float(model.vae.config.scaling_factor), "unet_epochs": a.unet_epochs,
        "unet_epoch_loss": [round(v, 5) for v in unet_losses], "unet_seconds": round(unet_s, 1),
        "text_encoder": "random (seeded) weights, never trained", "config": cfg.__dict__}, indent=2) + "\n")
    t0 = time.time()
    rc = cli(["train-lora", "--pipeline", str(base), "--dataset", FINETUNE, "--out", str(out), "--rank",
              str(a.rank), "--prompt-template", TEMPLATE, "--epochs", str(a.lora_epochs), "--lr", str(a.lora_lr),
              "--batch-size", "64", "--checkpoints", "4", "--seed", str(a.seed), "--device", "cpu"])
    print(f"LoRA finetuning: {time.time() - t0:.0f} s; total {time.time() - start:.0f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
