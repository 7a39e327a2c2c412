"""Where each bank's LDS-optimal λ lies against the default rule (0.1 x the mean non-zero eigenvalue of XᵀX), from the
`lambda.csv` files that `bench/lds_table.py` wrote (no computation: it reads them).

    python bench/lambda_multiples.py --out bench/results/lambda-multiples.json

For each bank, method and split: the LDS-optimal λ as a multiple of the mean eigenvalue (the default is 0.1), the LDS
at the default λ, at the λ chosen on one half of the targets and scored on the other (an honest choice), and the gap.
A default rule that suited every bank would put the optimal multiples of one method close together.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from results_io import emit

RESULTS = Path(__file__).resolve().parent / "results" / "lds-reachable"
DEFAULT_MULTIPLE = 0.1  # Kernel.default_lambda: 0.1 x the mean eigenvalue


def rows(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.glob("*/lambda.csv")):
        for r in csv.DictReader(path.open()):
            mean_eigenvalue = float(r["default"]) / DEFAULT_MULTIPLE
            out.append({"bank": path.parent.name, "method": r["method"], "split": r["split"],
                        "optimal_multiple": float(r["optimal"]) / mean_eigenvalue,
                        "lds_default": float(r["lds_default"]), "lds_held_out": float(r["lds_held_out"]),
                        "held_out_gain": float(r["lds_held_out"]) - float(r["lds_default"])})
    return out


def markdown(table: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in table))
    banks = list(dict.fromkeys(r["bank"] for r in table))
    get = {(r["bank"], r["method"], r["split"]): r for r in table}
    head = "| bank | " + " | ".join(f"{m}: optimal multiple val / gen" for m in methods) + " |"
    lines = [head, "|---" * (len(methods) + 1) + "|"]
    for b in banks:
        cells = []
        for m in methods:
            v, g = get.get((b, m, "val")), get.get((b, m, "gen"))
            cells.append(" / ".join(f"{x['optimal_multiple']:.3g} ({x['held_out_gain']:+.3f})" if x else "-"
                                    for x in (v, g)))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of lds_table.py outputs (one per bank)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    table = rows(Path(args.results))
    if not table:
        print(f"no lambda.csv under {args.results}", file=sys.stderr)
        return 2
    print(markdown(table), file=sys.stderr)
    return emit(table, args.out)


if __name__ == "__main__":
    sys.exit(main())
