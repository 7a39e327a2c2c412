"""`python -m attribution` as a user runs it: bad input ends with one `error:` line and exit status 2, never a
traceback; generation is byte-for-byte reproducible.

Every command runs in its own interpreter, and each one spends 3-9 s of CPU importing torch and diffusers, so the
subprocess commands run once, two at a time, in a module fixture, and the tests then check their results. A few
more bad-input cases call `attribution.cli.main` in-process (the same code path minus the interpreter start).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds per command; each takes ~5-15 s on two busy CPU cores


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-m", "attribution", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def commands(tmp: Path, run: Path) -> dict[str, list[str]]:
    """Name -> arguments, for every command this module checks. Inputs are written under `tmp`."""
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((run / "epoch-2" / "unet" / "config.json").read_text())
    (tmp / "indices.txt").write_text("0 1 2 5000\n")
    (tmp / "notes.png").write_text("this is a text file\n")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (tmp / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    score = ["score", "--checkpoint", str(run), "--cache", str(tmp / "cache"), "--device", "cpu"]
    gen = ["generate", "--checkpoint", str(run), "--n", "2", "--seed", "0", "--device", "cpu"]
    return {
        "unknown checkpoint": ["generate", "--checkpoint", str(tmp / "no-such-model"), "--out", str(tmp / "g")],
        "checkpoint without weights": ["generate", "--checkpoint", str(no_weights), "--out", str(tmp / "g")],
        "unknown dataset": ["train", "--dataset", "no-such-data", "--out", str(tmp / "t1"), "--preset", "tiny"],
        "index out of range": ["train", "--dataset", "digits", "--indices", str(tmp / "indices.txt"),
                               "--out", str(tmp / "t2"), "--preset", "tiny", "--epochs", "1"],
        "truncated image": [*score, "--target", str(tmp / "cut.png")],
        "generate 1": [*gen, "--out", str(tmp / "gen1")],
        "generate 2": [*gen, "--out", str(tmp / "gen2")],
    }


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cmds = commands(tmp, tiny_run)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args, tmp) for name, args in cmds.items()}
        out = {name: f.result() for name, f in futures.items()}
    out["tmp"] = tmp
    return out


# (case, text the error line must contain, whether stderr must be that line alone)
ERRORS = [
    ("unknown checkpoint", "checkpoint not found", True),
    ("checkpoint without weights", "no weights", True),
    # `train` first prints what it is about to do ("training a tiny DDPM on ..."), then fails on the data.
    ("unknown dataset", "unknown dataset 'no-such-data'", False),
    ("index out of range", "outside 0..1617", False),
    ("truncated image", "cut.png is truncated or corrupt", True),
]


@pytest.mark.parametrize("case,expected,alone", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.slow
def test_bad_input_gives_one_error_line(results, case, expected, alone):
    proc = results[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]], proc.stderr
    assert expected in lines[-1]
    if alone:
        assert len(lines) == 1, proc.stderr
    assert "error" not in proc.stdout.lower()


def test_generate_is_byte_reproducible(results):
    tmp = results["tmp"]
    for name in ("generate 1", "generate 2"):
        assert results[name].returncode == 0, results[name].stderr
        assert "Traceback" not in results[name].stderr
    one, two = tmp / "gen1", tmp / "gen2"
    names = sorted(p.name for p in one.iterdir())
    assert names == ["samples.npz", "seed-000000.png", "seed-000001.png"]
    assert sorted(p.name for p in two.iterdir()) == names
    for png in ("seed-000000.png", "seed-000001.png"):
        assert (one / png).read_bytes() == (two / png).read_bytes()
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        assert a["images"].shape == (2, 16, 16) and a["images"].dtype == np.uint8
        assert np.array_equal(a["images"], b["images"])
        assert list(a["seeds"]) == [0, 1]
        assert not np.array_equal(a["images"][0], a["images"][1])
        # The PNGs hold the same pixels as samples.npz.
        assert np.array_equal(np.asarray(Image.open(one / "seed-000001.png")), a["images"][1])


# -- more bad input, in-process ---------------------------------------------------------------------------------------

def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    from attribution.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_text_file_as_target_image(results, tiny_run, capsys):
    tmp = results["tmp"]
    code, lines = run_main(["score", "--checkpoint", str(tiny_run), "--cache", str(tmp / "cache"), "--device", "cpu",
                            "--target", str(tmp / "notes.png")], capsys)
    assert code == 2
    assert lines == [lines[-1]] and lines[-1].startswith("error: notes.png is not an image file")


@pytest.mark.parametrize("option,value,expected", [("--n", "0", "--n must be at least 1"),
                                                   ("--steps", "5000", "--steps must be within 1..1000")])
def test_generate_bad_options(results, tiny_run, capsys, option, value, expected):
    argv = ["generate", "--checkpoint", str(tiny_run), "--out", str(results["tmp"] / "bad"), "--device", "cpu",
            option, value]
    code, lines = run_main(argv, capsys)
    assert code == 2
    # `generate` says what it will do before sample() checks the options, so the error is the last line.
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]] and expected in lines[-1]
    assert not (results["tmp"] / "bad").exists()


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_app_command_serves_the_app_and_stops_with_it():
    """`python -m attribution app` starts the Streamlit server: its health endpoint answers "ok". Stopping the
    command stops the server: nothing it started outlives it, and the port no longer answers."""
    import time
    import urllib.request

    from browser_support import free_port

    def health() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                return r.read()
        except OSError:
            return None

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "attribution", "app", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    started = set()
    try:
        deadline, answer = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None and answer != b"ok":
            answer = health()
            if answer != b"ok":
                time.sleep(0.3)
        assert answer == b"ok"
        started = _descendants(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and (any(_alive(p) for p in started) or health() is not None):
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)]
    assert health() is None
