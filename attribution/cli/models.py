"""CLI commands for models: `train`, `train-lora`, `generate` and `app` (serve the Streamlit app)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..data import load_dataset, pixels_to_pil, tensor_to_pixels
from ..data.images import grid_image
from ..fileio import atomic_path, save_npz
from ..models import SCHEDULES, load_model
from ..sampling import SAMPLERS, check_sampling, sample
from ..options import add_arguments, from_args
from ..train import TrainConfig, read_index_file, subset_indices, train
from .common import add_prompt_options, info, progress_bar, prompt_from

# -- train ---------------------------------------------------------------------------------------------------------

LORA_OPTIONS = ("pipeline", "rank", "prompt_template")  # train-lora's own

def _config(args, **more) -> TrainConfig:
    """The TrainConfig of `train` or `train-lora` from its options (the index file read and checked here)."""
    indices = read_index_file(args.index_file) if args.index_file else None
    return from_args(TrainConfig, args, indices=indices, **more)


def cmd_train(args) -> int:
    cfg = _config(args)
    indices = cfg.indices

    subset_indices(cfg, len(load_dataset(cfg.dataset, "train", cfg.resolution)))  # validate before reporting
    info(f"training a {cfg.preset} {SCHEDULES[cfg.schedule].title} model on {cfg.dataset}"
         f"{f' ({len(indices)} indices from {args.index_file})' if indices else ''} for {cfg.epochs} epochs, "
         f"seed {cfg.seed}, {cfg.randomness} randomness; checkpoints at epochs {cfg.save_epochs} -> {cfg.out}")
    out = train(cfg, progress=progress_bar("epochs"))
    print(out)
    return 0


def cmd_train_lora(args) -> int:
    cfg = _config(args)
    indices = cfg.indices
    info(f"LoRA-finetuning {cfg.pipeline} (rank {cfg.rank}) on {cfg.dataset}"
         f"{f' ({len(indices)} indices from {args.index_file})' if indices else ''}, prompts "
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
    args.sampler = args.sampler or model.schedule.default_sampler
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


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train a small DDPM or flow-matching model (UNet2DModel) on a dataset or a "
                                      "subset of it")
    add_arguments(t, TrainConfig, exclude=LORA_OPTIONS, argparse_choices=False)  # TrainConfig's fields (it
    # refuses a value outside their choices itself, in one line)
    t.set_defaults(func=cmd_train)

    lo = sub.add_parser("train-lora", help="LoRA-finetune a local Stable Diffusion folder on a dataset with class "
                                           "prompts (D-TRAK's SD-LoRA setting)")
    add_arguments(lo, TrainConfig, exclude=("preset", "resolution", "schedule"), required=("pipeline",),
                  argparse_choices=False, defaults={"epochs": 10, "lr": 3e-4})  # lr: the D-TRAK paper's for LoRA
    lo.set_defaults(func=cmd_train_lora)

    g = sub.add_parser("generate", help="generate images (PNGs + samples.npz)")
    g.add_argument("--checkpoint", required=True, help="digits, animals-2, NAME@epoch-N, or a folder")
    g.add_argument("--n", type=int, default=16)
    g.add_argument("--seed", type=int, default=0, help="image i gets seed SEED+i")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="DDPM models: ddpm (default; crisper on small models) or ddim; flow-matching models: euler "
                        "(default) or heun; all deterministic given the seed")
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
