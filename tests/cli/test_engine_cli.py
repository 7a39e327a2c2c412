"""`python -m attribution featurize | score | self-influence` against a tiny trained run.

The training set is a 48-image .npz of digits (`--dataset npz:...`), so N=48 < k=128 and, with a small lambda,
X (X^T X + lam I)^{-1} X^T is close to the identity: a training image's top proponent is itself. Every result is
also recomputed here from the cached features.

Each interpreter spends 3-9 s of CPU importing torch and diffusers, so the subprocess commands run once, two at a
time, in a module fixture; the bad-input cases run through `attribution.cli.main` in-process (the same code path
minus the interpreter start), and the most involved one (a feature folder of another checkpoint) also as a real
subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from attribution.data import load_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds per command; each takes ~5-20 s on two busy CPU cores
SMALL_LAMBDA = 1e-6
REAL_PROCESS_CASES = ("store of another checkpoint",)
FEATURES = ["--timesteps", "2", "--proj-dim", "128", "--device", "cpu"]


def run_cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTRIBUTION_CACHE=str(cache), PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-m", "attribution", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def dirs_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_dir()} if root.exists() else set()


def assert_user_error(rc: int, stderr: str) -> str:
    """Exit status 2 and exactly one line, 'error: ...', on stderr; no traceback."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def env(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine_cli")
    digits = load_dataset("digits")
    npz = tmp / "small.npz"
    np.savez(npz, images=digits.pixels[:48], labels=digits.labels[:48])
    np.savez(tmp / "wrong_size.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    (tmp / "x.png").write_text("not an image\n")
    cache = tmp / "cache"
    base = ["--checkpoint", str(tiny_run), "--dataset", f"npz:{npz}", *FEATURES]
    # A feature folder made for the run's other checkpoint (epoch 1), in-process: only the refusal is under test.
    other_store = tmp / "epoch1-store"
    from attribution.cli import main

    assert main(["featurize", "--checkpoint", f"{tiny_run}@epoch-1", "--dataset", f"npz:{npz}", *FEATURES,
                 "--store", str(other_store)]) == 0
    env = {"tmp": tmp, "npz": npz, "cache": cache, "base": base, "other_store": other_store, "run": tiny_run,
           "other_store files": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in other_store.iterdir())}
    # Two rounds, two processes at a time: featurize beside a bad input (which fails right after its imports), then
    # score beside self-influence (which must reuse those features).
    phase1 = {"featurize": ["featurize", *base], **{case: _bad_cases(env)[case] for case in REAL_PROCESS_CASES}}
    phase2 = {
        "score": ["score", *base, "--target", "train:3", "--json", "--top", "3", "--lambda", str(SMALL_LAMBDA),
                  "--out", str(tmp / "scores.npy")],
        "self-influence": ["self-influence", *base, "--top", "3", "--out", str(tmp / "self.npy")],
    }
    results = {}
    with ThreadPoolExecutor(2) as pool:
        results.update(zip(phase1, pool.map(lambda a: run_cli(a, cache), phase1.values())))
        assert results["featurize"].returncode == 0, results["featurize"].stderr
        env["dirs after featurize"] = dirs_under(cache)
        results.update(zip(phase2, pool.map(lambda a: run_cli(a, cache), phase2.values())))
    env["dirs at the end"] = dirs_under(cache)
    env["results"] = results
    return env


def _store(env) -> Path:
    stores = [p.parent for p in env["cache"].rglob("config.json")]
    assert len(stores) == 1, stores  # featurize, score and self-influence share one feature set
    return stores[0]


def _kernel_pieces(store: Path):
    X = np.load(store / "features.npy").astype(np.float64)
    assert np.load(store / "done.npy").all()
    return X, np.linalg.eigvalsh(X @ X.T)


@pytest.mark.slow
def test_featurize_prints_its_store(env):
    res = env["results"]["featurize"]
    store = _store(env)
    assert res.stdout.strip().splitlines()[-1] == str(store)
    cfg = json.loads((store / "config.json").read_text())
    assert cfg["shape"] == [48, 128]
    assert cfg["identity"]["features"]["timesteps"] == 2 and cfg["identity"]["features"]["fn"] == "square"
    assert cfg["identity"]["features"]["projector"] == "sjlt"  # auto on a CPU


def test_score_json_and_out(env):
    res = env["results"]["score"]
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"method", "lambda", "target", "target_label", "proponents", "opponents"}
    assert out["method"] == "dtrak" and out["lambda"] == pytest.approx(SMALL_LAMBDA)
    assert out["target"] == "train:3" and out["target_label"] == str(load_dataset("digits").labels[3])
    assert 1 <= len(out["proponents"]) <= 3 and len(out["opponents"]) <= 3
    for entry in out["proponents"] + out["opponents"]:
        assert set(entry) == {"index", "label", "score"} and 0 <= entry["index"] < 48
    # Self is the top proponent: check that lambda really is small against the spectrum (so scores ~ identity row)
    X, evals = _kernel_pieces(_store(env))
    assert SMALL_LAMBDA < 1e-3 * evals.min(), evals.min()
    assert out["proponents"][0]["index"] == 3
    assert out["proponents"][0]["score"] == pytest.approx(1.0, abs=0.01)
    pro = [e["score"] for e in out["proponents"]]
    opp = [e["score"] for e in out["opponents"]]
    assert pro == sorted(pro, reverse=True) and all(s > 0 for s in pro)
    assert opp == sorted(opp) and all(s < 0 for s in opp)
    # --out: the full (targets x training images) matrix, matching the JSON and a direct computation.
    scores = np.load(env["tmp"] / "scores.npy")
    assert scores.shape == (1, 48) and scores.dtype == np.float32
    for entry in out["proponents"]:
        assert scores[0, entry["index"]] == pytest.approx(entry["score"], rel=1e-6)  # float32 copy of the same
    direct = X[3] @ np.linalg.solve(X.T @ X + SMALL_LAMBDA * np.eye(128), X.T)
    # The target's feature is recomputed in a batch of 1 (training row: batch of 32): float32 rounding ~1e-6,
    # amplified by at most s_max / s_min (~1e2) at this lambda: 1e-3 of the largest score.
    assert np.abs(scores[0] - direct).max() < 1e-3 * np.abs(direct).max()


def test_self_influence(env):
    res = env["results"]["self-influence"]
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("self-influence (D-TRAK, lambda=")
    listed = [int(m.group(1)) for m in re.finditer(r"#(\d+)", res.stdout)]
    assert len(listed) == 6  # --top 3 highest, 3 lowest
    values = np.load(env["tmp"] / "self.npy")
    assert values.shape == (48,)
    # the default lambda (0.1 x mean eigenvalue) and the leverage x_n^T (X^T X + lam I)^{-1} x_n, directly
    X, evals = _kernel_pieces(_store(env))
    lam = 0.1 * evals.mean()
    direct = np.einsum("nk,kn->n", X, np.linalg.solve(X.T @ X + lam * np.eye(128), X.T))
    np.testing.assert_allclose(values, direct, rtol=1e-4)  # float32 output and float32 kernel factors
    order = np.argsort(-direct, kind="stable")
    assert listed[:3] == order[:3].tolist() and listed[3:] == order[::-1][:3].tolist()


def _bad_cases(env) -> dict[str, list[str]]:
    tmp, base = env["tmp"], env["base"]
    fresh = [*base, "--seed", "7"]  # a config not featurized yet: nothing may be computed or written for it
    score = ["score", *base, "--target", "train:3"]
    return {
        "--fn bogus": ["score", *fresh, "--target", "train:3", "--fn", "bogus"],
        "--projector bogus": ["score", *fresh, "--target", "train:3", "--projector", "bogus"],
        "--timesteps 0": ["featurize", *fresh, "--timesteps", "0"],
        "--timesteps 5000": ["featurize", *fresh, "--timesteps", "5000"],
        "--proj-dim 0": ["featurize", *fresh, "--proj-dim", "0"],
        "--lambda 0": ["score", *fresh, "--target", "train:3", "--lambda", "0"],
        "--lambda -1": ["score", *fresh, "--target", "train:3", "--lambda", "-1"],
        "self-influence --lambda 0": ["self-influence", *fresh, "--lambda", "0"],
        "wrong-size npz": [*score, "--target", str(tmp / "wrong_size.npz")],
        "index out of range": [*score, "--target", "train:999999"],
        "text file named .png": [*score, "--target", str(tmp / "x.png")],
        "trak with square": [*score, "--method", "trak", "--fn", "square"],
        "store of another checkpoint": [*score, "--store", str(env["other_store"])],
        "--top 0": [*score, "--top", "0"],
        "score --out .txt": ["score", *fresh, "--target", "train:3", "--out", str(tmp / "scores.txt")],
        "self-influence --out .json": ["self-influence", *fresh, "--out", str(tmp / "self.json")],
    }


EXPECTED = {  # a fragment of each one-line message
    "--fn bogus": "unknown output function 'bogus'",
    "--projector bogus": "unknown projector 'bogus'",
    "--timesteps 0": "timesteps K must be positive",
    "--timesteps 5000": "within 1..1000, got 5000",
    "--proj-dim 0": "projection dimension k must be positive",
    "--lambda 0": "lambda must be a positive number",
    "--lambda -1": "lambda must be a positive number",
    "self-influence --lambda 0": "lambda must be a positive number",
    "wrong-size npz": "holds 8x8x1 images",
    "index out of range": "out of range",
    "text file named .png": "x.png",
    "trak with square": "TRAK uses the simple output function",
    "store of another checkpoint": "checkpoint",
    "--top 0": "--top must be at least 1",
    "score --out .txt": "unknown file type .txt; use .npy",  # refused before featurizing, nothing written
    "self-influence --out .json": "unknown file type .json",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, case, capsys, monkeypatch):
    from attribution.cli import main

    monkeypatch.setenv("ATTRIBUTION_CACHE", str(env["cache"]))
    args = _bad_cases(env)[case]
    before = dirs_under(env["cache"])
    store_before = sorted((p.name, p.stat().st_size) for p in env["other_store"].iterdir())
    capsys.readouterr()
    rc = main(args)
    line = assert_user_error(rc, capsys.readouterr().err)
    assert EXPECTED[case] in line, line
    assert dirs_under(env["cache"]) == before, f"{case} left a folder in the cache"
    assert sorted((p.name, p.stat().st_size) for p in env["other_store"].iterdir()) == store_before


@pytest.mark.parametrize("case", REAL_PROCESS_CASES)
def test_bad_input_in_a_real_process(env, case):
    res = env["results"][case]
    assert EXPECTED[case] in assert_user_error(res.returncode, res.stderr)
    # nothing written: the cache holds only the one feature set, and the other checkpoint's folder is untouched
    _store(env)
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in env["other_store"].iterdir()) == \
        env["other_store files"]


def test_score_and_self_influence_reuse_the_features(env):
    assert env["dirs at the end"] == env["dirs after featurize"]


def test_what_is_featurized_names_an_embedding_not_gradient_settings(tiny_run, npz12, tmp_path, capsys):
    """The line before featurizing says what the features are: an embedding's kind and size, or the gradients'
    output function, timesteps and projection (not fn=square, K=10 for pixel similarity)."""
    from attribution.cli.engine import member_progress
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions

    for method, extra, says, never in (("pixel-cos", {}, "pixel embeddings, 256 dimensions", "fn="),
                                       ("dtrak", {"timesteps": 2}, "fn=square, K=2 uniform", "embeddings")):
        att = open_attribution(RunOptions(str(tiny_run), method=method, dataset=f"npz:{npz12}", cache=str(tmp_path),
                                          **extra)).members[0]
        member_progress(att)
        line = capsys.readouterr().err.splitlines()[0]
        assert says in line and never not in line, line
