"""Tests for service.core.data: loading, caching and seeded disjoint splits."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import service.core.data.loading as loading
from service.core.data import (
    DATASETS,
    ArrayDataset,
    DatasetNotFoundError,
    Splits,
    SplitSizes,
    default_cache_dir,
    find_data_dir,
    load_dataset,
    make_splits,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_PARTS = ("burnin", "stream", "attacker_val", "calibration")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    # Never read or write the user's real cache or data directories from a test.
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(tmp_path_factory.mktemp("default-cache")))
    monkeypatch.delenv("DSCGUARD_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    train, test = load_dataset("digits")
    assert test is None
    return train


# ---------------------------------------------------------------- digits and ArrayDataset


def test_digits_loads_offline_as_uint8_nchw(digits):
    assert digits.name == "digits"
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.uint8
    assert digits.y.shape == (1797,) and digits.y.dtype == np.int64
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and len(digits) == 1797
    assert digits.classes == tuple("0123456789")
    assert digits.x.min() == 0 and digits.x.max() == 255
    assert np.array_equal(np.unique(digits.y), np.arange(10))
    bunch = load_digits()
    assert np.array_equal(digits.x[:, 0], np.rint(bunch.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(digits.y, bunch.target)


def test_tensors_are_float_in_unit_range_and_detached_from_the_arrays(digits):
    x, y = digits.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape) == (1797, 1, 8, 8)
    assert float(x.min()) >= 0.0 and float(x.max()) == 1.0
    assert torch.allclose(x, torch.from_numpy(digits.x.astype(np.float32) / 255))
    x.zero_()
    y.zero_()
    assert digits.x.max() == 255 and digits.y.max() == 9  # the dataset is untouched


def test_subset_copies_in_the_given_order(digits):
    part = digits.subset([5, 2, 9])
    assert np.array_equal(part.x, digits.x[[5, 2, 9]]) and np.array_equal(part.y, digits.y[[5, 2, 9]])
    assert part.classes == digits.classes and part.name == digits.name
    assert len(digits.subset([])) == 0
    mask = digits.y == 3
    assert np.array_equal(digits.subset(mask).y, digits.y[mask])
    with pytest.raises(TypeError):
        digits.subset([0.5])


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1]), "uint8"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), "uint8"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1, 1]), "2 images but 3 labels"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 2]), "labels must lie"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0.0, 1.0]), "integer"),
    ],
)
def test_array_dataset_rejects_malformed_arrays(x, y, match):
    with pytest.raises(ValueError, match=match):
        ArrayDataset("bad", x, y, ("a", "b"))


# ---------------------------------------------------------------- splits


def _unique_image_pool(n: int, test: bool = False) -> ArrayDataset:
    """A pool whose image i encodes i in its pixels, so parts can be traced back by content."""
    ids = np.arange(n) + (1_000_000 if test else 0)
    x = np.stack([(ids >> shift) & 0xFF for shift in (0, 8, 16, 24)], axis=1).astype(np.uint8)
    return ArrayDataset("pool", x.reshape(n, 1, 2, 2), ids % 3, ("a", "b", "c"))


def _image_ids(ds: ArrayDataset) -> np.ndarray:
    flat = ds.x.reshape(len(ds), 4).astype(np.int64)
    return sum(flat[:, k] << (8 * k) for k in range(4))


def test_digits_splits_have_the_asked_sizes_and_are_disjoint(digits):
    sizes = SplitSizes(stream=400, attacker_val=100, calibration=200, burnin=500, test=300)
    splits = make_splits(digits, None, sizes, seed=1)
    assert isinstance(splits, Splits) and splits.test_from_train
    got = {name: len(part) for name, part in splits.parts().items()}
    assert got == {"burnin": 500, "stream": 400, "attacker_val": 100, "calibration": 200, "test": 300}
    all_idx = np.concatenate([splits.indices[name] for name in (*TRAIN_PARTS, "test")])
    assert len(np.unique(all_idx)) == len(all_idx) == 1500  # disjoint: no pool index used twice
    assert all_idx.min() >= 0 and all_idx.max() < len(digits)
    for name, part in splits.parts().items():
        assert np.array_equal(part.x, digits.x[splits.indices[name]])
        assert np.array_equal(part.y, digits.y[splits.indices[name]])


def test_burnin_none_takes_the_rest_of_the_pool(digits):
    splits = make_splits(digits, None, SplitSizes(stream=300, attacker_val=50, calibration=100, test=200), 0)
    assert len(splits.burnin) == 1797 - 650
    all_idx = np.concatenate(list(splits.indices.values()))
    assert np.array_equal(np.sort(all_idx), np.arange(1797))  # a partition of the whole pool


def test_parts_are_disjoint_by_content_with_a_given_test_set():
    train, test = _unique_image_pool(1000), _unique_image_pool(400, test=True)
    splits = make_splits(train, test, SplitSizes(stream=200, attacker_val=50, calibration=70), seed=3)
    assert not splits.test_from_train
    seen = [set(_image_ids(splits.parts()[name]).tolist()) for name in TRAIN_PARTS]
    assert sum(map(len, seen)) == len(set().union(*seen)) == 1000
    assert np.array_equal(_image_ids(splits.test), np.arange(400) + 1_000_000)  # whole test set, in order


def test_test_set_is_subsampled_with_the_seed():
    train, test = _unique_image_pool(500), _unique_image_pool(400, test=True)
    sizes = SplitSizes(stream=100, attacker_val=10, calibration=20, test=150)
    a, b, c = (make_splits(train, test, sizes, seed=s) for s in (7, 7, 8))
    assert len(a.test) == 150 and len(np.unique(a.indices["test"])) == 150
    assert np.array_equal(_image_ids(a.test), a.indices["test"] + 1_000_000)
    assert np.array_equal(a.indices["test"], b.indices["test"])
    assert not np.array_equal(a.indices["test"], c.indices["test"])


def test_same_seed_same_split_other_seed_other_split(digits):
    sizes = SplitSizes(stream=300, attacker_val=50, calibration=100, test=200)
    a, b, c = (make_splits(digits, None, sizes, seed=s) for s in (11, 11, 12))
    for name in a.indices:
        assert np.array_equal(a.indices[name], b.indices[name])
        assert np.array_equal(a.parts()[name].x, b.parts()[name].x)
    assert not np.array_equal(a.indices["stream"], c.indices["stream"])


def test_burnin_size_does_not_move_the_other_parts(digits):
    small = make_splits(digits, None, SplitSizes(300, 50, 100, burnin=100, test=200), seed=5)
    rest = make_splits(digits, None, SplitSizes(300, 50, 100, test=200), seed=5)
    for name in ("stream", "attacker_val", "calibration", "test"):
        assert np.array_equal(small.indices[name], rest.indices[name])


def test_oversize_splits_raise_with_the_numbers(digits):
    with pytest.raises(ValueError, match=r"need 1900 images .* has only 1797"):
        make_splits(digits, None, SplitSizes(stream=1000, attacker_val=300, calibration=300, test=300), 0)
    with pytest.raises(ValueError, match="only 1797"):
        make_splits(digits, None, SplitSizes(stream=10, attacker_val=10, calibration=10, burnin=1800,
                                             test=10), 0)
    train, test = _unique_image_pool(100), _unique_image_pool(20, test=True)
    with pytest.raises(ValueError, match="test set has only 20"):
        make_splits(train, test, SplitSizes(stream=10, attacker_val=10, calibration=10, test=21), 0)


def test_missing_test_size_without_a_test_set_raises(digits):
    with pytest.raises(ValueError, match="SplitSizes.test"):
        make_splits(digits, None, SplitSizes(stream=10, attacker_val=10, calibration=10), 0)


def test_mismatched_test_set_raises(digits):
    with pytest.raises(ValueError, match="does not match"):
        make_splits(digits, _unique_image_pool(50), SplitSizes(stream=10, attacker_val=10, calibration=10), 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stream": 0, "attacker_val": 1, "calibration": 1},
        {"stream": 1, "attacker_val": 0, "calibration": 1},
        {"stream": 1, "attacker_val": 1, "calibration": 0},
        {"stream": 1, "attacker_val": 1, "calibration": 1, "burnin": -1},
        {"stream": 1, "attacker_val": 1, "calibration": 1, "test": 0},
        {"stream": 2.5, "attacker_val": 1, "calibration": 1},
        {"stream": True, "attacker_val": 1, "calibration": 1},
    ],
)
def test_split_sizes_are_validated(kwargs):
    with pytest.raises(ValueError, match="SplitSizes"):
        SplitSizes(**kwargs)


def test_split_sizes_accept_numpy_integers_and_zero_burnin():
    sizes = SplitSizes(stream=np.int64(3), attacker_val=1, calibration=1, burnin=0)
    assert type(sizes.stream) is int and sizes.burnin == 0


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_bad_seed_raises(digits, seed):
    with pytest.raises(ValueError, match="seed"):
        make_splits(digits, None, SplitSizes(stream=10, attacker_val=10, calibration=10, test=10), seed)


# ---------------------------------------------------------------- locating data


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(ValueError, match="imagenet") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", ["mnist-png.tar.gz", "MNIST/raw/", "train-images-idx3-ubyte"]),
        ("cifar10", ["cifar10-jpeg.tar.gz", "cifar-10-batches-py/", "data_batch_1"]),
        ("cifar100", ["cifar-100-python/"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ],
)
def test_missing_files_name_what_to_put_where(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert repr(name) in message and str(tmp_path) in message and "download=True" in message
    for text in expected:
        assert text in message


def test_find_data_dir_order(tmp_path, monkeypatch):
    import service.core.data.locations as locations

    monkeypatch.setattr(locations, "_REPO_ROOT", tmp_path / "nowhere" / "repo")
    monkeypatch.chdir(tmp_path)
    assert find_data_dir() is None
    (tmp_path / "data").mkdir()
    assert find_data_dir() == tmp_path / "data"
    env_dir = tmp_path / "elsewhere"
    env_dir.mkdir()
    monkeypatch.setenv("DSCGUARD_DATA_DIR", str(env_dir))
    assert find_data_dir() == env_dir
    monkeypatch.setenv("DSCGUARD_DATA_DIR", str(tmp_path / "missing"))  # skipped when it does not exist
    assert find_data_dir() == tmp_path / "data"


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(target))
    assert default_cache_dir() == target and target.is_dir()


# ---------------------------------------------------------------- image folders and the cache (tiny)


def _png(value: int, size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


# File names chosen so that lexical order ("12" < "7") differs from numeric order.
_TINY_NAMES = ("7.png", "12.png")


def _tiny_mnist_members(prefix: str = "") -> dict[str, bytes]:
    """train/test x 10 digits x 2 images; pixel value = 100*split + 10*digit + position in _TINY_NAMES."""
    members = {f"{prefix}train.csv": b"filepath,label\n"}
    for s, split in enumerate(("train", "test")):
        for digit in range(10):
            for k, file in enumerate(_TINY_NAMES):
                members[f"{prefix}{split}/{digit}/{file}"] = _png(100 * s + 10 * digit + k)
    return members


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in reversed(list(members.items())):  # archive order must not matter
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(loading, "read_image_folder", fail)
    monkeypatch.setattr(loading, "read_torchvision", fail)


def _check_tiny(train: ArrayDataset, test: ArrayDataset) -> None:
    for s, part in enumerate((train, test)):
        assert part.x.shape == (20, 1, 28, 28) and part.x.dtype == np.uint8
        assert np.array_equal(part.y, np.repeat(np.arange(10), 2))
        # Sorted by name within a class: "12.png" (k=1) comes before "7.png" (k=0).
        expected = 100 * s + 10 * np.repeat(np.arange(10), 2) + np.tile([1, 0], 10)
        assert np.array_equal(part.x[:, 0, 0, 0], expected)
        assert (part.x == part.x[:, :, :1, :1]).all()  # each image is one flat colour


@pytest.mark.parametrize("prefix", ["", "./", "mnist-png/"])
def test_tarball_is_read_without_extraction(tmp_path, prefix):
    _write_tar(tmp_path / "mnist-png.tar.gz", _tiny_mnist_members(prefix))
    train, test = load_dataset("mnist", tmp_path, cache_dir=tmp_path / "cache")
    _check_tiny(train, test)
    assert train.source == "mnist-png.tar.gz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mnist-png.tar.gz"]


def test_extracted_tree_gives_the_same_arrays(tmp_path):
    _write_tree(tmp_path / "mnist-png", _tiny_mnist_members())
    train, test = load_dataset("mnist", tmp_path, cache_dir=tmp_path / "cache")
    _check_tiny(train, test)
    assert [p.name.split("-")[1] for p in (tmp_path / "cache" / "datasets").iterdir()] == ["dir"]


def test_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    tarball = _write_tar(tmp_path / "mnist-png.tar.gz", _tiny_mnist_members())
    cache = tmp_path / "cache"
    first = load_dataset("mnist", tmp_path, cache_dir=cache)
    entries = list((cache / "datasets").iterdir())
    assert [p.name[: len("mnist-tar-")] for p in entries] == ["mnist-tar-"] and entries[0].suffix == ".npz"
    with np.load(entries[0], allow_pickle=False) as npz:  # plain arrays only: loads without pickle
        assert npz["x_train"].dtype == np.uint8

    with monkeypatch.context() as patch:
        _forbid_decoding(patch)
        second = load_dataset("mnist", tmp_path, cache_dir=cache)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
        assert a.classes == b.classes and a.source == b.source

    stat = tarball.stat()
    os.utime(tarball, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "a new version of the file"
    load_dataset("mnist", tmp_path, cache_dir=cache)
    assert len(list((cache / "datasets").glob("mnist-tar-*.npz"))) == 2


def test_unreadable_cache_is_rebuilt(tmp_path):
    _write_tar(tmp_path / "mnist-png.tar.gz", _tiny_mnist_members())
    cache = tmp_path / "cache"
    load_dataset("mnist", tmp_path, cache_dir=cache)
    (entry,) = (cache / "datasets").iterdir()
    entry.write_bytes(b"not a zip file")
    _check_tiny(*load_dataset("mnist", tmp_path, cache_dir=cache))
    with np.load(entry, allow_pickle=False) as npz:
        assert npz["x_test"].shape == (20, 1, 28, 28)


def test_wrong_image_size_is_rejected(tmp_path):
    members = _tiny_mnist_members()
    members["train/3/7.png"] = _png(0, size=32)
    _write_tar(tmp_path / "mnist-png.tar.gz", members)
    with pytest.raises(ValueError, match=r"train/3/7.png.*expected \(28, 28\)"):
        load_dataset("mnist", tmp_path, cache_dir=tmp_path / "cache")


def test_unknown_class_folder_is_rejected(tmp_path):
    members = _tiny_mnist_members()
    members["train/eleven/1.png"] = _png(0)
    _write_tar(tmp_path / "mnist-png.tar.gz", members)
    with pytest.raises(ValueError, match="unknown class folder 'eleven'"):
        load_dataset("mnist", tmp_path, cache_dir=tmp_path / "cache")


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX format: magic (0x08 = uint8, then the number of dimensions), big-endian sizes, raw bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_layout_is_used_when_no_image_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    cache = tmp_path / "cache"
    train, test = load_dataset("mnist", tmp_path, cache_dir=cache)
    for part, key in ((train, "train"), (test, "t10k")):
        assert part.x.shape == (len(arrays[key][1]), 1, 28, 28) and part.x.dtype == np.uint8
        assert np.array_equal(part.x[:, 0], arrays[key][0]) and np.array_equal(part.y, arrays[key][1])
    assert [p.name.split("-")[1] for p in (cache / "datasets").iterdir()] == ["torchvision"]
    with monkeypatch.context() as patch:
        _forbid_decoding(patch)
        again, _ = load_dataset("mnist", tmp_path, cache_dir=cache)
    assert np.array_equal(again.x, train.x)


# ---------------------------------------------------------------- the real data in ../shared/data


def _need_shared(file: str) -> None:
    if not (SHARED_DATA / file).is_file():
        pytest.skip(f"{SHARED_DATA / file} is absent (real data lives beside the checkout in CI only)")


@pytest.mark.shared_data
def test_mnist_from_the_shared_tarball_and_its_cache(tmp_path, monkeypatch):
    _need_shared("mnist-png.tar.gz")
    train, test = load_dataset("mnist", SHARED_DATA, cache_dir=tmp_path)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    for part in (train, test):
        assert np.array_equal(np.unique(part.y), np.arange(10))
    assert train.x.max() == 255 and 0.12 < train.x.mean() / 255 < 0.14  # MNIST's mean is 0.1307
    assert len(list((tmp_path / "datasets").glob("mnist-tar-*.npz"))) == 1

    with monkeypatch.context() as patch:
        _forbid_decoding(patch)
        train2, test2 = load_dataset("mnist", SHARED_DATA, cache_dir=tmp_path)
    assert np.array_equal(train.x, train2.x) and np.array_equal(train.y, train2.y)
    assert np.array_equal(test.x, test2.x) and np.array_equal(test.y, test2.y)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    _need_shared("cifar10-jpeg.tar.gz")
    cache = tmp_path_factory.mktemp("cifar-cache")
    return load_dataset("cifar10", SHARED_DATA, cache_dir=cache), cache


@pytest.mark.shared_data
@pytest.mark.slow
def test_cifar10_from_the_shared_tarball(cifar10):
    (train, test), _ = cifar10
    assert train.x.shape == (50000, 3, 32, 32) and test.x.shape == (10000, 3, 32, 32)
    assert train.classes[0] == "airplane" and train.classes[-1] == "truck" and train.num_classes == 10
    assert np.array_equal(np.bincount(train.y), np.full(10, 5000))
    assert np.array_equal(np.bincount(test.y), np.full(10, 1000))
    channel_mean = train.x.mean(axis=(0, 2, 3)) / 255
    assert np.allclose(channel_mean, (0.4914, 0.4822, 0.4465), atol=0.005)


@pytest.mark.shared_data
@pytest.mark.slow
def test_cifar10_second_load_is_fast_and_equal(cifar10, monkeypatch):
    import time

    (train, test), cache = cifar10
    _forbid_decoding(monkeypatch)
    start = time.perf_counter()
    train2, test2 = load_dataset("cifar10", SHARED_DATA, cache_dir=cache)
    assert time.perf_counter() - start < 2.0
    assert np.array_equal(train.x, train2.x) and np.array_equal(test.y, test2.y)
