"""Ground-truth banks for LDS: a full model, random training subsets, models retrained on them, and their outputs.

On disk (`banks/<name>/`, small enough to commit):

    bank.json                        recipe + key, dataset + content hash, alpha, M, seeds, noise sets, timesteps,
                                     targets ("val:3", "gen:17"), model hash, hardware, build time, status
    masks.npy                        bool (M, N): which training images subset j holds
    targets.npz                      images float32 (T, C, H, W) in [-1, 1], keys ("val/3", "gen/17"; a text-
                                     conditional model's generated targets carry their prompt: "gen/17/p=...")
    model/                           the full model (a DDPMPipeline folder, safetensors; a LoRA checkpoint's
                                     lora/ and prompts.json, linking to its base pipeline): the model to attribute
    run/                             optional (`bank checkpoints`): the full model retrained with intermediate
                                     checkpoints (run.json, epoch-E/), its last one equal to model/ bit for bit;
                                     for the checkpoint methods (TracIn family) and the per-checkpoint LDS study
    outputs/subset-JJJ-seed-S.npz    F of one retrained model, float64 (R noise sets, T targets), written atomically

`Bank.load(name_or_path).F` assembles them into (M subsets, S seeds, R noise sets, T targets), NaN where a
retrain has not finished. The retrained models themselves live in the cache (`store.retrain_dir`).

F is the Simple loss, mean (eps_hat - eps)^2, of each target averaged over K uniform timesteps (0, 10, ..., 990
for K=100), with the noise of set r drawn from the key f"bank/{r}/{target key}" (`noise_for`), so two noise sets
measure F's own sampling noise and two seeds the retraining noise. Subset j is drawn from its own generator
(subset_seed, j), so a bank can grow (more subsets or seeds) without changing the rows it has.

Every retrain of a bank (its full model included) uses the recipe's `randomness` (train.py): `crn-slots` (common
random numbers in the full run's batches, the default for new banks: every draw tied to the image it belongs to,
and a removed image leaves only its own batch changed), `crn` (the same draws, re-batched after each removal) or
`stream` (a bank.json that does not record it, as the banks built before CRN existed). A bank never mixes them:
resuming it with another one is refused. Its targets can be copied from another bank (`targets_from`) so two banks
measure F on the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset
from ..errors import AttributionError, ConfigError, FileFormatError, one_line
from ..features.timesteps import noise_for, select_timesteps
from ..fileio import (
    atomic_dir,
    read_json,
    read_npy,
    read_npz,
    reason,
    save_npy,
    save_npz,
    write_json,
)
from ..models import SCHEDULES, load_model
from ..models.checkpoint import resolve_checkpoint
from ..options import opt
from ..sampling import DEFAULT_GUIDANCE, Prompt, gen_key, sample
from ..store import identity_differences, retrain_dir
from ..train import index_hash, train
from .ray_engine import (
    ProgressMeter,
    RayCluster,
    hardware,
    probe_address,
    single_thread,
)
from .recipes import Recipe, recipe_from_run

REPO_ROOT = Path(__file__).resolve().parents[2]
BANKS_DIR = REPO_ROOT / "banks"


def banks_dir() -> Path:
    """Where named banks live: $ATTRIBUTION_BANKS, else banks/ in the repository."""
    return Path(os.environ.get("ATTRIBUTION_BANKS") or BANKS_DIR)
NOISE_SEED = 0
FULL_SEED = 0


# -- subsets -------------------------------------------------------------------------------------------------------

def restore_fix(folder: Path) -> str:
    """What to do about a bank file that cannot be read: bank.json, masks.npy and targets.npz are not remade by a
    rerun of the build (it resumes from them), so the file is restored."""
    folder = Path(folder)
    if folder.resolve().parent == BANKS_DIR.resolve():
        return f"restore it with `git checkout banks/{folder.name}` or from a copy of the bank"
    return "restore it from a copy of the bank"


def random_masks(n: int, m: int, alpha: float, seed: int) -> np.ndarray:
    """(m, n) bool: row j holds round(alpha * n) images drawn without replacement by the generator (seed, j)."""
    k = int(round(alpha * n))
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, np.random.default_rng([seed, j]).choice(n, size=k, replace=False)] = True
    return masks


SUBSET_FILE = ("give a .npy (M, N) bool mask, a .npy (M, k) integer array, or a text file with one subset's indices "
               "per line")


def read_subset_file(path: str | Path, n: int) -> np.ndarray:
    """(M, n) bool masks from a .npy (M, n) bool array, a .npy (M, k) integer array of index lists, or a text file
    with one subset per line (whitespace- or comma-separated indices). One ConfigError line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"subset file not found: {path}")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            rows = list(arr) if arr.ndim == 2 else None
            if rows is None:
                raise ValueError(f"a 2-D array is needed, got shape {arr.shape}")
        else:
            rows = [np.array(ln.replace(",", " ").split(), dtype=np.int64)
                    for ln in path.read_text().splitlines() if ln.strip()]
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path} is not a subset file ({reason(exc)}); {SUBSET_FILE}") from None
    if not rows:
        raise ConfigError(f"{path} holds no subsets; {SUBSET_FILE}")
    if len(rows) and np.asarray(rows[0]).dtype == bool:
        masks = np.asarray(rows, dtype=bool)
        if masks.shape[1] != n:
            raise ConfigError(f"{path} masks have {masks.shape[1]} columns but the training split has {n} images")
        return masks
    masks = np.zeros((len(rows), n), dtype=bool)
    for j, row in enumerate(rows):
        row = np.asarray(row)
        if not np.issubdtype(row.dtype, np.integer):
            raise ConfigError(f"{path} row {j} holds {row.dtype} values, not integer indices")
        if row.size and (row.min() < 0 or row.max() >= n):
            raise ConfigError(f"{path} row {j} has indices outside 0..{n - 1} (the training split)")
        if len(np.unique(row)) != len(row):
            raise ConfigError(f"{path} row {j} has duplicate indices")
        masks[j, row] = True
    return masks


def check_masks(masks: np.ndarray, source: str) -> None:
    if len(masks) < 2:
        raise ConfigError(f"{source}: LDS needs at least 2 subsets, got {len(masks)}")
    sizes = masks.sum(1)
    if sizes.min() == 0:
        raise ConfigError(f"{source}: subset {int(np.argmin(sizes))} is empty")


# -- the model output F --------------------------------------------------------------------------------------------

def f_timesteps(k: int, num_timesteps: int = 1000) -> torch.Tensor:

    return select_timesteps("uniform", k, num_timesteps)


@torch.no_grad()
def simple_loss_outputs(model, images: torch.Tensor, keys: list[str], k: int, noise_sets: int,
                        batch: int = 4096) -> np.ndarray:
    """F (noise_sets, T) float64: each target's Simple loss averaged over the K uniform timesteps, noise set r
    drawn from f"bank/{r}/{key}"; in the model's diffusion space (a latent model encodes the images first) and
    with each key's condition (a text-conditional model reads the prompt from the key or its prompt table)."""

    ts = f_timesteps(k, model.num_timesteps)
    shape = tuple(model.latent_shape)
    per_batch = max(1, batch // len(ts))
    out = np.zeros((noise_sets, len(keys)), dtype=np.float64)
    params = model.parameters()
    for r in range(noise_sets):
        for b in range(0, len(keys), per_batch):
            z0 = model.encode(images[b:b + per_batch].float().to(model.device)).float().cpu()
            cond = model.condition(keys[b:b + per_batch])  # a prompt per target for text-conditional models
            eps = noise_for([f"bank/{r}/{key}" for key in keys[b:b + per_batch]], ts, shape, NOISE_SEED)
            n = len(z0)
            tt = ts.repeat(n)
            z0r = z0[:, None].expand(n, len(ts), *shape).reshape(-1, *shape)
            eps = eps.reshape(-1, *shape)
            cond = None if cond is None else {name: v.repeat_interleave(len(ts), 0) for name, v in cond.items()}
            x_t = model.schedule.add_noise(z0r.to(model.device), eps.to(model.device), tt.to(model.device))
            raw = model.raw(params, x_t, tt.to(model.device), cond)
            pred, target = model.schedule.f_pair(raw, z0r, eps, x_t, tt.to(model.device))
            loss = ((pred.float().cpu() - target.cpu()) ** 2).flatten(1).mean(1).double().reshape(n, len(ts))
            out[r, b:b + n] = loss.mean(1).numpy()
    return out


# -- the bank's configuration --------------------------------------------------------------------------------------

@dataclass
class BankSpec:
    """What to build (validated; bad values raise one ConfigError line). The fields with help are the `bank build`
    command's options (options.py: argparse from the schema); the recipe comes from --recipe or --run."""

    name: str = field(default="", metadata=opt("bank name (folder banks/NAME unless --out)", required=True))
    recipe: Recipe | None = None
    out: str | None = field(default=None, metadata=opt("bank folder (default banks/NAME)"))
    subsets: int = field(default=24, metadata=opt("M, random subsets"))
    seeds: int = field(default=2, metadata=opt("training seeds per subset"))
    alpha: float = field(default=0.5, metadata=opt("subset fraction of the training split"))
    subset_seed: int = field(default=0, metadata=opt("seed of the random subsets"))
    subset_file: str | None = field(default=None, metadata=opt(
        "subsets from a file instead: .npy (M, N) bool, .npy (M, k) indices, or text with one subset's indices per "
        "line"))
    val_targets: int = field(default=100, metadata=opt("validation images val:0.."))
    gen_targets: int = field(default=100, metadata=opt("images of the full model, seeds 0.."))
    gen_steps: int = field(default=50, metadata=opt("DDPM steps of the generated targets"))
    noise_sets: int = field(default=2, metadata=opt("R, independent noise sets for F"))
    timesteps: int = field(default=100, metadata=opt("K uniform timesteps of F"))
    # a run folder whose final checkpoint is the bank's model (else trained here): --run
    full_model: str | None = field(default=None, metadata=opt(
        "a training run folder: its final checkpoint is the bank's model, subsets are retrained with its run.json "
        "recipe", flag="--run", metavar="RUN"))
    guidance: float = field(default=DEFAULT_GUIDANCE, metadata=opt(
        "classifier-free guidance of a text-conditional model's generated targets"))
    targets_from: str | None = field(default=None, metadata=opt(
        "take the targets from another bank (name or folder: same data, the same val:/gen: keys) instead of making "
        "them, so that both banks measure F on the same images", metavar="BANK"))

    def __post_init__(self):
        if self.recipe is None:
            raise ConfigError("a bank needs a retraining recipe: give --recipe NAME or --run RUN_FOLDER")
        if not self.name or "/" in self.name:
            raise ConfigError(f"bank name must be a plain name, got {self.name!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha must be within (0, 1), got {self.alpha}")
        if self.subset_file is None and self.subsets < 2:
            raise ConfigError(f"--subsets must be at least 2 (LDS correlates across subsets), got {self.subsets}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        if self.noise_sets < 1:
            raise ConfigError(f"--noise-sets must be at least 1, got {self.noise_sets}")
        if self.val_targets < 0 or self.gen_targets < 0 or self.val_targets + self.gen_targets < 1:
            raise ConfigError("--val-targets and --gen-targets must be >= 0 with at least one target in all")
        if not 1 <= self.timesteps <= 1000:
            raise ConfigError(f"--timesteps must be within 1..1000, got {self.timesteps}")
        if self.gen_steps < 1:
            raise ConfigError(f"--gen-steps must be at least 1, got {self.gen_steps}")
        if not self.guidance >= 1:
            raise ConfigError(f"--guidance must be at least 1 (1 = no classifier-free guidance), got {self.guidance}")

    @property
    def folder(self) -> Path:
        return Path(self.out) if self.out else banks_dir() / self.name

    def target_specs(self) -> list[str]:
        return [f"val:{i}" for i in range(self.val_targets)] + [f"gen:{s}" for s in range(self.gen_targets)]


def _identity(spec: BankSpec, recipe_key: str, dataset_hash: str, subset_source: str,
              full_model_hash: str | None = None, targets_from: dict | None = None) -> dict:
    """What every output of the bank depends on (a rerun with another identity is refused)."""
    return {"recipe": spec.recipe.identity(), "recipe_key": recipe_key, "dataset_hash": dataset_hash,
            "subsets_from": subset_source, "noise_sets": spec.noise_sets, "timesteps": spec.timesteps,
            "targets": spec.target_specs(), "gen_steps": spec.gen_steps,
            "sampler": SCHEDULES[spec.recipe.schedule].samplers[0],
            "full_model_seed": FULL_SEED, "F": "simple loss, uniform timesteps, noise key bank/{r}/{target key}",
            **({"full_model": full_model_hash} if full_model_hash else {}),
            **({"targets_from": targets_from} if targets_from else {}),
            **({"gen_prompts": "class prompts in equal blocks of seeds", "gen_guidance": spec.guidance}
               if spec.recipe.pipeline else {})}


def _targets_hash(keys: list[str], images: np.ndarray) -> str:
    h = hashlib.sha256("\n".join(keys).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def retrain_job(recipe: Recipe, recipe_key: str, indices: list[int] | None, n: int, seed: int, subset,
                cache_root: str | None = None, device: str = "cpu") -> dict:
    """What `train_task` needs to retrain `recipe` on `indices` (None: the full split of n images) at `seed`, into
    the cache folder keyed by (recipe key, index set, seed) that every bank and study shares. A LoRA recipe's base
    pipeline goes as an absolute path: workers may run elsewhere."""
    worker_recipe = asdict(recipe)
    if recipe.pipeline:
        worker_recipe["pipeline"] = str(Path(recipe.pipeline).resolve())
    ih = index_hash(indices, n)
    return {"subset": subset, "seed": seed, "indices": indices, "index_set_hash": ih, "n_train": n,
            "run_dir": str(retrain_dir(recipe_key, ih, seed, cache_root)), "recipe": worker_recipe,
            "recipe_key": recipe_key, "device": device}


def default_randomness(folder: Path, run: str | None = None) -> str:
    """`randomness` when not asked for: a bank being resumed or grown keeps its own (a bank never mixes the two),
    a bank of a training run (`--run`) retrains the way that run was trained, a new bank uses common random
    numbers."""
    if (folder / "bank.json").is_file():
        return bank_randomness(read_json(folder / "bank.json", restore_fix(folder), f"{folder.name}/bank.json"))
    return recipe_from_run(run).randomness if run else "crn-slots"


def copied_targets(source: str, wanted: list[str], dataset_hash: str, guidance: float | None,
                   ) -> tuple[np.ndarray, list[str], dict]:
    """(images, keys, provenance) of the targets `wanted` ("val:3", "gen:17") taken from another bank's
    targets.npz, so that two banks (e.g. stream and CRN) measure F on the same images. Its generated targets are
    that bank's model's samples, not this bank's. One ConfigError line when that bank lacks one."""
    other = Bank.load(source)
    name = other.meta["name"]
    if other.meta["identity"]["dataset_hash"] != dataset_hash:
        raise ConfigError(f"bank {name} was built on other training data ({other.meta['identity']['dataset_hash']}, "
                          f"this bank's: {dataset_hash}); its targets cannot be taken")
    if guidance is not None and other.gen_guidance != guidance:
        raise ConfigError(f"bank {name}'s generated targets were sampled with guidance {other.gen_guidance:g}; "
                          f"give --guidance {other.gen_guidance:g} to take them")
    rows = {":".join(k.split("/")[:2]): r for r, k in enumerate(other.target_keys)}
    missing = [w for w in wanted if w not in rows]
    if missing:
        raise ConfigError(f"bank {name} has no target {missing[0]} ({len(missing)} of the {len(wanted)} asked for "
                          f"are missing; it has {len(rows)}: lower --val-targets / --gen-targets)")
    picked = [rows[w] for w in wanted]
    return (other.target_images[picked], [other.target_keys[r] for r in picked],
            {"bank": name, "targets_hash": other.meta["targets_hash"]})


# -- Ray tasks (module-level, so workers import them) --------------------------------------------------------------

def train_task(job: dict) -> dict:
    """Train one model unless its completion marker exists; write the marker last; return it."""

    if job["device"] == "cpu":
        single_thread()
    run = Path(job["run_dir"])
    marker = run / "retrain.json"
    if marker.is_file():
        return read_json(marker)
    start = time.time()
    recipe = Recipe(**job["recipe"])
    train(recipe.train_config(run, job["indices"], job["seed"], job["device"]))
    info = {"recipe_key": job["recipe_key"], "recipe": job["recipe"], "seed": job["seed"], "subset": job["subset"],
            "index_set_hash": job["index_set_hash"], "n_train": job["n_train"], "hardware": hardware(job["device"]),
            "train_seconds": round(time.time() - start, 1)}
    write_json(marker, info)
    return info


def measure_task(job: dict, images: np.ndarray, keys: list[str], k: int, noise_sets: int) -> dict:
    """F (R, T) of one trained model."""

    if job["device"] == "cpu":
        single_thread()
    start = time.time()
    model = load_model(job["run_dir"], job["device"])
    f = simple_loss_outputs(model, torch.from_numpy(images), keys, k, noise_sets)
    return {"F": f, "model_hash": model.identity(), "seconds": round(time.time() - start, 1)}


# -- building ------------------------------------------------------------------------------------------------------

def _output_path(folder: Path, j: int, s: int) -> Path:
    return folder / "outputs" / f"subset-{j:03d}-seed-{s}.npz"


def build_bank(spec: BankSpec, address: str | None = None, num_cpus: int | None = None,
               progress=None, log=print, cache_root: str | None = None, cluster: RayCluster | None = None,
               ) -> Path:
    """Build (or resume, or grow) a bank; return its folder. Finished models and outputs are never redone.

    Runs on `cluster` when given (an entered `RayCluster`, left running), else on its own `RayCluster(address,
    num_cpus)` for the length of the call."""

    start = time.time()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and cluster is None:
        probe_address(address)  # before anything is written
    recipe = spec.recipe
    data = load_dataset(recipe.dataset, "train", recipe.resolution)
    n = len(data)
    dataset_hash = data.content_hash
    if spec.subset_file:
        masks = read_subset_file(spec.subset_file, n)
        check_masks(masks, spec.subset_file)
        subset_source = "file:" + hashlib.sha256(np.packbits(masks).tobytes()).hexdigest()[:16]
    else:
        masks = random_masks(n, spec.subsets, spec.alpha, spec.subset_seed)
        subset_source = f"random alpha={spec.alpha} seed={spec.subset_seed}"
    key = recipe.key(dataset_hash)
    full_hash = None
    if spec.full_model:
        run_randomness = recipe_from_run(spec.full_model).randomness
        if run_randomness != recipe.randomness:
            raise ConfigError(f"{spec.full_model} was trained with {run_randomness} randomness; its bank's subsets "
                              f"must be retrained the same way: give --randomness {run_randomness} (or leave it "
                              f"out), or train the run again with --randomness {recipe.randomness}")
        full_hash = resolve_checkpoint(spec.full_model).content_hash()
    copied = None
    if spec.targets_from:
        copied = copied_targets(spec.targets_from, spec.target_specs(), dataset_hash,
                                spec.guidance if recipe.pipeline else None)
    identity = _identity(spec, key, dataset_hash, subset_source, full_hash, copied[2] if copied else None)
    folder = spec.folder
    meta_path = folder / "bank.json"
    meta = {}
    if meta_path.is_file():
        meta = read_json(meta_path, restore_fix(folder), f"{folder.name}/bank.json")
        had = bank_randomness(meta)
        if had != recipe.randomness:
            raise ConfigError(f"{folder} holds {had} retrains; resuming it with --randomness {recipe.randomness} "
                              f"would mix {had} and {recipe.randomness} retrains in one bank: give --randomness "
                              f"{had} (or leave it out), or build another bank (another --name)")
        differences = identity_differences(meta.get("identity", {}), identity)
        if differences:
            raise ConfigError(f"{folder} holds a bank built another way ({'; '.join(differences[:3])}); "
                              "use another --name/--out or delete it")
        # the subsets are the identity's (subset_source), so masks.npy missing (a build killed before writing it)
        # is written again below; one that is there must be readable
        old = masks if not (folder / "masks.npy").is_file() else read_npy(
            folder / "masks.npy", restore_fix(folder), f"{folder.name}/masks.npy")
        if old.ndim != 2:
            raise FileFormatError(f"{folder.name}/masks.npy holds an array of shape {old.shape}, not (subsets, "
                                  f"training images) masks; {restore_fix(folder)}")
        rows = min(len(old), len(masks))
        if old.shape[1] != n or not np.array_equal(old[:rows], masks[:rows]):
            raise ConfigError(f"{folder}/masks.npy differs from the subsets asked for; use another --name/--out")
        if len(old) > len(masks):
            masks = old  # never shrink a bank
    seeds = list(range(max(spec.seeds, len(meta.get("seeds", [])))))
    device = "cpu"
    meta.update({"name": spec.name, "identity": identity, "recipe_name": recipe.name, "dataset": recipe.dataset,
                 "randomness": recipe.randomness, "n_train": n, "alpha": float(masks.sum(1).mean() / n),
                 "subsets": len(masks), "seeds": seeds,
                 "noise_sets": spec.noise_sets, "timesteps": f_timesteps(spec.timesteps).tolist(),
                 "targets": spec.target_specs(), "status": "building",
                 "F_shape": ["subsets", "seeds", "noise_sets", "targets"]})
    write_json(meta_path, meta)
    save_npy(folder / "masks.npy", masks)

    def job(subset: int | None, seed: int) -> dict:
        indices = None if subset is None else [int(i) for i in np.flatnonzero(masks[subset])]
        return retrain_job(recipe, key, indices, n, seed, subset, cache_root, device)

    full = job(None, FULL_SEED)
    subset_jobs = [job(j, s) for j in range(len(masks)) for s in seeds]
    to_measure = [jb for jb in subset_jobs if not _output_path(folder, jb["subset"], jb["seed"]).is_file()]
    targets_file = folder / "targets.npz"
    model_ready = (folder / "model" / "unet").is_dir() and targets_file.is_file()
    trained = {jb["run_dir"] for jb in [full, *subset_jobs] if (Path(jb["run_dir"]) / "retrain.json").is_file()}
    if not model_ready and spec.full_model:  # the run's own model is the bank's model: nothing to train
        _make_targets(spec, folder, {"run_dir": spec.full_model}, data, meta, copied)
        model_ready = True
    if not model_ready and full["run_dir"] in trained:  # killed between training the full model and its targets
        _make_targets(spec, folder, full, data, meta, copied)
        model_ready = True
    to_train = [jb for jb in ([] if model_ready else [full]) + to_measure if jb["run_dir"] not in trained]
    total = len(to_train) + len(to_measure) + (0 if model_ready else 1)
    log(f"bank {spec.name}: {len(masks)} subsets x {len(seeds)} seeds of {recipe.name} on {recipe.dataset} "
        f"(N={n}); {len(subset_jobs) - len(to_measure)} outputs already done, {len(to_train)} models to train, "
        f"{len(to_measure)} to measure -> {folder}")
    if total == 0:
        _finish(folder, meta, start)
        return folder

    import ray  # lazy: importing Ray takes seconds, and only a build needs it

    with contextlib.nullcontext(cluster) if cluster else RayCluster(address, num_cpus) as cluster:
        log(f"running on {cluster.describe()}")
        if cluster.uses_gpu():
            device = "cuda"
            for jb in [full, *subset_jobs]:
                jb["device"] = device
        opts = cluster.task_options()
        train_remote = ray.remote(train_task).options(**opts)
        measure_remote = ray.remote(measure_task).options(**opts)
        meter = ProgressMeter(total, progress, "tasks")
        slots = cluster.slots()
        queue = list(to_train)
        ready_to_measure = [jb for jb in to_measure if jb["run_dir"] in trained]
        waiting = {jb["run_dir"]: jb for jb in to_measure if jb["run_dir"] not in trained}
        targets_ref = None
        if model_ready:
            z = read_npz(targets_file, ("images", "keys"), restore_fix(folder), f"{folder.name}/targets.npz")
            targets_ref = (ray.put(z["images"]), [str(k) for k in z["keys"]])
        in_flight: dict = {}
        failures: list[str] = []
        while queue or ready_to_measure or in_flight:
            while len(in_flight) < slots and (queue or (ready_to_measure and targets_ref)):
                if ready_to_measure and targets_ref:
                    jb = ready_to_measure.pop(0)
                    ref = measure_remote.remote(jb, targets_ref[0], targets_ref[1], spec.timesteps, spec.noise_sets)
                    in_flight[ref] = ("measure", jb)
                else:
                    jb = queue.pop(0)
                    in_flight[train_remote.remote(jb)] = ("train", jb)
            if not in_flight:
                break
            done_refs, _ = ray.wait(list(in_flight), num_returns=1)
            kind, jb = in_flight.pop(done_refs[0])
            name = "full model" if jb["subset"] is None else f"subset {jb['subset']} seed {jb['seed']}"
            try:
                result = ray.get(done_refs[0])
            except Exception as exc:  # retries exhausted: report, keep the rest going
                failures.append(f"{kind} {name}: {one_line(exc)}")
                meter.step(note=f"FAILED {kind} {name}")
                continue
            if kind == "train" and jb["subset"] is None:
                meter.step(note=f"trained the full model in {result['train_seconds']}s; making targets")
                images, keys = _make_targets(spec, folder, jb, data, meta, copied)
                targets_ref = (ray.put(images), keys)
                meter.step(note="targets ready")
            elif kind == "train":
                meter.step(note=f"trained {name} in {result['train_seconds']}s")
                if jb["run_dir"] in waiting:
                    ready_to_measure.append(waiting.pop(jb["run_dir"]))
            else:
                save_npz(_output_path(folder, jb["subset"], jb["seed"]), compress=False, F=result["F"],
                         model_hash=np.array(result["model_hash"]), recipe_key=np.array(key),
                         targets_hash=np.array(meta["targets_hash"]), subset=np.array(jb["subset"]),
                         seed=np.array(jb["seed"]))
                meter.step(note=f"measured {name} in {result['seconds']}s")
        meta["hardware"] = hardware(device)
        meta["ray"] = cluster.describe()
    meta = _finish(folder, meta, start, failures)
    if failures:
        raise ConfigError(f"{len(failures)} task(s) failed after retries, e.g. {failures[0]}; rerun to retry them "
                          "(finished work is kept)")
    return folder


def _make_targets(spec: BankSpec, folder: Path, full_job: dict, data, meta: dict,
                  copied: tuple[np.ndarray, list[str], dict] | None = None) -> tuple[np.ndarray, list[str]]:
    """Copy the full model into the bank, generate its targets (or take `copied`: `copied_targets`), write
    targets.npz; return (images, keys)."""

    src = Path(full_job["run_dir"])
    epoch = sorted(src.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    with atomic_dir(folder / "model") as tmp:
        copy_checkpoint(epoch, tmp, folder / "model")
    model = load_model(str(folder / "model"), "cpu")
    torch.set_num_threads(1)
    if copied is not None:
        images, keys = copied[0].astype(np.float32), list(copied[1])
    else:
        parts, keys = [], []
        if spec.val_targets:
            val = load_dataset(spec.recipe.dataset, "val", model.resolution, model.channels)
            if spec.val_targets > len(val):
                raise ConfigError(f"--val-targets {spec.val_targets} exceeds the {len(val)} validation images")
            parts.append(val.tensors(list(range(spec.val_targets))).numpy())
            keys += [f"val/{i}" for i in range(spec.val_targets)]
        if spec.gen_targets:
            images, gen_keys = generate_targets(model, spec.gen_targets, spec.gen_steps, spec.guidance)
            parts.append(images)
            keys += gen_keys
        images = np.concatenate(parts).astype(np.float32)
    meta["targets_hash"] = _targets_hash(keys, images)
    if (src / "retrain.json").is_file():
        meta["model"] = {"path": "model", "content_hash": model.identity(), "seed": FULL_SEED,
                         "train": read_json(src / "retrain.json")}
    else:
        run = read_json(src / "run.json")
        meta["model"] = {"path": "model", "content_hash": model.identity(), "from_run": str(src),
                         "seed": run["config"].get("seed"), "checkpoint": epoch.name}
    save_npz(folder / "targets.npz", images=images, keys=np.array(keys))
    write_json(folder / "bank.json", meta)
    return images, keys


def copy_checkpoint(src: Path, tmp: Path, final: Path) -> None:
    """Copy a checkpoint folder's files into `tmp` (to become `final`); a relative symbolic link (a LoRA
    checkpoint's link to its base pipeline's component) is re-made relative to `final`, so the copy shares the base
    instead of duplicating it."""
    for entry in sorted(src.iterdir()):
        if entry.is_symlink():
            os.symlink(os.path.relpath(entry.resolve(), final.resolve()), tmp / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, tmp / entry.name)
        else:
            shutil.copy2(entry, tmp / entry.name)


def generate_targets(model, n: int, steps: int, guidance: float = DEFAULT_GUIDANCE) -> tuple[np.ndarray, list[str]]:
    """n images of the model (its schedule's default sampler, seeds 0..n-1) and their keys. A text-conditional
    model generates from its finetuning set's class prompts in contiguous blocks of seeds (n/P each, the first
    classes one more when P does not divide n), with classifier-free guidance `guidance`; each key carries its
    prompt ("gen/7/p=a handwritten digit 5"; the guidance is the bank's, recorded in bank.json)."""
    if not model.conditional:
        traj = sample(model, n, 0, steps)
        return traj.final, [gen_key(s) for s in traj.seeds]
    prompts = model.class_prompts()
    if not prompts:
        raise ConfigError(f"{model.spec} is text-conditional but records no class prompts (prompts.json); "
                          "build its bank with --gen-targets 0, or from a checkpoint made by train-lora")
    sizes = [n // len(prompts) + (c < n % len(prompts)) for c in range(len(prompts))]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts, keys = [], []
    for text, lo, hi in zip(prompts, bounds[:-1], bounds[1:]):
        if hi > lo:
            prompt = Prompt(text, guidance=guidance)
            traj = sample(model, int(hi - lo), int(lo), steps, prompt=prompt)
            parts.append(traj.final)
            keys += [gen_key(s, prompt) for s in traj.seeds]
    return np.concatenate(parts), keys


def _finish(folder: Path, meta: dict, start: float, failures: list[str] | None = None) -> dict:
    done = len(list((folder / "outputs").glob("subset-*-seed-*.npz")))
    expected = meta["subsets"] * len(meta["seeds"])
    meta["outputs_done"] = done
    meta["status"] = "complete" if done == expected and not failures else "partial"
    meta["build_seconds"] = round(meta.get("build_seconds", 0) + time.time() - start, 1)
    write_json(folder / "bank.json", meta)
    return meta


# -- loading -------------------------------------------------------------------------------------------------------

def bank_recipe(meta: dict) -> Recipe:
    """The retraining recipe a bank was built with (from bank.json)."""
    return Recipe(name=meta["recipe_name"], **meta["identity"]["recipe"])


def bank_randomness(meta: dict) -> str:
    """How a bank's models were retrained (bank.json): crn-slots, crn or stream; stream when it does not say
    (every bank built
    before CRN existed, and stream recipes' identities, which leave it out to keep their keys)."""
    return meta.get("identity", {}).get("recipe", {}).get("randomness", "stream")


def build_checkpoint_run(bank: "Bank", checkpoints: int = 5, log=print) -> Path:
    """Retrain the bank's full model with `checkpoints` evenly spaced saved epochs into `<bank>/run` (atomic).

    Same recipe, data and seed as the bank's model; saving checkpoints draws no random numbers, so the last
    checkpoint must equal `model/` bit for bit: that is checked, and a run that differs (another torch version or
    machine) is refused rather than shipped. A bank made from a run folder (`bank build --run`) already has one."""
    if checkpoints < 2:
        raise ConfigError(f"--checkpoints must be at least 2 (a checkpoint study compares several), got {checkpoints}")
    if bank.run_dir is not None:
        log(f"bank {bank.meta['name']} already has a checkpoint run: {bank.run_dir}")
        return bank.run_dir
    if bank.meta.get("model", {}).get("from_run"):
        raise ConfigError(f"bank {bank.meta['name']} was made from the run {bank.meta['model']['from_run']}, which "
                          "has too few checkpoints; retrain that run with more checkpoints")

    recipe = bank_recipe(bank.meta)
    if recipe.epochs < 2:
        raise ConfigError(f"bank {bank.meta['name']}'s recipe trains {recipe.epochs} epoch; a checkpoint run needs at "
                          "least 2 epochs (checkpoints are saved at epoch ends)")
    want = resolve_checkpoint(bank.model_spec).content_hash()
    start = time.time()
    with atomic_dir(bank.path / "run") as tmp:
        train(recipe.train_config(tmp, None, FULL_SEED, checkpoints=checkpoints))
        epochs = sorted(tmp.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
        got = resolve_checkpoint(str(epochs[-1])).content_hash()
        run_json = read_json(tmp / "run.json")
        run_json["config"]["out"] = "run"  # the bank's own folder, not the temporary one (no absolute paths)
        write_json(tmp / "run.json", run_json)
        if got != want:
            raise ConfigError(f"the retrained full model ({got}) differs from the bank's model ({want}): training is "
                              "not reproducible on this machine or torch version; nothing was written")
    meta = read_json(bank.path / "bank.json")
    meta["run"] = {"path": "run", "checkpoints": [p.name for p in epochs], "final_equals_model": want,
                   "train_seconds": round(time.time() - start, 1), "hardware": hardware("cpu")}
    write_json(bank.path / "bank.json", meta)
    bank.meta = meta
    log(f"bank {bank.meta['name']}: checkpoint run with {', '.join(p.name for p in epochs)}; the last equals the "
        f"bank's model ({want}); {time.time() - start:.0f} s")
    return bank.path / "run"


def bank_for_model(content_hash: str, root: Path | None = None) -> str | None:
    """The name of a bank whose model has these weights (`DiffusionModel.identity()`), or None."""
    for name in list_banks(root):
        meta = _meta_or_none((root or banks_dir()) / name)
        if meta is not None and meta.get("model", {}).get("content_hash") == content_hash:
            return name
    return None


def _meta_or_none(folder: Path) -> dict | None:
    """A bank's bank.json, None when it cannot be read: listing and matching banks skip over a damaged one, whose
    one-line error comes when it is loaded."""
    try:
        return read_json(folder / "bank.json")
    except AttributionError:
        return None


def list_banks(root: Path | None = None) -> list[str]:
    """Names of the banks under banks/ that have targets (a build that got past its full model): first those
    retrained with common random numbers (their ground truth is less noisy: BENCHMARKS.md), then the others; in
    each group the half-subset banks (alpha 0.5, the LDS protocol the trust caption quotes) before other fractions,
    then by name. `bank_for_model` picks the first bank of a model in this order."""
    root = root or banks_dir()
    names = [p.parent.name for p in root.glob("*/bank.json") if (p.parent / "targets.npz").is_file()]
    metas = {n: _meta_or_none(root / n) or {} for n in names}
    return sorted(names, key=lambda n: (bank_randomness(metas[n]) == "stream",
                                        abs(float(metas[n].get("alpha", 0.5)) - 0.5) > 1e-9, n))


@dataclass
class Bank:
    """A loaded bank. F: float64 (M, S, R, T), NaN where a retrain is not done; done: bool (M, S)."""

    path: Path
    meta: dict
    masks: np.ndarray
    target_images: np.ndarray
    target_keys: list[str]
    F: np.ndarray
    done: np.ndarray

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Bank":
        path = Path(name_or_path)
        if not (path / "bank.json").is_file():
            path = banks_dir() / str(name_or_path)
        if not (path / "bank.json").is_file():
            known = sorted(p.parent.name for p in banks_dir().glob("*/bank.json"))
            raise ConfigError(f"no bank {str(name_or_path)!r} (no bank.json there); known banks: "
                              f"{', '.join(known) or 'none'}; build one with `python -m attribution bank build`")
        name = path.name
        restore = restore_fix(path)
        meta = read_json(path / "bank.json", restore, f"{name}/bank.json")
        absent = [k for k, kind in (("seeds", list), ("noise_sets", int), ("targets_hash", str))
                  if not isinstance(meta.get(k), kind)]
        if absent:
            raise FileFormatError(f"{name}/bank.json has no valid {', '.join(absent)}; {restore}")
        masks = read_npy(path / "masks.npy", restore, f"{name}/masks.npy")
        if masks.ndim != 2 or masks.dtype != bool:
            raise FileFormatError(f"{name}/masks.npy holds a {masks.dtype} array of shape {masks.shape}, not the "
                                  f"(subsets, training images) bool masks; {restore}")
        if not (path / "targets.npz").is_file():
            raise ConfigError(f"bank {path.name} has no targets yet (its full model is still training); rerun the "
                              "build")
        z = read_npz(path / "targets.npz", ("images", "keys"), restore, f"{name}/targets.npz")
        images, keys = z["images"], [str(k) for k in z["keys"]]
        if images.ndim != 4 or len(images) != len(keys):
            raise FileFormatError(f"{name}/targets.npz holds {len(keys)} keys and images of shape {images.shape}, "
                                  f"not one (C, H, W) image per key; {restore}")
        seeds = meta["seeds"]
        F = np.full((len(masks), len(seeds), meta["noise_sets"], len(keys)), np.nan)
        done = np.zeros((len(masks), len(seeds)), dtype=bool)
        for j in range(len(masks)):
            for s in seeds:
                p = _output_path(path, j, s)
                if not p.is_file():
                    continue
                label = f"{name}/outputs/{p.name}"
                redo = "delete it and rerun the bank's `bank build` command (it measures only that output again)"
                z = read_npz(p, ("F", "targets_hash"), redo, label)
                if str(z["targets_hash"]) != meta["targets_hash"] or z["F"].shape != F.shape[2:]:
                    raise FileFormatError(f"{label} was computed for other targets (F of shape {z['F'].shape}, "
                                          f"the bank needs {F.shape[2:]}); {redo}")
                F[j, seeds.index(s)] = z["F"]
                done[j, seeds.index(s)] = True
        return cls(path, meta, masks, images, keys, F, done)

    @property
    def targets(self) -> list[str]:
        return [k.replace("/", ":") for k in self.target_keys]

    @property
    def model_spec(self) -> str:
        return str(self.path / "model")

    @property
    def run_dir(self) -> Path | None:
        """The full model's run with intermediate checkpoints (`bank checkpoints`), or None."""
        run = self.path / "run"
        if (run / "run.json").is_file():
            return run
        src = self.meta.get("model", {}).get("from_run")
        return Path(src) if src and (Path(src) / "run.json").is_file() else None

    def model_spec_for(self, over_checkpoints: bool) -> str:
        """The checkpoint spec a method attributes: the model, or for a method over a run's checkpoints the run
        (whose last checkpoint is the model)."""
        if not over_checkpoints:
            return self.model_spec
        if self.run_dir is None:
            raise ConfigError(f"bank {self.meta['name']} has no run with intermediate checkpoints, which the "
                              "checkpoint methods need; make it with `python -m attribution bank checkpoints "
                              f"--name {self.meta['name']}` (retrains the full model once)")
        return str(self.run_dir)

    def checkpoint_specs(self) -> list[str]:
        """Every checkpoint of the run, oldest first (the per-checkpoint LDS study)."""

        if self.run_dir is None:
            self.model_spec_for(True)  # the one-line error
        return list(resolve_checkpoint(str(self.run_dir)).siblings)

    @property
    def gen_guidance(self) -> float:
        """The classifier-free guidance a text-conditional model's generated targets were sampled with."""
        return float(self.meta.get("identity", {}).get("gen_guidance", DEFAULT_GUIDANCE))

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    def split(self, kind: str) -> np.ndarray:
        """bool (T,): the targets of one kind, "val" or "gen"."""
        return np.array([k.split("/")[0] == kind for k in self.target_keys])

    def finished(self) -> "Bank":
        """The same bank restricted to the subsets whose every seed is done."""
        rows = self.done.all(1)
        return Bank(self.path, self.meta, self.masks[rows], self.target_images, self.target_keys, self.F[rows],
                    self.done[rows])

    def summary(self) -> str:
        m, s, r, t = self.F.shape
        val, gen = int(self.split("val").sum()), int(self.split("gen").sum())
        lines = [f"bank {self.meta['name']} at {self.path} ({self.meta['status']})",
                 f"  recipe {self.meta['recipe_name']} (key {self.meta['identity']['recipe_key']}, "
                 f"{bank_randomness(self.meta)} randomness) on {self.dataset}, N={self.masks.shape[1]} "
                 f"training images, alpha={self.meta['alpha']:.3f}",
                 f"  F: {m} subsets x {s} seeds x {r} noise sets x {t} targets ({val} val, {gen} gen); "
                 f"{int(self.done.sum())}/{self.done.size} retrains done, {int(self.done.all(1).sum())} subsets "
                 "complete",
                 f"  F = Simple loss over {len(self.meta['timesteps'])} uniform timesteps",
                 f"  model: {self.model_spec}"]
        if self.run_dir is not None:
            epochs = [spec.rsplit("@", 1)[-1] for spec in self.checkpoint_specs()]
            lines.append(f"  checkpoint run: {self.run_dir} ({', '.join(epochs)})")
        if "build_seconds" in self.meta:
            lines.append(f"  built in {self.meta['build_seconds'] / 60:.1f} min on {self.meta.get('hardware', '?')}")
        return "\n".join(lines)
