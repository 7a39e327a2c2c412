"""Bad files end in one line (issue 24, "Bad input"): every file the CLI or the app reads -- score arrays, subset and
index files, images, bank folders -- that is missing, empty, corrupt, of the wrong kind or of the wrong shape gives
one `error: ...` line (exit status 2) that names the file and says what to give instead, and leaves every file as
it was (nothing finished is deleted or rewritten).

The banks here are made by hand (bank.json, masks.npy, targets.npz, outputs/*.npz; no model, no retraining): loading
a bank reads only those files, so each case runs in well under a second.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attribution.cli import main
from attribution.errors import AttributionError

N = 1618  # the digits training split
KEYS = [f"val/{i}" for i in range(4)]


def make_bank(folder: Path) -> Path:
    """A loadable bank of 4 subsets x 2 seeds x 2 noise sets x 4 validation targets (random F)."""
    rng = np.random.default_rng(0)
    (folder / "outputs").mkdir(parents=True)
    for j in range(4):
        for s in range(2):
            np.savez(folder / "outputs" / f"subset-{j:03d}-seed-{s}.npz", F=rng.normal(size=(2, 4)),
                     targets_hash=np.array("t"))
    np.save(folder / "masks.npy", rng.random((4, N)) < 0.5)
    np.savez(folder / "targets.npz", images=rng.uniform(-1, 1, (4, 1, 16, 16)).astype(np.float32),
             keys=np.array(KEYS))
    (folder / "bank.json").write_text(json.dumps(
        {"name": folder.name, "dataset": "digits", "seeds": [0, 1], "noise_sets": 2, "targets_hash": "t",
         "status": "complete", "recipe_name": "tiny", "alpha": 0.5, "timesteps": [0, 500],
         "identity": {"recipe_key": "x"}}))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(code: int, err: str) -> str:
    """The `error:` line of a command that failed on bad input: exit status 2, no traceback, that line last and
    alone of its kind, with no line break inside."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and [ln for ln in lines if ln.startswith("error:")] == [lines[-1]], err
    return lines[-1]


OUTPUT = "outputs/subset-001-seed-0.npz"


def _write(rel: str, data: bytes):
    return lambda f: (f / rel).write_bytes(data)


def _npz(rel: str, **arrays):
    return lambda f: np.savez(f / rel, **arrays)


# (case, how the bank is damaged, file named in the line, what the line says, what it says to do)
BANK_CASES = [
    ("bank.json not JSON", _write("bank.json", b"{not json"), "bank.json", "is not valid JSON", "restore it"),
    ("bank.json empty", _write("bank.json", b""), "bank.json", "is empty", "restore it"),
    ("bank.json a list", _write("bank.json", b"[1, 2]"), "bank.json", "holds a JSON list, not an object",
     "restore it"),
    ("bank.json without seeds", _write("bank.json", json.dumps({"name": "b", "noise_sets": 2, "targets_hash": "t"})
                                       .encode()), "bank.json", "has no valid seeds", "restore it"),
    ("masks.npy missing", lambda f: (f / "masks.npy").unlink(), "masks.npy", "is missing", "restore it"),
    ("masks.npy text", _write("masks.npy", b"0 1 0 1\n"), "masks.npy", "is not a readable .npy array",
     "restore it"),
    ("masks.npy one row", lambda f: np.save(f / "masks.npy", np.ones(N, dtype=bool)), "masks.npy",
     "holds a bool array of shape (1618,), not the (subsets, training images) bool masks", "restore it"),
    ("targets.npz not a zip", _write("targets.npz", b"PK\x03\x04 cut"), "targets.npz",
     "is not a readable .npz archive", "restore it"),
    ("targets.npz without keys", _npz("targets.npz", images=np.zeros((4, 1, 16, 16), np.float32)), "targets.npz",
     "has no array keys (it holds images)", "restore it"),
    ("targets.npz keys and images differ", _npz("targets.npz", images=np.zeros((3, 1, 16, 16), np.float32),
                                                keys=np.array(KEYS)), "targets.npz",
     "holds 4 keys and images of shape (3, 1, 16, 16)", "restore it"),
    ("output empty", _write(OUTPUT, b""), OUTPUT, "is empty", "delete it and rerun the bank's `bank build`"),
    ("output text", _write(OUTPUT, b"F = 1.0\n"), OUTPUT, "is not a readable .npz archive", "delete it"),
    ("output without F", _npz(OUTPUT, G=np.zeros((2, 4))), OUTPUT, "has no array F, targets_hash", "delete it"),
    ("output of another shape", _npz(OUTPUT, F=np.zeros(3), targets_hash=np.array("t")), OUTPUT,
     "was computed for other targets (F of shape (3,), the bank needs (2, 4))", "delete it"),
]


@pytest.mark.parametrize("case,damage,file,says,fix", BANK_CASES, ids=[c[0] for c in BANK_CASES])
def test_a_damaged_bank_is_one_line_and_kept(case, damage, file, says, fix, tmp_path, capsys):
    folder = make_bank(tmp_path / "mybank")
    damage(folder)
    before = snapshot(folder)
    scores = tmp_path / "scores.npy"
    np.save(scores, np.zeros((4, N)))
    line = one_error_line(main(["lds", "--bank", str(folder), "--scores", str(scores), "--split", "val"]),
                          capsys.readouterr().err)
    assert f"mybank/{file} {says}" in line, line
    assert fix in line, line
    assert str(tmp_path) not in line  # the bank's folder name, not the machine's path
    assert snapshot(folder) == before  # nothing deleted or rewritten


def test_resuming_a_bank_with_a_damaged_bank_json_is_refused_before_writing(tmp_path):
    """`bank build` on a bank whose bank.json cannot be read stops with the same line and writes nothing (it
    rewrites bank.json and masks.npy before training)."""
    from attribution.evaluation.bank import BankSpec, build_bank
    from attribution.evaluation.recipes import get_recipe

    folder = make_bank(tmp_path / "mybank")
    (folder / "bank.json").write_bytes(b"{")
    before = snapshot(folder)
    spec = BankSpec(name="mybank", recipe=get_recipe("tiny-test"), out=str(folder), subsets=4, seeds=2,
                    val_targets=4, gen_targets=0, timesteps=2)
    with pytest.raises(AttributionError) as exc:
        build_bank(spec, log=lambda m: None, cache_root=str(tmp_path / "cache"))
    assert "mybank/bank.json is not valid JSON" in str(exc.value) and "\n" not in str(exc.value)
    assert snapshot(folder) == before and not (tmp_path / "cache").exists()


def test_a_damaged_bank_leaves_the_others_listed_and_found(tmp_path):
    """Listing banks and finding a model's bank read every bank.json: a damaged one is listed (choosing it gives
    its one line) and skipped when matching a model, instead of breaking the listing."""
    from attribution.evaluation.bank import bank_for_model, list_banks

    good = make_bank(tmp_path / "good")
    meta = json.loads((good / "bank.json").read_text())
    (good / "bank.json").write_text(json.dumps({**meta, "model": {"content_hash": "abc"}}))
    (make_bank(tmp_path / "broken") / "bank.json").write_text("{")
    assert sorted(list_banks(tmp_path)) == ["broken", "good"]
    assert bank_for_model("abc", tmp_path) == "good"


# -- score files (lds --scores) ------------------------------------------------------------------------------------

SCORE_CASES = [
    ("empty .npy", "empty.npy", lambda p: p.write_bytes(b""), "--scores empty.npy is empty"),
    ("npz without scores", "other.npz", lambda p: np.savez(p, values=np.zeros((4, N))),
     "--scores other.npz has no array scores (it holds values)"),
    ("npz that is not a zip", "cut.npz", lambda p: p.write_bytes(b"scores: 1 2 3"),
     "--scores cut.npz is not a readable .npz archive"),
    ("csv table", "ranked.csv", lambda p: p.write_text("rank,index,label,score\n1,3,7,0.5\n"),
     "--scores ranked.csv is a ranked table, not a matrix"),
    ("npz of the wrong shape", "small.npz", lambda p: np.savez(p, scores=np.zeros((2, 5))),
     "small.npz has shape (2, 5); bank mybank needs 4 targets x 1618 training images"),
    ("text scores", "words.npy", lambda p: np.save(p, np.array([["a"] * N] * 4)),
     "words.npy holds NaN, infinite or non-numeric values"),
]


@pytest.mark.parametrize("case,name,write,says", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_a_bad_score_file_is_one_line(case, name, write, says, tmp_path, capsys):
    folder = make_bank(tmp_path / "mybank")
    write(tmp_path / name)
    line = one_error_line(main(["lds", "--bank", str(folder), "--scores", str(tmp_path / name), "--split", "val"]),
                          capsys.readouterr().err)
    assert says in line, line
    if "shape" not in says and "non-numeric" not in says:
        assert "give the score matrix (targets x training images, numbers)" in line, line


def test_the_npz_that_score_writes_is_a_score_file(tmp_path, capsys):
    """`score --out FILE.npz` writes the matrix as 'scores' beside its metadata; lds --scores reads it as the .npy."""
    folder = make_bank(tmp_path / "mybank")
    scores = np.random.default_rng(1).normal(size=(4, N)).astype(np.float32)
    np.save(tmp_path / "mine.npy", scores)
    np.savez(tmp_path / "mine-too.npz", scores=scores, method=np.array(["x"] * 4), **{"lambda": np.ones(4)})
    out = []
    for name in ("mine.npy", "mine-too.npz"):
        assert main(["lds", "--bank", str(folder), "--scores", str(tmp_path / name), "--split", "val",
                     "--resamples", "10"]) == 0
        out.append(capsys.readouterr().out)
    assert out[0].replace("mine ", "mine-too ") == out[1] or out[0].split()[-6:] == out[1].split()[-6:], out


# -- subset and index files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("reader", ["subsets", "indices"])
@pytest.mark.parametrize("name,content,says", [
    ("empty.txt", b"", "holds no subsets|non-empty"),
    ("binary.txt", b"\xff\xfe\x00\x01", "utf-8"),
    ("cut.npy", b"\x93NUMPY\x01\x00", "is not a"),
])
def test_a_bad_subset_or_index_file_is_one_line(reader, name, content, says, tmp_path):
    from attribution.errors import ConfigError
    from attribution.evaluation.bank import read_subset_file
    from attribution.train import read_index_file

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as exc:
        read_subset_file(path, 10) if reader == "subsets" else read_index_file(path)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and "give a .npy" in msg
    assert path.read_bytes() == content


# -- images (uploads and image-file targets) -----------------------------------------------------------------------

def _image(mode: str, fmt: str = "PNG", size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name,data,says", [
    ("empty.png", b"", "empty.png is empty (0 bytes); give a PNG, JPEG, BMP, GIF, WebP or TIFF image"),
    ("lab.tif", _image("LAB", "TIFF"),
     "lab.tif is a LAB image, which cannot be made grayscale or RGB; save it as an RGB or grayscale PNG or JPEG"),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_bad_image_is_one_line_as_upload_and_as_file(name, data, says, channels, tmp_path):
    from app_pages._ui import read_upload
    from attribution.data import load_image_pixels

    with pytest.raises(AttributionError) as upload:
        read_upload(data, name, 16, channels)
    (tmp_path / name).write_bytes(data)
    with pytest.raises(AttributionError) as file:
        load_image_pixels(tmp_path / name, 16, channels)
    assert str(upload.value) == str(file.value) == says


def test_a_damaged_magic_parameter_file_is_one_line(tmp_path):
    from attribution.errors import CheckpointError
    from attribution.magic.runs import load_theta

    path = tmp_path / "run" / "theta.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(CheckpointError) as exc:
        load_theta(path)
    assert str(exc.value).startswith("run/theta.safetensors is not a readable MAGIC parameter file (")
    assert "\n" not in str(exc.value) and "rerun the command that wrote it" in str(exc.value)
    assert path.read_bytes().endswith(b"{bad}")


# -- the app -------------------------------------------------------------------------------------------------------

def test_the_evaluation_page_shows_a_damaged_bank_in_one_line(tiny_run, tmp_path, start_app):
    """A bank whose bank.json is damaged is still listed; the Evaluation page opening on it shows that file's one
    line instead of a traceback, and a good bank beside it opens."""
    root = tmp_path / "banks"
    make_bank(root / "broken")
    (root / "broken" / "bank.json").write_text('{"name": "broken", ')
    make_bank(root / "good")
    at = start_app(tiny_run, tmp_path / "cache", banks=root)
    at.switch_page("app_pages/evaluation.py").run()
    assert not at.exception
    assert at.selectbox(key="eval_bank").value == "broken"
    assert [e.value for e in at.error] == ["broken/bank.json is not valid JSON (Expecting property name enclosed in "
                                           "double quotes: line 1 column 20 (char 19)); restore it from a copy of "
                                           "the bank"]
    at.selectbox(key="eval_bank").set_value("good").run()
    assert not at.exception and not at.error


def test_a_remote_tasks_failure_is_quoted_in_one_line():
    from attribution.errors import one_line

    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    raise\nValueError: bad shard\n\n"
    assert one_line(RuntimeError(traceback)) == "RuntimeError: ValueError: bad shard"
    assert one_line(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200
    assert one_line(RuntimeError()) == "RuntimeError"
