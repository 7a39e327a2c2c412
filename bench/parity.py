"""Results unchanged by a refactor: scores, rankings and LDS tables of a fixed small configuration, written by one
version of the code and compared with another's on the same machine.

    git worktree add /tmp/before <old commit>
    (cd /tmp/before && PYTHONPATH=/tmp/before python /path/to/bench/parity.py --out /tmp/parity-before.npz)
    python bench/parity.py --out /tmp/parity-after.npz
    python bench/parity.py --compare /tmp/parity-before.npz /tmp/parity-after.npz

What is computed (the shipped `digits` model and dataset, K = 1, k = 256, one fresh feature cache per run): scores of
val:0-4 and gen:0-1 by D-TRAK (Square and Avg), TRAK and pixel cosine through `open_attribution` and each method's
lifecycle, their rankings, the scores of every target of the bank (`score_bank`) and its LDS table on both splits
(200 resamples); the target scores and rankings of the methods with their own kind of features (DAS's three,
EK-FAC's two); every method's feature folder name (its cache identity: a change would orphan users' caches). The
script reads only modules that exist in both versions (no public facade), so the older code can run it. Two runs
of the same code on one machine agree bit for bit; `--compare` reports whether two files do, and the largest
difference otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

METHODS = (("dtrak", None), ("dtrak", "avg"), ("trak", None), ("pixel-cos", None))
# Methods with their own kind of features (residual statistics, EK-FAC whitening): their target scores, rankings and
# feature folders only (no bank table: each would fit its statistics or curvature once more).
FEATURE_KIND_METHODS = (("das", None), ("das0", None), ("das-size", None), ("ekfac", None), ("ekfac-elbo", None))


def compute(out: str, bank_name: str) -> None:
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.evaluation.bank import Bank
    from attribution.evaluation.evaluate import lds_table, score_bank
    from attribution.targets import resolve_targets

    arrays, tables = {}, {}
    bank = Bank.load(bank_name)
    with tempfile.TemporaryDirectory() as cache:
        options = dict(timesteps=1, proj_dim=256, cache=cache)
        for method, fn in METHODS + FEATURE_KIND_METHODS:
            label = method + (f":{fn}" if fn else "")
            opts = RunOptions.for_method(method, checkpoint="digits", device="cpu", fn=fn, **options)
            att = opts.open() if hasattr(opts, "open") else open_attribution(opts)  # older code: RunOptions.open
            arrays[f"{label} feature folder"] = np.array(att.members[0].store_path.name)  # the cache identity
            for spec in ("val:0-4", "gen:0-1"):
                result = att.run(resolve_targets(spec, att.target_model, "digits", steps=10))
                arrays[f"{label} {spec} scores"] = result.scores
                arrays[f"{label} {spec} ranking"] = result.ranking
            if (method, fn) in FEATURE_KIND_METHODS:
                continue
            run = score_bank(bank, method, device="cpu", fn=fn, **options)
            scores = run.scores() if callable(run.scores) else run.scores  # the older BankRun had a method
            arrays[f"{label} bank scores"] = scores
            for split in ("val", "gen"):
                tables[f"{label} {split}"] = lds_table(bank, {label: scores}, split, n_resamples=200).rows()
    np.savez(out, tables=np.array(json.dumps(tables, default=float, sort_keys=True)), **arrays)
    print(f"wrote {out}: {len(arrays)} arrays, {len(tables)} LDS tables")


def compare(a: str, b: str) -> int:
    with np.load(a) as za, np.load(b) as zb:
        if set(za.files) != set(zb.files):
            print(f"different contents: {sorted(set(za.files) ^ set(zb.files))}")
            return 1
        same = True
        for k in sorted(za.files):
            x, y = za[k], zb[k]
            if k == "tables":
                equal = str(x) == str(y)
                print(f"LDS tables: {'identical' if equal else 'DIFFERENT'}")
            else:
                equal = x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
                if not equal:
                    diff = (np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64))) if x.shape == y.shape
                            else None)
                    print(f"{k}: DIFFERENT (max |diff| {diff})")
            same &= equal
        print(f"{len(za.files) - 1} arrays and the LDS tables: {'all identical' if same else 'NOT identical'}")
    return 0 if same else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write this version's results (.npz)")
    p.add_argument("--bank", default="digits-crn")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result files")
    a = p.parse_args()
    if a.compare:
        return compare(*a.compare)
    if not a.out:
        p.error("give --out or --compare")
    compute(a.out, a.bank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
