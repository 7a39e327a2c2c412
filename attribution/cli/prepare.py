"""CLI command `prepare`: compute ahead of a class what the app's Tour, Attribute defaults and Evaluation use.

    python -m attribution prepare --checkpoint digits            # prints the estimate, then computes
    python -m attribution prepare --checkpoint digits --dry-run  # the estimate only
    python -m attribution prepare --bank digits,digits-crn       # the Evaluation page's defaults on these banks

Everything goes to the feature cache (cache/ or $ATTRIBUTION_CACHE), resumable; a rerun computes only what is
missing. The estimate comes from the featurization speed measured on this machine (one image is timed for
features never timed here).
"""

from __future__ import annotations

from ..engine import format_duration
from ..prepare import estimate_text, plan, run
from .common import info, progress_bar


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="warm the cache for the app's Tour, Attribute defaults and Evaluation page "
                                       "(prints an estimate first)")
    p.add_argument("--checkpoint", default="digits", help="the model the Tour and the Attribute page open on "
                                                          "(default: digits)")
    p.add_argument("--dataset", default=None, help="training set spec (default: the one the checkpoint was "
                                                   "trained on)")
    p.add_argument("--bank", default=None, help="comma-separated banks for the Evaluation page's default methods "
                                                "(default: the bank the page opens on; 'none' for none)")
    p.add_argument("--dry-run", action="store_true", help="print the estimate and stop")
    p.add_argument("--ray-address", default=None, help="featurize the training sets as Ray tasks on this cluster "
                                                       "(HOST:PORT, or 'local' for a Ray on this machine; default: "
                                                       "in this process)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    banks = None if args.bank is None else [b for b in args.bank.split(",") if b and b != "none"]
    tasks = plan(args.checkpoint, args.dataset, banks)
    total, lines = estimate_text(tasks)
    info(lines)
    info("total: " + ("everything is cached" if total == 0 else
                      f"about {format_duration(total)} on this machine" if total is not None else "unknown"))
    if args.dry_run or total == 0:
        return 0
    run(tasks, progress_bar("prepare"), args.ray_address)
    info("prepared: the Tour, the Attribute page's defaults and the Evaluation page's defaults read the cache")
    return 0
