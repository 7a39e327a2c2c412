"""Ground-truth banks on Ray: end-to-end tiny builds, idempotent reruns, retried tasks, bad input, F's definition.

The tiny bank (recipe "tiny-test": a 30k-parameter UNet, one epoch; 4 subsets x 2 seeds, 2 val + 2 generated
targets, F over 5 timesteps and 2 noise sets) is built once per module on a local Ray with 2 CPUs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.errors import ConfigError
from attribution.evaluation.bank import Bank, BankSpec, build_bank, copied_targets, default_randomness, \
    random_masks, read_subset_file, simple_loss_outputs
from attribution.evaluation.ray_engine import probe_address
from attribution.evaluation.recipes import RECIPES, Recipe, get_recipe, recipe_from_run

N_DIGITS = 1618


def tiny_spec(out: Path) -> BankSpec:
    return BankSpec(name="tiny", recipe=get_recipe("tiny-test"), out=str(out), subsets=4, seeds=2,
                    val_targets=2, gen_targets=2, gen_steps=3, noise_sets=2, timesteps=5)


@pytest.fixture(scope="module")
def tiny_bank(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("bank")
    folder = build_bank(tiny_spec(root / "bank"), log=lambda m: None, cache_root=str(root / "cache"),
                        cluster=local_ray)
    return folder, root / "cache"


# -- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [({"alpha": 0.0}, "--alpha"), ({"alpha": 1.0}, "--alpha"),
                                     ({"subsets": 1}, "at least 2"), ({"seeds": 0}, "--seeds"),
                                     ({"noise_sets": 0}, "--noise-sets"), ({"timesteps": 0}, "--timesteps"),
                                     ({"val_targets": 0, "gen_targets": 0}, "at least one target"),
                                     ({"guidance": 0.5}, "--guidance")])
def test_bad_bank_options_one_line(kw, msg, tmp_path):
    with pytest.raises(ConfigError, match=msg) as exc:
        BankSpec(**{**tiny_spec(tmp_path).__dict__, **kw})
    assert "\n" not in str(exc.value)


def test_bad_subset_files(tmp_path):
    (tmp_path / "range.txt").write_text("0 1 2\n5 6 99\n")
    with pytest.raises(ConfigError, match="row 1 has indices outside 0..9"):
        read_subset_file(tmp_path / "range.txt", 10)
    (tmp_path / "dup.txt").write_text("0 1 2\n3, 3, 4\n")
    with pytest.raises(ConfigError, match="row 1 has duplicate indices"):
        read_subset_file(tmp_path / "dup.txt", 10)
    np.save(tmp_path / "cols.npy", np.ones((3, 7), dtype=bool))
    with pytest.raises(ConfigError, match="7 columns"):
        read_subset_file(tmp_path / "cols.npy", 10)
    np.save(tmp_path / "idx.npy", np.array([[0, 2], [1, 3]]))
    masks = read_subset_file(tmp_path / "idx.npy", 5)
    assert masks.tolist() == [[True, False, True, False, False], [False, True, False, True, False]]


def test_bad_bank_input_is_refused_before_anything_is_written(tiny_run, tmp_path):
    """Mixing CRN and stream retrains in one bank (resuming it with the other randomness, or a --run bank retrained
    another way than its run), a subset file with indices outside the training set: one line, nothing written."""
    from dataclasses import asdict, replace

    stream = get_recipe("tiny-test")
    crn = replace(stream, randomness="crn")
    folder = tmp_path / "stream-bank"  # a bank.json as every bank built before CRN: no randomness recorded
    folder.mkdir()
    (folder / "bank.json").write_text(json.dumps({"name": "s", "recipe_name": "tiny-test",
                                                  "identity": {"recipe": stream.identity()}}))
    before = (folder / "bank.json").read_bytes()
    assert default_randomness(folder) == "stream"  # resuming keeps the bank's own
    assert default_randomness(tmp_path / "new") == "crn-slots"  # a new bank
    assert default_randomness(tmp_path / "new", str(tiny_run)) == "stream"  # the run's own (its run.json: none)
    cases = [(BankSpec(**{**tiny_spec(folder).__dict__, "recipe": crn}), "holds stream retrains; resuming it with "
                                                                         "--randomness crn would mix"),
             (BankSpec(**{**tiny_spec(tmp_path / "run-bank").__dict__, "recipe": replace(
                 recipe_from_run(tiny_run), randomness="crn"), "full_model": str(tiny_run)}),
              "was trained with stream randomness"),
             (BankSpec(**{**tiny_spec(tmp_path / "file-bank").__dict__, "subset_file": str(tmp_path / "s.txt")}),
              "row 1 has indices outside 0..1617")]
    (tmp_path / "s.txt").write_text("0 1 2\n3 4 1618\n")
    for spec, msg in cases:
        with pytest.raises(ConfigError, match=msg) as exc:
            build_bank(spec, log=lambda m: None, cache_root=str(tmp_path / "cache"))
        assert "\n" not in str(exc.value)
    assert (folder / "bank.json").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["bank.json"]
    assert not (tmp_path / "run-bank").exists() and not (tmp_path / "file-bank").exists()
    assert not (tmp_path / "cache").exists()
    assert asdict(crn)["randomness"] == "crn" and "randomness" not in stream.identity()


def test_targets_from_the_digits_bank_are_its_targets():
    """`--targets-from digits` (a CRN digits bank beside the stream one): the same 100 + 100 images and keys, so
    both banks measure F on identical targets; a target the other bank lacks is one line."""
    from attribution.evaluation.bank import _targets_hash

    bank = Bank.load("digits")
    wanted = [f"val:{i}" for i in range(100)] + [f"gen:{s}" for s in range(100)]
    images, keys, origin = copied_targets("digits", wanted, bank.meta["identity"]["dataset_hash"], None)
    assert keys == bank.target_keys and np.array_equal(images, bank.target_images)
    assert _targets_hash(keys, images) == bank.meta["targets_hash"] == origin["targets_hash"]
    assert origin["bank"] == "digits"
    with pytest.raises(ConfigError, match="bank digits has no target gen:100"):
        copied_targets("digits", wanted + ["gen:100"], bank.meta["identity"]["dataset_hash"], None)
    with pytest.raises(ConfigError, match="other training data"):
        copied_targets("digits", wanted, "another-hash", None)


def test_unanswered_ray_address_fails_fast_without_writing(tmp_path, capsys):
    from attribution.cli import main

    with socket_closed_port() as port:
        start = time.monotonic()
        rc = main(["bank", "build", "--name", "x", "--recipe", "tiny-test", "--out", str(tmp_path / "b"),
                   "--ray-address", f"127.0.0.1:{port}"])
        assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no Ray cluster answers at 127.0.0.1:") and "\n" not in err
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="HOST:PORT"):
        probe_address("localhost")


class socket_closed_port:
    """A port on which nothing listens (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc):
        return False


def test_recipes_validate_and_hash(tiny_run):
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(ConfigError, match="--epochs"):
        Recipe("bad", "digits", epochs=0)
    r = RECIPES["digits-eval"]
    assert r.key("h1") == Recipe(**{**r.__dict__, "name": "other"}).key("h1")  # the name is only a label
    assert r.key("h1") != r.key("h2") and r.key("h1") != Recipe(**{**r.__dict__, "lr": 3e-3}).key("h1")
    from_run = recipe_from_run(tiny_run)
    assert (from_run.preset, from_run.epochs, from_run.batch_size) == ("tiny", 2, 128)
    with pytest.raises(ConfigError, match="no run.json"):
        recipe_from_run(tiny_run / "epoch-1")


def test_random_masks_are_half_subsets_and_grow_stably():
    m = random_masks(101, 5, 0.5, seed=3)
    assert m.shape == (5, 101) and (m.sum(1) == 50).all()  # round(50.5) = 50 (banker's rounding)
    assert np.array_equal(random_masks(101, 8, 0.5, seed=3)[:5], m)  # growing M keeps the existing rows
    assert not np.array_equal(m[0], m[1])


# -- F -------------------------------------------------------------------------------------------------------------

def test_simple_loss_equals_direct_computation():
    from attribution.features.timesteps import noise_for
    from attribution.models.schedules import DDPMSchedule
    from attribution.models.pixel_ddpm import PixelDDPM
    from attribution.models.schedules import DEFAULT_SCHEDULE
    from attribution.models.presets import unet_for

    torch.manual_seed(0)
    model = PixelDDPM(unet_for(16, 1, "tiny"), DDPMSchedule.from_config(DEFAULT_SCHEDULE), None, "cpu")
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    keys = ["val/0", "val/1", "gen/5"]
    got = simple_loss_outputs(model, images, keys, k=4, noise_sets=2, batch=8)  # 2 targets per forward batch
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    want = np.zeros((2, 3))
    for r in range(2):
        for m, key in enumerate(keys):
            losses = []
            for t in (0, 250, 500, 750):
                eps = noise_for([f"bank/{r}/{key}"], torch.tensor([t]), (1, 16, 16), 0)[0]
                x_t = (abar[t].sqrt() * images[m:m + 1] + (1 - abar[t]).sqrt() * eps).float()
                with torch.no_grad():
                    eps_hat = model.unet(x_t, torch.tensor([t])).sample
                losses.append(float(((eps_hat - eps) ** 2).mean()))
            want[r, m] = np.mean(losses)
    # float32 forward passes in batches of different sizes: agreement to ~1e-6 relative, not bitwise
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-4  # the two noise sets are different draws


# -- end to end on Ray ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_bank_end_to_end(tiny_bank):
    folder, cache = tiny_bank
    bank = Bank.load(folder)
    assert bank.F.shape == (4, 2, 2, 4) and np.isfinite(bank.F).all() and bank.done.all()
    assert bank.meta["status"] == "complete"
    assert bank.masks.shape == (4, N_DIGITS) and (bank.masks.sum(1) == N_DIGITS // 2).all()
    assert bank.targets == ["val:0", "val:1", "gen:0", "gen:1"]
    assert np.array_equal(bank.masks, random_masks(N_DIGITS, 4, 0.5, 0))
    # F of one retrained model equals a direct computation on the model stored in the cache
    from attribution.models import load_model
    from attribution.store import retrain_dir
    from attribution.train import index_hash

    idx = np.flatnonzero(bank.masks[2]).tolist()
    run = retrain_dir(bank.meta["identity"]["recipe_key"], index_hash(idx, N_DIGITS), 1, cache)
    marker = (run / "retrain.json").read_text()
    assert '"seed": 1' in marker and '"subset": 2' in marker and "hardware" in marker
    direct = simple_loss_outputs(load_model(str(run), "cpu"), torch.from_numpy(bank.target_images),
                                 bank.target_keys, 5, 2)
    np.testing.assert_allclose(bank.F[2, 1], direct, rtol=1e-6)
    # seeds differ, and the bank's model is the full-data model
    assert np.abs(bank.F[:, 0] - bank.F[:, 1]).max() > 0
    assert load_model(bank.model_spec, "cpu").identity() == bank.meta["model"]["content_hash"]


@pytest.mark.slow
def test_rerun_retrains_nothing_and_growing_reuses_models(tiny_bank, tmp_path, local_ray):
    folder, cache = tiny_bank
    files = sorted(cache.glob("retrain/*/*/retrain.json")) + sorted((folder / "outputs").glob("*.npz"))
    before = {p: p.stat().st_mtime_ns for p in files}
    logs = []
    start = time.monotonic()
    build_bank(tiny_spec(folder), num_cpus=2, log=logs.append, cache_root=str(cache))
    assert time.monotonic() - start < 10  # nothing to do: Ray is not even started
    assert "0 models to train, 0 to measure" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # another bank with the same recipe and subsets reuses every retrained model: only F is measured
    spec = tiny_spec(tmp_path / "other")
    spec.noise_sets = 1
    logs = []
    build_bank(spec, log=logs.append, cache_root=str(cache), cluster=local_ray)
    assert "0 models to train, 8 to measure" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in files} == before
    np.testing.assert_array_equal(Bank.load(tmp_path / "other").F[..., 0, :], Bank.load(folder).F[..., 0, :])
    # a bank folder built another way is refused, naming the difference
    with pytest.raises(ConfigError, match="noise_sets: 2 there, 1 asked"):
        build_bank(BankSpec(**{**tiny_spec(folder).__dict__, "noise_sets": 1}), log=lambda m: None,
                   cache_root=str(cache))


@pytest.mark.slow
def test_crn_bank_beside_a_stream_bank_with_its_targets(tiny_bank, tmp_path, local_ray, capsys):
    """A CRN bank that takes the stream bank's targets: every retrain (the full model included) is a CRN one,
    recorded as such; F is measured on the same images. Resuming the stream bank from the command line keeps its
    randomness by default and refuses the other one in one line."""
    from dataclasses import replace

    from attribution.cli import main

    folder, cache = tiny_bank
    spec = BankSpec(**{**tiny_spec(tmp_path / "crn").__dict__, "recipe": replace(get_recipe("tiny-test"),
                                                                                  randomness="crn"),
                       "subsets": 2, "seeds": 1, "targets_from": str(folder)})
    build_bank(spec, log=lambda m: None, cache_root=str(cache), cluster=local_ray)
    crn, stream = Bank.load(tmp_path / "crn"), Bank.load(folder)
    assert crn.meta["randomness"] == "crn" and stream.meta["randomness"] == "stream"
    assert (crn.meta["identity"]["recipe"]["randomness"] == "crn" and
            "randomness" not in stream.meta["identity"]["recipe"])
    assert crn.meta["identity"]["targets_from"] == {"bank": "tiny", "targets_hash": stream.meta["targets_hash"]}
    assert crn.target_keys == stream.target_keys and np.array_equal(crn.target_images, stream.target_images)
    assert crn.meta["model"]["content_hash"] != stream.meta["model"]["content_hash"]  # another full model
    assert crn.meta["model"]["train"]["recipe"]["randomness"] == "crn"
    runs = [Path(p).parent for p in sorted(cache.glob(f"retrain/{crn.meta['identity']['recipe_key']}/*/run.json"))]
    assert len(runs) == 3  # the full model and 2 subsets, in their own cache folders
    assert all(json.loads((r / "run.json").read_text())["config"]["randomness"] == "crn" for r in runs)
    assert np.isfinite(crn.F).all() and "crn randomness" in crn.summary()
    # the command line: resuming the stream bank keeps its randomness; asking for the other one is refused
    base = ["bank", "build", "--name", "tiny", "--recipe", "tiny-test", "--out", str(folder), "--subsets", "4",
            "--seeds", "2", "--val-targets", "2", "--gen-targets", "2", "--gen-steps", "3", "--timesteps", "5",
            "--cache", str(cache)]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--randomness", "crn"]) == 2
    err = capsys.readouterr().err.strip()
    assert "would mix stream and crn retrains in one bank" in err and "\n" not in err


@pytest.mark.slow
def test_bank_from_a_run_folder_attributes_that_run(tiny_run, tmp_path, local_ray):
    from attribution.models.checkpoint import resolve_checkpoint

    spec = BankSpec(name="run", recipe=recipe_from_run(tiny_run), out=str(tmp_path / "bank"), subsets=2, seeds=1,
                    val_targets=1, gen_targets=1, gen_steps=2, noise_sets=1, timesteps=3, full_model=str(tiny_run))
    logs = []
    build_bank(spec, log=logs.append, cache_root=str(tmp_path / "cache"), cluster=local_ray)
    assert "2 models to train" in logs[0]  # the run's own model is not retrained
    bank = Bank.load(tmp_path / "bank")
    assert bank.meta["model"]["content_hash"] == resolve_checkpoint(str(tiny_run)).content_hash()
    assert bank.meta["identity"]["recipe"]["epochs"] == 2 and np.isfinite(bank.F).all()
    retrained = sorted((tmp_path / "cache").glob("retrain/*/*/retrain.json"))
    assert len(retrained) == 2 and all('"epochs": 2' in p.read_text() for p in retrained)


@pytest.mark.slow
def test_external_ray_cluster_gives_identical_F(tiny_bank, tmp_path):
    folder, _ = tiny_bank
    temp = Path(f"/tmp/rt{os.getpid()}")  # short: Ray's socket paths must stay under 107 characters
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--port=0", "--num-cpus=2", "--block",
                             "--include-dashboard=false", f"--temp-dir={temp}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        address, lines = None, []
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"--address='([^']+)'", line)
            address = m.group(1) if m else None
        assert address, "".join(lines[-20:])
        # the CLI in its own process (this one holds the module's local Ray), with a fresh cache so every model
        # is retrained on the external cluster; the module bank's first 2 subsets at seed 0 (subset j's mask is
        # drawn from (subset seed, j), whatever the number of subsets)
        out = tmp_path / "bank"
        cmd = [sys.executable, "-m", "attribution", "bank", "build", "--name", "tiny", "--recipe", "tiny-test",
               "--subsets", "2", "--seeds", "1", "--val-targets", "2", "--gen-targets", "2", "--gen-steps", "3",
               "--timesteps", "5", "--out", str(out), "--cache", str(tmp_path / "cache"), "--ray-address", address,
               "--randomness", "stream"]  # as the module's bank (a new bank's default is crn)
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Ray cluster at" in Bank.load(out).meta["ray"]
        mine, module = Bank.load(out), Bank.load(folder)
        assert np.array_equal(mine.masks, module.masks[:2]) and mine.done.all()
        np.testing.assert_array_equal(mine.F, module.F[:2, :1])  # bitwise: same code, one thread
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_banks_retrained_with_common_random_numbers_are_listed_first(tmp_path):
    """The Evaluation page opens on the first bank listed: a CRN bank before the stream ones, else by name."""
    import json

    from attribution.evaluation.bank import list_banks

    for name, randomness in (("a-stream", None), ("b-crn", "crn-slots"), ("c-old", None), ("d-unfinished", "crn")):
        folder = tmp_path / name
        folder.mkdir()
        recipe = {} if randomness is None else {"randomness": randomness}
        (folder / "bank.json").write_text(json.dumps({"identity": {"recipe": recipe}}))
        if name != "d-unfinished":  # no targets yet: not listed
            (folder / "targets.npz").write_bytes(b"")
    assert list_banks(tmp_path) == ["b-crn", "a-stream", "c-old"]
