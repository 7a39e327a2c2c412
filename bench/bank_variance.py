"""Where a bank's F varies: subset effect (signal), seed effect shared by all subsets, subset-specific seed noise,
noise sets (`lds.variance_components`), beside its ceilings, for several banks on their common finished subsets.

    python bench/bank_variance.py --banks digits,digits-crn --out bench/results/bank-variance

Banks with the same subset masks (same dataset, alpha and subset seed) are compared on the subsets finished in all
of them, so a bank still building is compared with the others on equal terms. Writes variance.md and variance.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import numpy as np

from attribution import Bank, split_rows
from attribution.evaluation.bank import bank_randomness
from attribution.evaluation.lds import VARIANTS, evaluate, variance_components


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--banks", default="digits,digits-crn")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    banks = {name: Bank.load(name) for name in a.banks.split(",")}
    first = next(iter(banks.values()))
    if any(b.masks.shape[1] != first.masks.shape[1] for b in banks.values()):
        raise SystemExit("the banks have different training sets")
    n = min(len(b.masks) for b in banks.values())
    if any(not np.array_equal(b.masks[:n], first.masks[:n]) for b in banks.values()):
        raise SystemExit("the banks' subsets differ; compare banks built with the same --alpha and subset seed")
    common = np.all([b.done[:n].all(1) for b in banks.values()], axis=0)
    rows = np.flatnonzero(common)
    out, md = [], [f"{len(rows)} subsets finished in every bank ({', '.join(banks)}); components per target, averaged "
                   "over targets, as shares of F's variance across retrained models; noise sets: the part of the "
                   "residual that is F's measurement; r = subset / (subset + residual).\n",
                   "| bank | randomness | split | variant | subset | seed (shared) | residual | of which noise sets | "
                   "r implied | seed-vs-seed | reachable |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, bank in banks.items():
        for split in ("val", "gen"):
            targets = split_rows(bank, split)
            F = bank.F[rows][..., targets]
            ceil = evaluate({}, bank.masks[rows], F, n_resamples=a.resamples).ceilings
            for variant in VARIANTS:
                vc = variance_components(F, centered=variant == "centered")
                sh = vc.shares()
                seed, reach = ceil.seed[variant], ceil.reachable[variant]
                row = {"bank": name, "randomness": bank_randomness(bank.meta), "split": split, "variant": variant,
                       **{f"share_{k}": v for k, v in sh.items()}, "r_implied": vc.predicted_r,
                       "seed_vs_seed": seed.value, "seed_ci": seed.ci_two_way, "reachable": reach.value,
                       "reachable_ci": reach.ci_two_way, "subsets": int(len(rows))}
                out.append(row)
                md.append(f"| {name} | {row['randomness']} | {split} | {variant} | {sh['subset']:.0%} | "
                          f"{sh['seed']:.0%} | {sh['residual']:.0%} | {sh['noise_sets']:.0%} | {vc.predicted_r:+.2f} | "
                          f"{seed.value:+.3f} [{seed.ci_two_way[0]:+.3f}, {seed.ci_two_way[1]:+.3f}] | "
                          f"{reach.value:+.3f} [{reach.ci_two_way[0]:+.3f}, {reach.ci_two_way[1]:+.3f}] |")
    target = Path(a.out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "variance.json").write_text(json.dumps(out, indent=1) + "\n")
    (target / "variance.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
