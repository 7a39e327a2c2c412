"""How much DAS's per-image residual weights vary across the training set of a bank's model.

    python bench/das_weights.py --bank digits
    python bench/das_weights.py --bank digits-latent

For each DAS weight (`das`: the reference code's scale-free mean_t(e_t / ||e||); `das-size`: the residual's size
mean_t e_t; `features.residuals`), computed on the bank's model and training set (cached under cache/stats/, the
same store the LDS runs use), prints min, max, mean, max/min and the coefficient of variation (std / mean). A
weight that is nearly constant across images changes D-TRAK Avg's ranking of training images only slightly.
"""

from __future__ import annotations

import argparse
import sys

from attribution import Bank, get_method, open_on_bank


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", default="digits")
    p.add_argument("--methods", default="das,das-size")
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    bank = Bank.load(args.bank)
    print(f"bank {args.bank}: {bank.dataset}")
    print(f"{'weight':>20} {'N':>6} {'min':>8} {'max':>8} {'mean':>8} {'max/min':>8} {'CV':>7}")
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        member = open_on_bank(bank, name, "cpu", cache=args.cache).members[0]
        stat = get_method(name).features.statistic_name
        w = member.featurizer.statistic(stat)
        print(f"{stat:>20} {len(w):6d} {w.min():8.4f} {w.max():8.4f} {w.mean():8.4f} {w.max() / w.min():8.3f} "
              f"{w.std() / w.mean():7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
