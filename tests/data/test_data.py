"""Datasets: the built-ins (digits, animals), user folders, .npz files and CIFAR python batches.

Exact equality everywhere: datasets are integer pixels and labels, so there is nothing to round.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.data import ANIMAL_CLASSES, load_dataset
from attribution.data import datasets as ds
from attribution.errors import AttributionError, DatasetError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def assert_one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    assert isinstance(exc_info.value, AttributionError)
    return msg


def fresh(spec: str, split: str = "train", **kw):
    """Load bypassing the per-process cache, so two calls really read the source twice."""
    ds._load_cached.cache_clear()
    return load_dataset(spec, split, **kw)


# -- digits -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_splits():
    return load_dataset("digits", "train"), load_dataset("digits", "val")


def test_digits_split_sizes_and_source_index(digits_splits):
    train, val = digits_splits
    assert (len(train), len(val)) == (1618, 179)
    assert len(np.intersect1d(train.source_index, val.source_index)) == 0
    assert np.array_equal(np.sort(np.concatenate([train.source_index, val.source_index])), np.arange(1797))
    # Order within a split follows the source order, so index i is stable.
    assert np.all(np.diff(train.source_index) > 0) and np.all(np.diff(val.source_index) > 0)


def test_digits_pixels_labels_and_stratification(digits_splits):
    from sklearn.datasets import load_digits

    train, val = digits_splits
    src = load_digits()
    for split in (train, val):
        assert split.pixels.dtype == np.uint8 and split.pixels.shape[1:] == (16, 16, 1)
        assert split.pixels.min() == 0 and split.pixels.max() == 255
        assert not split.pixels.flags.writeable
        assert set(np.unique(split.labels)) == set(range(10))
        assert split.class_names == [str(i) for i in range(10)]
        # Labels travel with their images: the label of image i is the source label at source_index[i].
        assert np.array_equal(split.labels, src.target[split.source_index])
    # A stratified 10% hold-out: each class contributes round(10% of its count) images.
    per_class = np.bincount(src.target)
    assert np.array_equal(np.bincount(val.labels), np.round(per_class * 0.1).astype(int))


def test_digits_images_match_their_source(digits_splits):
    from sklearn.datasets import load_digits

    train, _ = digits_splits
    src = load_digits().images[train.source_index]  # (N, 8, 8) in 0..16
    # 2x2 block means of the 16x16 upscale against the 8x8 source; the bicubic kernel smooths a little, so
    # demand a high correlation per image rather than equality (a misaligned source_index gives ~0.3).
    small = train.pixels[..., 0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    a = small.reshape(len(small), -1) - small.reshape(len(small), -1).mean(1, keepdims=True)
    b = src.reshape(len(src), -1) - src.reshape(len(src), -1).mean(1, keepdims=True)
    corr = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    assert corr.min() > 0.9


def test_digits_stable_across_loads(digits_splits):
    again = fresh("digits")
    assert again is not digits_splits[0]
    assert np.array_equal(again.pixels, digits_splits[0].pixels)
    assert np.array_equal(again.labels, digits_splits[0].labels)
    assert np.array_equal(again.source_index, digits_splits[0].source_index)
    assert again.content_hash == digits_splits[0].content_hash


def test_digits_tensors(digits_splits, recwarn):
    train, _ = digits_splits
    x = train.tensors()
    # Read-only pixels are copied, not wrapped (torch warns once per process on non-writable arrays).
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    assert x.shape == (1618, 1, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # 0 -> -1 and 255 -> 1 exactly (k / 127.5 - 1)
    sub = train.tensors([5, 2])
    assert torch.equal(sub[0], x[5]) and torch.equal(sub[1], x[2])
    assert torch.equal(sub[0, 0], torch.from_numpy(train.pixels[5, :, :, 0]).float() / 127.5 - 1)


def test_digits_other_resolution():
    d = load_dataset("digits", "val", resolution=8)
    assert d.pixels.shape == (179, 8, 8, 1)


# -- animals ----------------------------------------------------------------------------------------------------------

def test_animals_2_classes_sizes_and_stratification():
    train, val = load_dataset("animals-2", "train"), load_dataset("animals-2", "val")
    _, orig = ds._animal_arrays()
    assert train.class_names == val.class_names == ["bird", "elephant"]
    assert (len(train), len(val)) == (1800, 200)
    assert np.array_equal(np.bincount(train.labels), [900, 900])
    assert np.array_equal(np.bincount(val.labels), [100, 100])
    assert train.pixels.shape[1:] == (28, 28, 1) and train.pixels.dtype == np.uint8
    assert len(np.intersect1d(train.source_index, val.source_index)) == 0
    for split in (train, val):
        expected = [ANIMAL_CLASSES.index(split.class_names[lab]) for lab in split.labels]
        assert np.array_equal(orig[split.source_index], expected)


def test_animals_subset_relabels_in_the_order_given():
    cat_dog = load_dataset("animals:cat,dog")
    dog_cat = load_dataset("animals:4,2")  # numbers name classes too: 4 = dog, 2 = cat
    _, orig = ds._animal_arrays()
    assert cat_dog.class_names == ["cat", "dog"] and dog_cat.class_names == ["dog", "cat"]
    assert set(np.unique(cat_dog.labels)) == {0, 1}
    assert np.array_equal(orig[cat_dog.source_index], np.where(cat_dog.labels == 0, 2, 4))
    assert np.array_equal(orig[dog_cat.source_index], np.where(dog_cat.labels == 0, 4, 2))
    assert len(cat_dog) == len(dog_cat) == 1800
    both = np.concatenate([cat_dog.source_index, load_dataset("animals:cat,dog", "val").source_index])
    assert np.array_equal(np.sort(both), np.flatnonzero(np.isin(orig, [2, 4])))  # all 2,000 cats and dogs, once


def test_animals_unknown_class():
    with pytest.raises(DatasetError, match="unicorn") as exc:
        load_dataset("animals:cat,unicorn")
    assert "bear" in assert_one_line(exc)  # the message lists the valid names


# -- folder datasets --------------------------------------------------------------------------------------------------

def write_png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def gray(value, size=8):
    return np.full((size, size), value, dtype=np.uint8)


def test_folder_classes_from_subfolders(tmp_path):
    write_png(tmp_path / "cat" / "a.png", gray(10))
    write_png(tmp_path / "cat" / "b.png", gray(20))
    write_png(tmp_path / "dog" / "a.png", gray(30))
    write_png(tmp_path / ".ipynb_checkpoints" / "x.png", gray(99))  # hidden: ignored
    (tmp_path / "notes.txt").write_text("not an image")  # other files: ignored
    d = load_dataset(f"folder:{tmp_path}")
    assert d.class_names == ["cat", "dog"]
    assert list(d.labels) == [0, 0, 1]
    assert d.pixels.shape == (3, 8, 8, 1)  # native resolution: the images' own size
    assert [int(d.pixels[i].max()) for i in range(3)] == [10, 20, 30]
    assert list(d.source_index) == [0, 1, 2]


def test_folder_colour_and_resolution(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 50
    write_png(tmp_path / "x" / "a.png", rgb)
    write_png(tmp_path / "x" / "b.png", rgb)
    d = load_dataset(f"folder:{tmp_path}")
    assert d.channels == 3 and np.array_equal(d.pixels[0], rgb)
    small = load_dataset(f"folder:{tmp_path}", resolution=4)
    assert small.pixels.shape == (2, 4, 4, 3)
    assert np.array_equal(small.pixels[0, 0, 0], [200, 0, 50])  # resizing a constant image keeps its colour


def test_folder_train_val_share_class_labels(tmp_path):
    write_png(tmp_path / "train" / "ant" / "0.png", gray(1))
    write_png(tmp_path / "train" / "bee" / "0.png", gray(2))
    write_png(tmp_path / "train" / "cow" / "0.png", gray(3))
    write_png(tmp_path / "val" / "cow" / "0.png", gray(4))  # val lacks ant and bee
    train = load_dataset(f"folder:{tmp_path}", "train")
    val = load_dataset(f"folder:{tmp_path}", "val")
    assert train.class_names == val.class_names == ["ant", "bee", "cow"]
    assert list(train.labels) == [0, 1, 2]
    assert list(val.labels) == [2]  # cow is label 2 in both splits
    assert int(val.pixels.max()) == 4


def test_folder_without_subfolders_and_under_a_hidden_parent(tmp_path):
    root = tmp_path / ".config" / "imgs"  # hidden folders *above* the dataset do not hide it
    write_png(root / "a.png", gray(5))
    write_png(root / "b.png", gray(6))
    d = load_dataset(f"folder:{root}")
    assert d.class_names == ["(none)"] and list(d.labels) == [0, 0]
    with pytest.raises(DatasetError, match="no val/ folder") as exc:
        load_dataset(f"folder:{root}", "val")
    assert_one_line(exc)


@pytest.mark.parametrize("case", ["mixed sizes", "mixed modes", "empty", "missing", "no val", "corrupt"])
def test_folder_errors(tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    if case == "mixed sizes":
        write_png(root / "a" / "1.png", gray(0, 8))
        write_png(root / "a" / "2.png", gray(0, 10))
        expected = "mixes image sizes"
    elif case == "mixed modes":
        write_png(root / "a" / "1.png", gray(0))
        write_png(root / "a" / "2.png", np.zeros((8, 8, 3)))
        expected = "mixes grayscale"
    elif case == "empty":
        (root / "a").mkdir()
        expected = "no images"
    elif case == "missing":
        root = tmp_path / "nowhere"
        expected = "not found"
    elif case == "no val":
        write_png(root / "train" / "a" / "1.png", gray(0))
        with pytest.raises(DatasetError, match="no val/ folder") as exc:
            load_dataset(f"folder:{root}", "val")
        assert_one_line(exc)
        return
    else:
        write_png(root / "a" / "1.png", gray(0))
        (root / "a" / "2.png").write_text("this is text, not a PNG")
        expected = "2.png"
    with pytest.raises(DatasetError, match=expected) as exc:
        load_dataset(f"folder:{root}")
    assert_one_line(exc)


# -- npz files --------------------------------------------------------------------------------------------------------

def test_npz_grayscale_with_labels(tmp_path):
    images = np.arange(3 * 6 * 6, dtype=np.uint8).reshape(3, 6, 6)
    np.savez(tmp_path / "x.npz", images=images, labels=np.array([2, 0, 2]))
    d = load_dataset(f"npz:{tmp_path / 'x.npz'}")
    assert d.pixels.shape == (3, 6, 6, 1)
    assert np.array_equal(d.pixels[..., 0], images)
    assert list(d.labels) == [2, 0, 2] and d.class_names == ["0", "1", "2"]


def test_npz_colour_without_labels_and_val_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", images=images)
    d = load_dataset(f"npz:{tmp_path / 'c.npz'}")
    assert d.channels == 3 and np.array_equal(d.pixels, images)
    assert list(d.labels) == [-1] * 4 and d.class_names == []
    assert d.label_name(0) == "?"
    with pytest.raises(DatasetError, match="c_val.npz") as exc:
        load_dataset(f"npz:{tmp_path / 'c.npz'}", "val")
    assert_one_line(exc)
    np.savez(tmp_path / "c_val.npz", images=images[:2])
    assert len(load_dataset(f"npz:{tmp_path / 'c.npz'}", "val")) == 2


@pytest.mark.parametrize("case,expected", [
    ("no images", "no 'images'"),
    ("float", "uint8"),
    ("object", "not a readable .npz"),
    ("not a zip", "not a readable .npz"),
    ("bad shape", "N x H x W"),
    ("bad labels", "'labels' must be N integers"),
    ("missing", "not found"),
])
def test_npz_errors(tmp_path, case, expected):
    path = tmp_path / "bad.npz"
    good = np.zeros((2, 4, 4), dtype=np.uint8)
    if case == "no images":
        np.savez(path, pictures=good)
    elif case == "float":
        np.savez(path, images=good.astype(np.float32))
    elif case == "object":  # a pickled object array: must be refused, never unpickled
        np.savez(path, images=np.array([good[0], None], dtype=object))
    elif case == "not a zip":
        path.write_text("hello")
    elif case == "bad shape":
        np.savez(path, images=np.zeros((2, 4, 4, 2), dtype=np.uint8))
    elif case == "bad labels":
        np.savez(path, images=good, labels=np.array([1, 2, 3]))
    with pytest.raises(DatasetError, match=expected) as exc:
        load_dataset(f"npz:{path}")
    assert_one_line(exc)


# -- CIFAR python batches ---------------------------------------------------------------------------------------------

def write_fake_cifar(root, n_train=4, n_test=6, protocol=pickle.DEFAULT_PROTOCOL):
    """cifar-10-batches-py/ with 5 training batches of `n_train` images and a test batch; returns the arrays."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    out = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.choice([1, 7, 3], size=n)]  # automobile, horse, cat
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=protocol)
        out[name] = (data, labels)
    return out


def as_hwc(rows):
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR rows are R plane, G plane, B plane


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])  # the real files are protocol-2 pickles
def test_cifar10(tmp_path, protocol):
    raw = write_fake_cifar(tmp_path, protocol=protocol)
    train = load_dataset(f"cifar10:{tmp_path}")
    data = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((raw[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.class_names == list(CIFAR_CLASSES)
    assert train.pixels.shape == (20, 32, 32, 3)
    assert np.array_equal(train.pixels, as_hwc(data))
    assert list(train.labels) == labels and list(train.source_index) == list(range(20))
    val = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "val")  # the batches folder itself works too
    assert np.array_equal(val.pixels, as_hwc(raw["test_batch"][0]))
    assert list(val.labels) == raw["test_batch"][1]


def test_cifar2(tmp_path):
    raw = write_fake_cifar(tmp_path)
    full = load_dataset(f"cifar10:{tmp_path}")
    two = load_dataset(f"cifar2:{tmp_path}")
    assert two.class_names == ["automobile", "horse"]
    keep = np.flatnonzero(np.isin(full.labels, [1, 7]))
    assert np.array_equal(two.source_index, keep)  # fewer than 5,000 of them here, so all are kept, in order
    assert np.array_equal(two.pixels, full.pixels[keep])
    assert np.array_equal(two.labels, (full.labels[keep] == 7).astype(int))  # automobile -> 0, horse -> 1
    val = load_dataset(f"cifar2:{tmp_path}", "val")
    assert np.array_equal(val.labels, [int(v == 7) for v in raw["test_batch"][1] if v in (1, 7)])


def test_cifar_missing_files(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3") as exc:
        load_dataset(f"cifar10:{tmp_path}")
    assert_one_line(exc)
    assert len(load_dataset(f"cifar10:{tmp_path}", "val")) == 6  # the test batch alone is still readable
    with pytest.raises(DatasetError, match="test_batch") as exc:
        load_dataset(f"cifar2:{tmp_path / 'empty'}", "val")
    assert_one_line(exc)


class _Payload:
    """Unpickling this would create a file: the loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_refuses_code_in_pickles(tmp_path):
    write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": _Payload(str(marker)), "labels": [0]}, f)
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch") as exc:
        load_dataset(f"cifar10:{tmp_path}", "val")
    assert_one_line(exc)
    assert not marker.exists()


# -- names and options ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("mnist", "unknown dataset 'mnist'"),
    ("folder", "needs a path"),
    ("cifar10:", "needs a path"),
])
def test_unknown_or_incomplete_spec(spec, expected):
    with pytest.raises(DatasetError, match=expected) as exc:
        load_dataset(spec)
    msg = assert_one_line(exc)
    if spec == "mnist":
        assert "digits" in msg and "animals-2" in msg  # the message lists what exists


@pytest.mark.parametrize("kwargs,expected", [({"split": "test"}, "unknown split"),
                                             ({"resolution": 2}, "resolution must be between")])
def test_bad_options(kwargs, expected):
    with pytest.raises(DatasetError, match=expected) as exc:
        load_dataset("digits", **kwargs)
    assert_one_line(exc)
