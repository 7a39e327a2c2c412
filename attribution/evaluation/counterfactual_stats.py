"""Statistics of a counterfactual study (`counterfactual.Study`): what a reader can trust.

- Per method (and direction, K, retraining seed) the distribution over targets of each change measure: pixel L2
  (larger = the removal changed the image more), SSIM and CLIP cosine (smaller = more change).
- Paired against random removal on the same targets (same K, direction and seed): the per-target differences,
  their mean with a 95% percentile bootstrap interval over targets (`lds._percentile_ci`), and the Wilcoxon
  signed-rank test (two-sided; exact for small samples without ties, scipy's choice otherwise). With 10 targets
  the smallest two-sided p the test can give is 2/1024 = 0.002.
- The method the study supports best (`best_supported`: the highest lower end of that interval) and a one-sentence
  `verdict` on a method's removals against random ones.
- Retraining-seed noise: the same removal retrained with the next seed, compared with the first seed's image (the
  change a seed alone makes), and with `controls` the unchanged training set at the model's own seed (must be 0:
  retraining reproduces the original) and at the next seed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .counterfactual import CONTROL, RANDOM, Study
from .image_metrics import pixel_l2, ssim
from .lds import CI_LEVEL, _percentile_ci

METRICS = {"l2": "pixel L2", "ssim": "SSIM", "clip": "CLIP cosine"}
N_BOOT = 2000
MIN_DECIDING = 6  # paired targets below which the exact two-sided signed-rank p cannot reach 0.05 (2 / 2^5 > 0.05)


def _group(study: Study) -> dict[tuple, dict[int, dict]]:
    """{(method, direction, k, seed): {target: cell}}."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for c in study.cells:
        out[(c["method"], c["direction"], int(c["k"]), int(c["seed"]))][int(c["target"])] = c
    return out


def paired(x: np.ndarray, r: np.ndarray, seed: int = 0) -> dict:
    """x - r per target: mean with its bootstrap CI over targets, median, and the Wilcoxon signed-rank p."""
    from scipy.stats import wilcoxon  # lazy: scipy submodules load slowly and only this step needs them

    d = np.asarray(x, dtype=np.float64) - np.asarray(r, dtype=np.float64)
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else float("nan"),
           "median_diff": float(np.median(d)) if d.size else float("nan"), "ci": (float("nan"), float("nan")),
           "p": float("nan")}
    if d.size >= 2:
        idx = np.random.default_rng(seed).integers(0, d.size, size=(N_BOOT, d.size))
        out["ci"] = _percentile_ci(d[idx].mean(1))
    if d.size >= 2 and np.any(d != 0):
        out["p"] = float(wilcoxon(d).pvalue)
    return out


def summary_rows(study: Study) -> list[dict]:
    """One row per (method, direction, K, seed): medians over targets and the paired comparison with random."""
    groups = _group(study)
    rows = []
    for (method, direction, k, seed), cells in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                                      kv[0][3], kv[0][0] != RANDOM,
                                                                                      kv[0][0])):
        row = {"method": method, "direction": direction, "k": k, "seed": seed, "targets": len(cells)}
        for m in METRICS:
            vals = [c[m] for c in cells.values() if c.get(m) is not None]
            row[f"{m}_median"] = float(np.median(vals)) if vals else None
        ref = groups.get((RANDOM, direction, k, seed))
        if method not in (RANDOM, CONTROL) and ref:
            common = sorted(set(cells) & set(ref))
            for m in ("l2", "ssim", "clip"):
                if common and all(cells[t].get(m) is not None and ref[t].get(m) is not None for t in common):
                    p = paired(np.array([cells[t][m] for t in common]), np.array([ref[t][m] for t in common]))
                    row.update({f"{m}_vs_random": p["mean_diff"], f"{m}_vs_random_ci_low": p["ci"][0],
                                f"{m}_vs_random_ci_high": p["ci"][1], f"{m}_vs_random_p": p["p"],
                                "paired_targets": p["n"]})
        rows.append(row)
    return rows


def seed_noise(study: Study) -> list[dict]:
    """The change a retraining seed alone makes: for every removal retrained at two seeds, L2 and SSIM between the
    two regenerated images; per (method, direction, K), over targets."""
    groups = _group(study)
    out = []
    for (method, direction, k, seed), cells in sorted(groups.items()):
        other = groups.get((method, direction, k, seed + 1))
        if not other:
            continue
        common = sorted(set(cells) & set(other))
        if not common:
            continue
        l2, ss = [], []
        for t in common:
            a = study.cell_arrays(cells[t])[1]
            b = study.cell_arrays(other[t])[1]
            l2.append(pixel_l2(a, b))
            ss.append(ssim(a, b))
        out.append({"method": method, "direction": direction, "k": k, "seeds": f"{seed} vs {seed + 1}",
                    "targets": len(common), "l2_median": float(np.median(l2)), "ssim_median": float(np.median(ss)),
                    "l2": l2})
    return out


def per_target(study: Study, metric: str, direction: str, k: int, seed: int) -> dict[str, dict[int, float]]:
    """{method: {target: value}} of one measure at one (direction, K, seed), for boxplots."""
    out: dict[str, dict[int, float]] = {}
    for (method, d, kk, s), cells in _group(study).items():
        if d == direction and kk == k and s == seed:
            out[method] = {t: c[metric] for t, c in cells.items() if c.get(metric) is not None}
    return out


def dose_response(study: Study, metric: str, direction: str, seed: int) -> dict[str, list[tuple[int, float]]]:
    """{method: [(K, median over targets), ...]} along the removal sizes of a study."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (method, d, k, s), cells in sorted(_group(study).items(), key=lambda kv: kv[0][2]):
        vals = [c[metric] for c in cells.values() if c.get(metric) is not None]
        if d == direction and s == seed and vals:
            out[method].append((k, float(np.median(vals))))
    return dict(out)


def best_supported(rows: list[dict], direction: str, k: int, seed: int) -> str | None:
    """The method this study supports best at one (direction, K, seed): the one whose removals changed the
    regenerated images most beyond random removal on the same targets, by the lower end of the 95% interval of the
    paired pixel-L2 difference (then by the mean difference). None when no method is paired with random there."""
    paired_rows = [r for r in rows if (r["direction"], r["k"], r["seed"]) == (direction, k, seed)
                   and r.get("l2_vs_random") is not None]
    if not paired_rows:
        return None
    return max(paired_rows, key=lambda r: (np.nan_to_num(r["l2_vs_random_ci_low"], nan=-np.inf),
                                           r["l2_vs_random"]))["method"]


def verdict(rows: list[dict], method: str, direction: str, k: int, seed: int, n_train: int) -> str | None:
    """One sentence a student can read on what removing `method`'s top-K did to the regenerated images compared
    with removing K random images (`summary_rows`' paired pixel-L2 figures); None when the study has no paired
    comparison for it."""
    key = (direction, k, seed)
    row = next((r for r in rows if r["method"] == method and (r["direction"], r["k"], r["seed"]) == key), None)
    rnd = next((r for r in rows if r["method"] == RANDOM and (r["direction"], r["k"], r["seed"]) == key), None)
    if row is None or rnd is None or row.get("l2_vs_random") is None:
        return None
    lo, hi, p = row["l2_vs_random_ci_low"], row["l2_vs_random_ci_high"], row["l2_vs_random_p"]
    n = row["paired_targets"]
    decided = not np.isnan(p) and p < 1 - CI_LEVEL  # the bootstrap interval of a few targets is no test alone
    how = ("changed the regenerated images more than" if lo > 0 and decided else
           "changed the regenerated images less than" if hi < 0 and decided else
           "did not change the regenerated images measurably more than")
    few = (f" With {n} targets no paired test can decide (the signed-rank test needs {MIN_DECIDING} or more)."
           if n < MIN_DECIDING else "")
    retrained = f", retrained with seed {seed}" if seed else ""
    return (f"Removing {method}'s top {k} {direction} ({k / n_train:.1%} of the training set{retrained}) {how} "
            f"removing {k} random images did: median pixel L2 {row['l2_median']:.2f} "
            f"against {rnd['l2_median']:.2f}, paired difference {row['l2_vs_random']:+.2f} [{lo:+.2f}, {hi:+.2f}] "
            f"(95% interval over {n} targets), Wilcoxon p = " + ("n/a" if np.isnan(p) else f"{p:.2g}") + "." + few)
