"""Cost of a method's training-side precomputation on a bank's model: wall and CPU seconds, peak memory.

    OMP_NUM_THREADS=1 python bench/method_cost.py --bank /tmp/bank-digits-das --method ekfac --cache /tmp/das-cache

Run one method per process (peak memory is the process's). Phases timed separately: what its kind of features needs
before the rows ("prepare": the EK-FAC curvature fit for ekfac; nothing for the others), after them ("statistics":
DAS's per-row residual weights), the training features, the kernel (methods with a lambda), then the features of
the bank's targets. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from attribution import Bank, open_on_bank
from attribution.evaluation.evaluate import bank_targets


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bank", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    a = p.parse_args()
    bank = Bank.load(a.bank)
    att = open_on_bank(bank, a.method, "cpu", timesteps=a.timesteps, proj_dim=a.proj_dim, projector="sjlt",
                       cache=a.cache)
    member = att.members[0]
    phases = {}

    def timed(name, fn):
        w, c = time.perf_counter(), cpu()
        fn()
        phases[name] = {"wall_s": round(time.perf_counter() - w, 1), "cpu_s": round(cpu() - c, 1)}
        print(name, phases[name], file=sys.stderr, flush=True)

    last = [0.0]

    def progress(done, total, message):
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            print(f"  {message}: {done}/{total}", file=sys.stderr, flush=True)

    timed("prepare", lambda: member.featurizer.prepare(progress))  # the EK-FAC factors, for its kind of features
    timed("statistics", lambda: member.featurizer.finish(progress))  # DAS's residual statistics, for its kind
    timed("train_features", lambda: member.featurize(progress))
    if att.method.uses_lambda:
        timed("kernel", lambda: member.train_features().kernel)
    timed("target_features", lambda: att.target_features(bank_targets(bank)))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"method": a.method, "n_train": len(member.train), "k": a.proj_dim, "K": a.timesteps,
                      "phases": phases, "total_wall_s": round(sum(v["wall_s"] for v in phases.values()), 1),
                      "total_cpu_s": round(sum(v["cpu_s"] for v in phases.values()), 1),
                      "peak_rss_gib": round(peak_gib, 2)}))


if __name__ == "__main__":
    main()
