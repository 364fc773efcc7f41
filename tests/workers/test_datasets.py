import hashlib
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetError,
    Splits,
    clear_cache,
    load_dataset,
    load_npz,
)

# name: (input_shape, num_classes, train, val, test) with the default val_fraction of 0.1
EXPECTED = {
    "mnist1d": ((40,), 10, 3600, 400, 1000),
    "digits": ((1, 8, 8), 10, 1293, 144, 360),
    "mnist5k": ((1, 28, 28), 10, 3600, 400, 1000),
    "synthetic": ((16,), 4, 900, 100, 200),
}


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("a dataset tried to use the network")


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    return {hashlib.sha256(row.numpy().tobytes()).digest() for row in x}


def _canonical(splits: Splits) -> dict[str, torch.Tensor]:
    """Inputs with the dataset-wide affine scaling undone (mnist1d's depends on the training split)."""
    pool = torch.cat([splits.train.x, splits.val.x])
    mean, std = pool.mean(), pool.std()
    return {part: (getattr(splits, part).x - mean) / std for part in ("train", "val", "test")}


def _shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many rows of ``a`` also occur in ``b``, up to float rounding."""
    distances = torch.cdist(a.flatten(1).double(), b.flatten(1).double())
    return int((distances.min(dim=1).values < 1e-3).sum())


def test_every_dataset_loads_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    clear_cache()  # load from the packages here, not from an earlier test's copy
    for name in DATASETS:
        splits = load_dataset(name)
        assert (splits.name, len(splits.test)) == (name, EXPECTED[name][4])


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown dataset 'cifar10'.*mnist1d, digits, mnist5k, synthetic"):
        load_dataset("cifar10")


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1e-6])
def test_invalid_val_fraction_is_refused(val_fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=val_fraction)


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_sizes_and_values(name: str) -> None:
    shape, num_classes, n_train, n_val, n_test = EXPECTED[name]
    splits = load_dataset(name)
    assert (splits.input_shape, splits.num_classes) == (shape, num_classes)
    for split, n in ((splits.train, n_train), (splits.val, n_val), (splits.test, n_test)):
        assert split.x.shape == (n, *shape)
        assert split.y.shape == (n,)
        assert (split.x.dtype, split.y.dtype) == (torch.float32, torch.int64)
        assert torch.isfinite(split.x).all()
        assert int(split.y.min()) >= 0 and int(split.y.max()) < num_classes
        assert set(split.y.tolist()) == set(range(num_classes))


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_disjoint(name: str) -> None:
    splits = load_dataset(name)
    train, val, test = (_row_hashes(s.x) for s in (splits.train, splits.val, splits.test))
    assert len(train) + len(val) + len(test) == len(splits.train) + len(splits.val) + len(splits.test)
    assert not (train & val or train & test or val & test)


@pytest.mark.parametrize("name", DATASETS)
def test_same_seed_gives_identical_splits(name: str) -> None:
    first, second = load_dataset(name, seed=3), load_dataset(name, seed=3)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(first, part).x, getattr(second, part).x)
        assert torch.equal(getattr(first, part).y, getattr(second, part).y)


@pytest.mark.parametrize("name", DATASETS)
def test_other_seed_changes_validation_but_not_test(name: str) -> None:
    seed0, seed1 = load_dataset(name, seed=0), load_dataset(name, seed=1)
    canon0, canon1 = _canonical(seed0), _canonical(seed1)
    assert _shared_rows(canon0["val"], canon1["val"]) < len(seed0.val) // 2
    assert len(seed1.val) == len(seed0.val)  # stratified sizes do not depend on the seed
    assert torch.equal(seed0.test.y, seed1.test.y)
    torch.testing.assert_close(canon0["test"], canon1["test"], atol=1e-4, rtol=0)
    assert _shared_rows(canon0["val"], torch.cat([canon1["train"], canon1["val"]])) == len(seed0.val)


def test_validation_split_is_stratified() -> None:
    splits = load_dataset("digits", val_fraction=0.2)
    train_share = torch.bincount(splits.train.y) / len(splits.train)
    val_share = torch.bincount(splits.val.y) / len(splits.val)
    assert (train_share - val_share).abs().max() < 0.02


def test_mnist1d_is_standardised_with_training_statistics() -> None:
    splits = load_dataset("mnist1d")
    assert abs(float(splits.train.x.mean())) < 1e-4
    assert abs(float(splits.train.x.std()) - 1) < 1e-3
    # The published test split, by its label counts: a changed generator would change every result.
    assert torch.bincount(splits.test.y).tolist() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]


def test_mnist1d_keeps_global_random_state_and_caches_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    clear_cache()
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    generated = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state

    (cache_file,) = tmp_path.glob("*.npz")
    with np.load(cache_file) as data:
        arrays = dict(data)
    np.savez(cache_file, **{**arrays, "x_test": arrays["x_test"] + 100})  # a mark to see it is read back
    clear_cache()
    assert float(load_dataset("mnist1d").test.x.mean()) > float(generated.test.x.mean()) + 50

    cache_file.write_text("not an npz file")  # a broken cache is generated again, not an error
    clear_cache()
    regenerated = load_dataset("mnist1d")
    assert torch.equal(regenerated.train.x, generated.train.x)
    assert torch.equal(regenerated.test.x, generated.test.x)  # and the process cache holds no marked copy


def test_synthetic_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    splits = load_dataset("synthetic")
    model = LogisticRegression(max_iter=1000).fit(splits.train.x.numpy(), splits.train.y.numpy())
    assert model.score(splits.val.x.numpy(), splits.val.y.numpy()) > 0.85


def test_splits_are_copies_of_the_cache() -> None:
    splits = load_dataset("synthetic")
    splits.test.x.zero_()
    assert float(load_dataset("synthetic").test.x.abs().sum()) > 0


# --- user files -------------------------------------------------------------------------------


def _good_arrays(n: int = 60, num_classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 5)), "y": np.arange(n) % num_classes}


def _write(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_user_file_without_test_split(tmp_path: Path) -> None:
    path = _write(tmp_path, **_good_arrays())
    splits = load_npz(path)
    assert (splits.name, splits.input_shape, splits.num_classes) == ("data", (5,), 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (43, 5, 12)
    assert torch.bincount(splits.test.y).tolist() == [4, 4, 4]
    train, val, test = (_row_hashes(s.x) for s in (splits.train, splits.val, splits.test))
    assert len(train | val | test) == 60
    other_seed = load_npz(path, seed=1)
    assert torch.equal(other_seed.test.x, splits.test.x)
    assert _row_hashes(other_seed.val.x) != val
    assert torch.equal(load_npz(path).val.x, splits.val.x)


def test_user_file_with_test_split(tmp_path: Path) -> None:
    arrays = _good_arrays()
    x_test, y_test = np.ones((7, 5), dtype=np.float32), np.array([0, 1, 2, 3, 0, 1, 2])
    splits = load_npz(_write(tmp_path, **arrays, x_test=x_test, y_test=y_test))
    assert torch.equal(splits.test.x, torch.from_numpy(x_test))
    assert splits.num_classes == 4  # the largest label anywhere, plus one
    assert (len(splits.train), len(splits.val)) == (54, 6)


@pytest.mark.parametrize(
    ("x_shape", "input_shape"),
    [((30, 6, 7), (1, 6, 7)), ((30, 3, 6, 7), (3, 6, 7)), ((30, 12), (12,))],
)
def test_user_file_sample_shapes(
    tmp_path: Path, x_shape: tuple[int, ...], input_shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=x_shape, dtype=np.uint8)
    y = np.arange(30, dtype=np.float64) % 2  # integral float labels are accepted
    splits = load_npz(_write(tmp_path, x=x, y=y))
    assert splits.input_shape == input_shape
    assert splits.train.x.shape[1:] == input_shape and splits.train.x.dtype == torch.float32


def _with(**changes: object) -> dict[str, object]:
    return {**_good_arrays(), **changes}


def _without(key: str) -> dict[str, object]:
    arrays = _good_arrays()
    del arrays[key]
    return arrays


BAD_ARRAYS = {
    "x rank 1": (_with(x=np.zeros(60)), "expected (N, d), (N, H, W) or (N, C, H, W)"),
    "x rank 5": (_with(x=np.zeros((60, 1, 2, 2, 2))), "expected (N, d), (N, H, W) or (N, C, H, W)"),
    "empty sample": (_with(x=np.zeros((60, 0))), "expected (N, d)"),
    "y rank 2": (_with(y=np.zeros((60, 1), dtype=int)), "expected (N,) integer labels"),
    "NaN in x": (_with(x=np.where(np.eye(60, 5) > 0, np.nan, 0.0)), "non-finite"),
    "inf in x": (_with(x=np.full((60, 5), np.inf)), "non-finite"),
    "beyond float32": (_with(x=np.full((60, 5), 1e300)), "non-finite"),
    "x strings": (_with(x=np.full((60, 5), "a")), "'x' must hold real numbers"),
    "x bool": (_with(x=np.ones((60, 5), dtype=bool)), "'x' must hold real numbers"),
    "negative label": (_with(y=np.arange(60) % 3 - 1), "negative labels"),
    "float labels": (_with(y=(np.arange(60) % 3) + 0.5), "non-integer values"),
    "string labels": (_with(y=np.array(["a", "b"] * 30)), "integer labels, not dtype"),
    "huge label": (_with(y=np.arange(60) * 10**6), "out of range"),
    "length mismatch": (_with(y=np.arange(59) % 3), "length mismatch"),
    "missing y": (_without("y"), "missing key"),
    "missing x": (_without("x"), "missing key"),
    "x_test alone": (_with(x_test=np.zeros((5, 5))), "missing key"),
    "x_test shape": (_with(x_test=np.zeros((5, 4)), y_test=np.zeros(5, dtype=int)), "'x_test' samples"),
    "empty test": (_with(x_test=np.zeros((0, 5)), y_test=np.zeros(0, dtype=int)), "'x_test' is empty"),
    "NaN in x_test": (_with(x_test=np.full((5, 5), np.nan), y_test=np.zeros(5, dtype=int)), "non-finite"),
    "y_test negative": (_with(x_test=np.zeros((5, 5)), y_test=-np.ones(5, dtype=int)), "negative labels"),
    "one class": (_with(y=np.zeros(60, dtype=int)), "fewer than 2 classes"),
    "few samples": (_good_arrays(n=10), "too few samples"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_user_arrays_are_refused(tmp_path: Path, case: str) -> None:
    arrays, message = BAD_ARRAYS[case]
    path = _write(tmp_path, **arrays)
    with pytest.raises(DatasetError, match="^" + str(path)) as caught:
        load_npz(path)
    assert message in str(caught.value)


def test_label_beyond_num_classes_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, **_good_arrays(num_classes=4))
    assert load_npz(path, num_classes=5).num_classes == 5
    with pytest.raises(DatasetError, match=r"label 3 is out of range; labels must be in \[0, 3\)"):
        load_npz(path, num_classes=3)


def test_wrong_file_types_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "text.npz"
    text.write_text("x,y\n1,2\n")
    npy = tmp_path / "single.npz"
    with npy.open("wb") as f:
        np.save(f, np.zeros((60, 5)))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    for path in (text, npy, empty):
        with pytest.raises(DatasetError, match=r"not a valid \.npz file"):
            load_npz(path)
    with pytest.raises(DatasetError, match="file not found"):
        load_npz(tmp_path / "absent.npz")


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    path = _write(tmp_path, x=np.array([{"a": 1}] * 60, dtype=object), y=np.arange(60) % 3)
    with pytest.raises(DatasetError, match="object arrays need pickle"):
        load_npz(path)


def test_too_large_files_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, **_good_arrays())
    with pytest.raises(DatasetError, match=r"file is too large \(\d+ bytes; the limit is 1000\)"):
        load_npz(path, max_bytes=1000)
    compressed = tmp_path / "compressed.npz"  # small on disk, 8 MB once unpacked
    np.savez_compressed(compressed, x=np.zeros((200_000, 5)), y=np.arange(200_000) % 3)
    assert compressed.stat().st_size < 1_000_000
    with pytest.raises(DatasetError, match="too large uncompressed"):
        load_npz(compressed, max_bytes=1_000_000)
