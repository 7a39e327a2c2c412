"""CLI commands for models: `train`, `train-lora`, `generate` and `app` (serve the Streamlit app)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..data import load_dataset, pixels_to_pil, tensor_to_pixels
from ..data.images import grid_image
from ..fileio import atomic_path, save_npz
from ..models import load_model
from ..sampling import check_sampling, sample
from ..train import TrainConfig, read_index_file, subset_indices, train
from .common import add_prompt_options, info, progress_bar, prompt_from

# -- train ---------------------------------------------------------------------------------------------------------

def _run_options(args) -> dict:
    """The TrainConfig fields `train` and `train-lora` share (the index file read and checked here)."""
    indices = read_index_file(args.indices) if args.indices else None
    return dict(dataset=args.dataset, out=args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                lr=args.lr, checkpoints=args.checkpoints, indices=indices, index_file=args.indices,
                device=args.device, flip={"auto": None, "on": True, "off": False}[args.flip],
                randomness=args.randomness,
                save_epochs=[int(e) for e in args.save_epochs.split(",")] if args.save_epochs else [])


def cmd_train(args) -> int:
    cfg = TrainConfig(**_run_options(args), preset=args.preset, resolution=args.resolution)
    indices = cfg.indices

    subset_indices(cfg, len(load_dataset(cfg.dataset, "train", cfg.resolution)))  # validate before reporting
    info(f"training a {cfg.preset} DDPM on {cfg.dataset}"
         f"{f' ({len(indices)} indices from {args.indices})' if indices else ''} for {cfg.epochs} epochs, "
         f"seed {cfg.seed}, {cfg.randomness} randomness; checkpoints at epochs {cfg.save_epochs} -> {cfg.out}")
    out = train(cfg, progress=progress_bar("epochs"))
    print(out)
    return 0


def cmd_train_lora(args) -> int:
    cfg = TrainConfig(**_run_options(args), pipeline=args.pipeline, rank=args.rank,
                      prompt_template=args.prompt_template)
    indices = cfg.indices
    info(f"LoRA-finetuning {args.pipeline} (rank {cfg.rank}) on {cfg.dataset}"
         f"{f' ({len(indices)} indices from {args.indices})' if indices else ''}, prompts "
         f"{cfg.prompt_template!r}, {cfg.epochs} epochs, seed {cfg.seed}, {cfg.randomness} randomness; checkpoints "
         f"at epochs {cfg.save_epochs} "
         f"-> {cfg.out}")
    out = train(cfg, progress=progress_bar("epochs"))
    print(out)
    return 0


# -- generate ------------------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    model = load_model(args.checkpoint, args.device)
    prompt = prompt_from(args)
    check_sampling(model, args.n, args.steps, args.sampler, prompt)
    out = Path(args.out)
    said = "" if prompt is None else f" for {prompt.text!r} (guidance {prompt.guidance:g})"
    info(f"generating {args.n} images from {model.spec}{said} with {args.sampler} ({args.steps} steps), seeds "
         f"{args.seed}..{args.seed + args.n - 1} -> {out}/")
    traj = sample(model, args.n, args.seed, args.steps, args.sampler, progress=progress_bar("sampling"),
                  prompt=prompt)
    out.mkdir(parents=True, exist_ok=True)
    pixels = tensor_to_pixels(torch.from_numpy(traj.final))
    for i, seed in enumerate(traj.seeds):
        with atomic_path(out / f"seed-{seed:06d}.png") as tmp:
            pixels_to_pil(pixels[i]).save(tmp, format="PNG")
    arrays = {"images": pixels[..., 0] if pixels.shape[-1] == 1 else pixels, "seeds": traj.seeds}
    if args.trajectory:
        arrays.update(timesteps=traj.timesteps, xt=traj.xt, x0_pred=traj.x0_pred)
    save_npz(out / "samples.npz", **arrays)
    if args.grid:
        with atomic_path(args.grid) as tmp:
            grid_image(pixels, scale=args.grid_scale).save(tmp, format="PNG")
        info(f"wrote a {len(pixels)}-image grid to {args.grid}")
    print(f"wrote {len(pixels)} PNGs and samples.npz to {out}")
    return 0


# -- app -----------------------------------------------------------------------------------------------------------

def cmd_app(args) -> int:
    """Serve the Streamlit app (the same as `streamlit run app.py`).

    The server replaces this process (exec) rather than running as its child, so stopping the command in any
    way (Ctrl-C, a terminal closing, kill, a test's terminate) stops the server: nothing is left serving.
    """
    app = Path(__file__).resolve().parents[2] / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
           "--server.port", str(args.port)]
    info(f"serving the app on http://localhost:{args.port}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def _randomness_option(p) -> None:
    p.add_argument("--randomness", default="stream",
                   help="where the data order, timesteps, noises and flips come from: stream (default: one stream "
                        "from the seed, as every run made before CRN; a run.json without the field is one), "
                        "crn-slots (common random numbers: each image's draws keyed by seed, epoch and image, in the "
                        "full split's batches, for runs to be compared with subset retrains, e.g. a bank's --run) "
                        "or crn (the same draws, re-batched over the images present)")


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train a small DDPM (UNet2DModel) on a dataset or a subset of it")
    t.add_argument("--dataset", required=True, help="dataset spec, e.g. digits, animals-2, folder:PATH")
    t.add_argument("--out", required=True, help="run folder to write (epoch-N/ checkpoints + run.json)")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--indices", help="train only on these training-split indices (.npy or text file)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--checkpoints", type=int, default=5, help="number of evenly spaced saved epochs (default 5)")
    t.add_argument("--save-epochs", help="explicit comma-separated epochs to save instead of --checkpoints")
    t.add_argument("--preset", default="small", help="UNet size: small (0.65M parameters) or tiny (tests)")
    t.add_argument("--resolution", type=int, help="model resolution (default: the dataset's)")
    t.add_argument("--flip", choices=["auto", "on", "off"], default="auto",
                   help="random horizontal flips (auto: on except for digits)")
    t.add_argument("--device", default="auto")
    _randomness_option(t)
    t.set_defaults(func=cmd_train)

    lo = sub.add_parser("train-lora", help="LoRA-finetune a local Stable Diffusion folder on a dataset with class "
                                           "prompts (D-TRAK's SD-LoRA setting)")
    lo.add_argument("--pipeline", required=True, help="a local Stable Diffusion folder (model_index.json, unet/, "
                                                      "vae/, text_encoder/, tokenizer/, scheduler/)")
    lo.add_argument("--dataset", required=True, help="dataset spec with classes, e.g. folder:PATH, animals:cat,dog")
    lo.add_argument("--out", required=True, help="run folder to write (epoch-N/ LoRA checkpoints + run.json)")
    lo.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4; the D-TRAK paper uses 128)")
    lo.add_argument("--prompt-template", default="a {class} painting",
                    help="each training image's prompt, {class} = its class name (default 'a {class} painting')")
    lo.add_argument("--epochs", type=int, default=10)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--indices", help="finetune only on these training-split indices (.npy or text file)")
    lo.add_argument("--batch-size", type=int, default=64)
    lo.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4, the paper's)")
    lo.add_argument("--checkpoints", type=int, default=5, help="number of evenly spaced saved epochs (default 5)")
    lo.add_argument("--save-epochs", help="explicit comma-separated epochs to save instead of --checkpoints")
    lo.add_argument("--flip", choices=["auto", "on", "off"], default="auto",
                    help="random horizontal flips (auto: on except for digits)")
    lo.add_argument("--device", default="auto")
    _randomness_option(lo)
    lo.set_defaults(func=cmd_train_lora)

    g = sub.add_parser("generate", help="generate images (PNGs + samples.npz)")
    g.add_argument("--checkpoint", required=True, help="digits, animals-2, NAME@epoch-N, or a folder")
    g.add_argument("--n", type=int, default=16)
    g.add_argument("--seed", type=int, default=0, help="image i gets seed SEED+i")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm (default; crisper on small models) or ddim; both deterministic given the seed")
    add_prompt_options(g)
    g.add_argument("--out", required=True)
    g.add_argument("--trajectory", action="store_true", help="also store x_t and predicted x0 of every step")
    g.add_argument("--grid", help="also write all images as one grid PNG to this path")
    g.add_argument("--grid-scale", type=int, default=4, help="pixel enlargement of the grid (default 4)")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("app", help="serve the Streamlit app")
    a.add_argument("--port", type=int, default=8501)
    a.set_defaults(func=cmd_app)
