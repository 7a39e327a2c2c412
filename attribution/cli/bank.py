"""CLI for ground-truth banks: `python -m attribution bank build|checkpoints|info`."""

from __future__ import annotations

from ..evaluation.bank import BankSpec  # (torch is loaded by the parser already; no Ray)
from ..options import add_arguments, from_args
from .common import add_ray_options, info, progress_bar


def add_commands(sub) -> None:
    b = sub.add_parser("bank", help="ground-truth banks for LDS: retrain on random subsets (on Ray), measure F")
    bsub = b.add_subparsers(dest="bank_command", required=True)
    bb = bsub.add_parser("build", help="build, resume or grow a bank (rerun continues; finished work is kept)")
    src = bb.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a named retraining recipe: digits-eval, tiny-test")
    add_arguments(src, BankSpec, only=("full_model",))  # --run
    add_arguments(bb, BankSpec, exclude=("full_model",))  # what to build: the bank's schema
    bb.add_argument("--randomness", help="crn-slots (common random numbers: each image's draws keyed by seed, epoch "
                                         "and image, in the full run's batches), crn (the same draws, re-batched) or "
                                         "stream; default: crn-slots for a new bank, a bank's own when resuming or "
                                         "growing it, the run's own with --run")
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

    from ..evaluation.bank import build_bank, default_randomness  # lazy: keeps the other commands' start fast
    from ..evaluation.recipes import get_recipe, recipe_from_run  # lazy: keeps the start of the other commands fast

    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    recipe = get_recipe(args.recipe) if args.recipe else recipe_from_run(args.full_model)
    spec = from_args(BankSpec, args, recipe=recipe)
    spec.recipe = replace(recipe, randomness=args.randomness or default_randomness(spec.folder, args.full_model))
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
