"""The dataset registry: built-in datasets that ship offline, plus user folders and files.

A dataset spec is a string:

| spec | what it is | model resolution |
|---|---|---|
| `digits` | scikit-learn `load_digits`: 1797 grayscale 8x8 digits, upscaled (bicubic) to 16x16 | 16 |
| `digits:5,6,7` | a subset of the digit classes (the full set's split, restricted) | 16 |
| `animals` | animal-mnist 0.4 (MIT): 10,000 white-on-black silhouettes, 28x28, 10 classes | 28 |
| `animals-2` | the two animal classes in `ANIMALS_2` (2,000 images), mirroring the D-TRAK paper's CIFAR-2 | 28 |
| `animals:cat,dog` | any subset of animal classes, named or numbered | 28 |
| `cifar10:ROOT` | CIFAR-10 from the python batches under ROOT (`cifar-10-batches-py/`), never downloaded | 32 |
| `cifar2:ROOT` | CIFAR-2 as in the paper: automobile vs horse, 5,000 train (of 10,000) / 1,000 val | 32 |
| `folder:PATH` | ImageFolder-style: one subfolder per class (or `train/` and `val/` holding those) | image size |
| `npz:PATH` | an .npz with `images` (uint8 N x H x W [x C]) and optional `labels` | image size |

Splits: every built-in has `train` and `val`. Built-in validation sets are fixed, seeded, stratified 10% hold-outs
(CIFAR uses its test batch); index order within a split follows the source order, so index i is stable.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DatasetError, ImageError
from .images import (
    IMAGE_SUFFIXES,
    convert_pixels,
    image_to_pixels,
    load_npz_images,
    open_image,
    pixels_to_pil,
    pixels_to_tensor,
)
from .safe_pickle import safe_loads

SPLITS = ("train", "val")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMALS_2 = ("bird", "elephant")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_2 = ("automobile", "horse")
VAL_FRACTION = 0.1
SPLIT_SEED = 0

# Built-in names offered by the app (user datasets are typed in as `folder:PATH` etc.).
BUILTIN_DATASETS = ("digits", "animals-2", "animals")


@dataclass
class ImageDataset:
    """Images at model resolution with labels, in a stable order.

    Attributes:
        spec: the dataset spec it was loaded from, e.g. "digits" or "folder:/data/art".
        split: "train" or "val".
        pixels: uint8 array (N, R, R, C), what the model sees (read-only).
        labels: int64 array (N,), -1 where unknown.
        class_names: names for label values 0..len-1.
        source_index: int64 array (N,), each image's index in the source collection (for credit and lookup).
    """

    spec: str
    split: str
    pixels: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source_index: np.ndarray
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.pixels.flags.writeable = False
        self.labels.flags.writeable = False

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[3])

    def tensors(self, indices=None) -> torch.Tensor:
        """Model inputs in [-1, 1], shape (n, C, R, R), for `indices` (default: all)."""
        pix = self.pixels if indices is None else self.pixels[np.asarray(indices)]
        return pixels_to_tensor(pix)

    def label_name(self, i: int) -> str:
        lab = int(self.labels[i])
        return self.class_names[lab] if 0 <= lab < len(self.class_names) else "?"

    def thumbnail(self, i: int, size: int = 64) -> Image.Image:
        return pixels_to_pil(self.pixels[i], size)

    def check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise DatasetError(f"index {i} is out of range for {self.spec} {self.split} ({len(self)} images)")
        return int(i)

    @functools.cached_property
    def content_hash(self) -> str:
        """A short hash of pixels and labels: the dataset's identity in cache keys."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.pixels).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]


def parse_spec(spec: str) -> tuple[str, str]:
    """'folder:/x' -> ('folder', '/x'); 'digits' -> ('digits', '')."""
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    return kind.lower(), arg


def native_resolution(spec: str) -> int | None:
    """The resolution a dataset is shown and trained at by default (None: the images' own size)."""
    kind, _ = parse_spec(spec)
    return {"digits": 16, "animals": 28, "animals-2": 28, "cifar10": 32, "cifar2": 32}.get(kind)


def load_dataset(spec: str, split: str = "train", resolution: int | None = None,
                 channels: int | None = None) -> ImageDataset:
    """Load a dataset by spec (see the module docstring) at a model resolution and channel count.

    Results are cached per arguments; arrays are read-only.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if resolution is not None and not 4 <= int(resolution) <= 1024:
        raise DatasetError(f"resolution must be between 4 and 1024, got {resolution}")
    return _load_cached(spec.strip(), split, resolution, channels)


@functools.lru_cache(maxsize=16)
def _load_cached(spec: str, split: str, resolution: int | None, channels: int | None) -> ImageDataset:
    kind, arg = parse_spec(spec)
    loaders = {"digits": _digits, "animals": _animals, "animals-2": _animals, "cifar10": _cifar, "cifar2": _cifar,
               "folder": _folder, "npz": _npz}
    if kind not in loaders:
        raise DatasetError(f"unknown dataset {spec!r}; use one of: digits, animals-2, animals, animals:CLASS,..., "
                           "cifar10:ROOT, cifar2:ROOT, folder:PATH, npz:PATH")
    if kind in ("cifar10", "cifar2", "folder", "npz") and not arg:
        raise DatasetError(f"dataset {kind!r} needs a path: {kind}:PATH")
    images, labels, class_names, source_index, notes = loaders[kind](kind, arg, split)
    res = resolution or native_resolution(spec) or images.shape[1]
    ch = channels or images.shape[3]
    pixels = convert_pixels(images, int(res), int(ch))
    return ImageDataset(spec, split, pixels, labels.astype(np.int64), list(class_names),
                        source_index.astype(np.int64), notes)


def _stratified_val(labels: np.ndarray) -> np.ndarray:
    """A fixed, seeded, stratified validation mask (10% of each class)."""
    rng = np.random.default_rng(SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[rng.choice(idx, size=max(1, round(len(idx) * VAL_FRACTION)), replace=False)] = True
    return mask


def _split(images, labels, split, names, notes=()):
    val = _stratified_val(labels)
    keep = val if split == "val" else ~val
    idx = np.flatnonzero(keep)
    return images[idx], labels[idx], names, idx, list(notes)


def _digits(kind, arg, split):
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes a second to import; only digits needs it

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1), 0..16 -> 0..255
    note = ["scikit-learn digits (8x8) upscaled bicubically to the model resolution"]
    if not arg:
        return _split(images, d.target, split, [str(i) for i in range(10)], note)
    # digits:5,6,7,8,9 (a class subset, as animals:CLASS,...): the split of the full set, restricted; labels
    # 0..n-1 in the order given, class names the digits themselves
    chosen = []
    for part in arg.split(","):
        if not (part.strip().isdigit() and int(part) < 10):
            raise DatasetError(f"unknown digit class {part.strip()!r}; use digits:0,1,... with classes 0-9")
        if int(part) not in chosen:
            chosen.append(int(part))
    in_split = _stratified_val(d.target) if split == "val" else ~_stratified_val(d.target)
    keep = np.flatnonzero(in_split & np.isin(d.target, chosen))
    labels = np.array([chosen.index(int(v)) for v in d.target[keep]], dtype=np.int64)
    return images[keep], labels, [str(c) for c in chosen], keep, note


@functools.lru_cache(maxsize=1)
def _animal_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
        with (root / "animal_data_version_3.gz").open("rb") as f:
            images = safe_loads(gzip.decompress(f.read()))
        with (root / "animal_label_version_3.gz").open("rb") as f:
            labels = safe_loads(gzip.decompress(f.read()))
    except (ModuleNotFoundError, FileNotFoundError):
        raise DatasetError("the animals datasets need the animal-mnist package: "
                           "pip install --no-deps animal-mnist==0.4") from None
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def _animal_classes(kind, arg) -> tuple[str, ...]:
    if kind == "animals-2":
        return ANIMALS_2
    if not arg:
        return ANIMAL_CLASSES
    chosen = []
    for part in arg.split(","):
        part = part.strip().lower()
        if part.isdigit() and int(part) < len(ANIMAL_CLASSES):
            part = ANIMAL_CLASSES[int(part)]
        if part not in ANIMAL_CLASSES:
            raise DatasetError(f"unknown animal class {part!r}; use names from: {', '.join(ANIMAL_CLASSES)}")
        if part not in chosen:
            chosen.append(part)
    return tuple(chosen)


def _animals(kind, arg, split):
    images, labels = _animal_arrays()
    classes = _animal_classes(kind, arg)
    # The hold-out is drawn once over all 10,000 images, so every class subset shares one split: the validation
    # images of `animals-2` are never training images of `animals` or of `animals:bird,cow`.
    in_split = _stratified_val(labels) if split == "val" else ~_stratified_val(labels)
    keep = np.flatnonzero(in_split & np.isin(labels, [ANIMAL_CLASSES.index(c) for c in classes]))
    relabel = {ANIMAL_CLASSES.index(c): i for i, c in enumerate(classes)}  # 0..len(classes)-1 in the order given
    sub_labels = np.array([relabel[int(v)] for v in labels[keep]])
    return images[keep][..., None], sub_labels, list(classes), keep, ["animal-mnist 0.4 silhouettes (MIT)"]


def _cifar(kind, arg, split):
    root = Path(arg).expanduser()
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    files = ["test_batch"] if split == "val" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 python batches not found under {root} (missing {', '.join(missing)}); "
                           "download cifar-10-python.tar.gz yourself and extract it there")
    images, labels = [], []
    for f in files:
        try:
            batch = safe_loads((base / f).read_bytes(), encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as exc:
            raise DatasetError(f"{base / f} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    images, labels = np.concatenate(images), np.concatenate(labels)
    source = np.arange(len(labels))
    if kind == "cifar10":
        return images, labels, list(CIFAR_CLASSES), source, ["CIFAR-10 (Krizhevsky, 2009)"]
    # CIFAR-2 as in D-TRAK: two classes; 5,000 of their 10,000 training images and 1,000 of their 2,000 test images.
    cls = [CIFAR_CLASSES.index(c) for c in CIFAR_2]
    keep = np.flatnonzero(np.isin(labels, cls))
    n = 1000 if split == "val" else 5000
    keep = np.sort(np.random.default_rng(SPLIT_SEED).choice(keep, size=min(n, len(keep)), replace=False))
    new_labels = np.array([cls.index(int(v)) for v in labels[keep]])
    return images[keep], new_labels, list(CIFAR_2), keep, ["CIFAR-2 subset of CIFAR-10 (automobile, horse)"]


def _list_images(folder: Path) -> list[tuple[Path, str]]:
    """(file, class) pairs: one subfolder per class; files directly in `folder` get class ''."""
    items = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)  # hidden names are skipped below `folder` only, not in the path above it
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in rel.parts):
            items.append((p, rel.parts[0] if len(rel.parts) > 1 else ""))
    return items


def _folder(kind, arg, split):
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    split_roots = [root]
    if (root / "train").is_dir():
        split_roots = [root / s for s in SPLITS if (root / s).is_dir()]
        root = root / split
        if not root.is_dir():
            raise DatasetError(f"{root.parent} has train/ but no {split}/ folder")
    elif split == "val":
        raise DatasetError(f"{root} has no val/ folder; put images in {root}/train/CLASS and {root}/val/CLASS "
                           "to get a validation split")
    items = _list_images(root)
    if not items:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    # Class names from every split, so that a label means the same class in train/ and val/.
    classes = sorted({c for r in split_roots for _, c in (items if r == root else _list_images(r))})
    images, sizes, modes = [], {}, {}
    for path, _ in items:
        try:
            img = open_image(path)
        except ImageError as exc:
            raise DatasetError(f"in {root}: {exc}") from None
        sizes.setdefault(img.size, path)
        mode = "gray" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "color"
        modes.setdefault(mode, path)
        images.append(img)
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DatasetError(f"{root} mixes image sizes ({s1[0]}x{s1[1]} in {p1.name}, {s2[0]}x{s2[1]} in {p2.name}); "
                           "resize them to one size first")
    if len(modes) > 1:
        raise DatasetError(f"{root} mixes grayscale ({modes['gray'].name}) and colour ({modes['color'].name}) "
                           "images; convert them to one mode first")
    channels = 1 if "gray" in modes else 3
    w, h = next(iter(sizes))
    side = min(w, h)

    pixels = np.stack([image_to_pixels(im, side, channels) for im in images])
    labels = np.array([classes.index(c) for _, c in items])
    names = [c or "(none)" for c in classes]
    return pixels, labels, names, np.arange(len(items)), [f"{len(items)} images from {root}"]


def _npz(kind, arg, split):
    path = Path(arg).expanduser()
    if split == "val":
        val = path.with_name(path.stem + "_val.npz")
        if not val.is_file():
            raise DatasetError(f"no validation file for {path.name}; put one beside it as {val.name}")
        path = val
    try:
        images, labels = load_npz_images(path)
    except ImageError as exc:
        raise DatasetError(str(exc)) from None
    if labels is None:
        labels = np.full(len(images), -1)
        names = []
    else:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return images, labels, names, np.arange(len(images)), [f"{len(images)} images from {path}"]


def training_dataset_of(model, dataset: str | None = None) -> ImageDataset:
    """The training split a model (a `models.DiffusionModel`: its spec, resolution, channels and run info) is
    attributed against: `dataset`, else the one its training run recorded; a ConfigError when the model cannot be
    attributed against it (`DiffusionModel.check_training_set`)."""
    spec = dataset or (model.info.run_metadata().get("config", {}).get("dataset") if model.info else None)
    if not spec:
        raise ConfigError(f"{model.spec} does not record its training set; name the dataset (--dataset)")
    train = load_dataset(spec, "train", model.resolution, model.channels)
    model.check_training_set(train)  # e.g. a LoRA finetune's prompts, read by index, were made for another set
    return train
