"""Command-line interface: `python -m attribution COMMAND ...`.

Each command parses its options, says what it will compute and where the results go, calls the library and
prints the result. A user error ends with one line on stderr and exit status 2; no traceback. One module per
group of commands, each with `add_commands(subparsers)`; shared helpers live in `common.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import AttributionError
from . import analysis, bank, counterfactual, engine, evaluation, journey, magic, models, prepare

COMMAND_MODULES = (models, engine, journey, analysis, bank, evaluation, counterfactual, magic, prepare)


def build_parser() -> argparse.ArgumentParser:
    # `attribution` (the console script of pyproject.toml) or `python -m attribution`
    prog = "attribution" if Path(sys.argv[0]).name == "attribution" else "python -m attribution"
    p = argparse.ArgumentParser(prog=prog,
                                description="Which training images made a diffusion model generate this?")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttributionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
