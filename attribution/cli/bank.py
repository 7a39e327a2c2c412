"""CLI for ground-truth banks: `python -m attribution bank build|checkpoints|info`."""

from __future__ import annotations

from .common import add_ray_options, info, progress_bar


def add_commands(sub) -> None:
    b = sub.add_parser("bank", help="ground-truth banks for LDS: retrain on random subsets (on Ray), measure F")
    bsub = b.add_subparsers(dest="bank_command", required=True)
    bb = bsub.add_parser("build", help="build, resume or grow a bank (rerun continues; finished work is kept)")
    bb.add_argument("--name", required=True, help="bank name (folder banks/NAME unless --out)")
    src = bb.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a named retraining recipe: digits-eval, tiny-test")
    src.add_argument("--run", help="a training run folder: its final checkpoint is the bank's model, subsets are "
                                   "retrained with its run.json recipe")
    bb.add_argument("--out", help="bank folder (default banks/NAME)")
    bb.add_argument("--subsets", type=int, default=24, help="M, random subsets (default 24)")
    bb.add_argument("--seeds", type=int, default=2, help="training seeds per subset (default 2)")
    bb.add_argument("--alpha", type=float, default=0.5, help="subset fraction of the training split (default 0.5)")
    bb.add_argument("--subset-seed", type=int, default=0, help="seed of the random subsets (default 0)")
    bb.add_argument("--subset-file", help="subsets from a file instead: .npy (M, N) bool, .npy (M, k) indices, "
                                          "or text with one subset's indices per line")
    bb.add_argument("--val-targets", type=int, default=100, help="validation images val:0.. (default 100)")
    bb.add_argument("--gen-targets", type=int, default=100, help="images of the full model, seeds 0.. (default 100)")
    bb.add_argument("--gen-steps", type=int, default=50, help="DDPM steps of the generated targets (default 50)")
    bb.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of a text-conditional "
                                                                "model's generated targets (default 7.5)")
    bb.add_argument("--targets-from", metavar="BANK",
                    help="take the targets from another bank (name or folder: same data, the same val:/gen: keys) "
                         "instead of making them, so that both banks measure F on the same images")
    bb.add_argument("--randomness", help="crn-slots (common random numbers: each image's draws keyed by seed, epoch "
                                         "and image, in the full run's batches), crn (the same draws, re-batched) or "
                                         "stream; default: crn-slots for a new bank, a bank's own when resuming or "
                                         "growing it, the run's own with --run")
    bb.add_argument("--noise-sets", type=int, default=2, help="R, independent noise sets for F (default 2)")
    bb.add_argument("--timesteps", type=int, default=100, help="K uniform timesteps of F (default 100)")
    add_ray_options(bb, "cache root for the retrained models (default: cache/ or $ATTRIBUTION_CACHE)")
    bb.set_defaults(func=cmd_bank_build)
    bc = bsub.add_parser("checkpoints", help="retrain the bank's full model with intermediate checkpoints (for the "
                                              "TracIn family and the per-checkpoint LDS study)")
    bc.add_argument("--name", required=True, help="a bank name (banks/NAME) or folder")
    bc.add_argument("--checkpoints", type=int, default=5, help="evenly spaced saved epochs, the last included "
                                                               "(default 5)")
    bc.set_defaults(func=cmd_bank_checkpoints)
    bi = bsub.add_parser("info", help="summarise a bank")
    bi.add_argument("bank", help="a bank name (banks/NAME) or folder")
    bi.set_defaults(func=cmd_bank_info)


def cmd_bank_build(args) -> int:
    import os  # lazy: keeps the start of the other commands fast

    from ..errors import ConfigError  # lazy: keeps the start of the other commands fast
    from ..evaluation.ray_engine import probe_address  # lazy: keeps the start of the other commands fast

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)  # fail in seconds, before torch is even imported
    from dataclasses import replace  # lazy: keeps the start of the other commands fast

    from ..evaluation.bank import (BankSpec, build_bank,  # lazy: keeps the start of the other commands fast
                                   default_randomness)
    from ..evaluation.recipes import get_recipe, recipe_from_run  # lazy: keeps the start of the other commands fast

    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    recipe = get_recipe(args.recipe) if args.recipe else recipe_from_run(args.run)
    spec = BankSpec(name=args.name, recipe=recipe, out=args.out, subsets=args.subsets, seeds=args.seeds,
                    alpha=args.alpha, subset_seed=args.subset_seed, subset_file=args.subset_file,
                    val_targets=args.val_targets, gen_targets=args.gen_targets, gen_steps=args.gen_steps,
                    noise_sets=args.noise_sets, timesteps=args.timesteps, full_model=args.run,
                    guidance=args.guidance, targets_from=args.targets_from)
    spec.recipe = replace(recipe, randomness=args.randomness or default_randomness(spec.folder, args.run))
    folder = build_bank(spec, address=args.ray_address, num_cpus=args.num_cpus, progress=progress_bar("bank"),
                        log=info, cache_root=args.cache)
    print(folder)
    return 0


def cmd_bank_checkpoints(args) -> int:
    from ..evaluation.bank import Bank, build_checkpoint_run  # lazy: keeps the start of the other commands fast

    print(build_checkpoint_run(Bank.load(args.name), args.checkpoints, log=info))
    return 0


def cmd_bank_info(args) -> int:
    from ..evaluation.bank import Bank  # lazy: keeps the start of the other commands fast

    print(Bank.load(args.bank).summary())
    return 0
