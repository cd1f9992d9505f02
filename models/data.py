"""Datasets for the training engine: loading, validation, train/dev/test splits, standardisation.

Every dataset ends up as a :class:`Dataset` of float32 features standardised with statistics of
the training split only, and int32 class ids (classification) or a standardised float32 target
(regression). Anything wrong with the input raises :class:`DatasetError` with a message meant for
the user who wrote the ``dataset:`` block of a search spec.
"""

from __future__ import annotations

import csv
import io
import lzma
import os
import random
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

import numpy as np

from caviar.models.errors import CaviarError

Task = Literal["classification", "regression"]
"""What a dataset's targets are: class ids or real values; every package uses this one."""

MIN_EXAMPLES = 10
"""Fewest examples (over all splits) a dataset may have."""

MAX_CLASSES = 100
"""Integer-valued targets with more distinct values than this are inferred to be regression."""

_TASKS: tuple[str, ...] = get_args(Task)
_BUILTIN_KEYS: dict[str, set[str]] = {
    "digits": {"name"},
    "mnist1d": {"name", "samples"},
    "synthetic": {"name", "samples", "features", "classes", "task", "noise"},
}
_SPLIT_KEYS = {"x_dev", "y_dev", "x_test", "y_test"}


class DatasetError(CaviarError, ValueError):
    """A dataset that cannot be loaded or is malformed; the message says why."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/dev/test splits ready for the engine.

    ``x_*`` are float32 ``[n, features]``, standardised with the training split's statistics
    (``feature_mean``/``feature_std``; the std is 1.0 where a feature is constant on train).
    ``y_*`` are int32 class ids ``0..num_outputs-1`` for classification, or for regression a
    float32 target standardised so that ``y_original = y * target_std + target_mean``.
    """

    name: str
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_dev: np.ndarray
    y_dev: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def num_features(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])

    def describe(self) -> str:
        """One line, e.g. ``mnist1d: 3200 train / 800 dev / 1000 test, 40 features, 10 classes``."""
        outputs = f"{self.num_outputs} classes" if self.task == "classification" else "regression"
        features = f"{self.num_features} feature{'' if self.num_features == 1 else 's'}"
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_dev)} dev / "
            f"{len(self.x_test)} test, {features}, {outputs}"
        )


class _Split(TypedDict):
    """How `load_dataset` splits any dataset (passed on to `from_arrays`)."""

    seed: int
    dev_fraction: float
    test_fraction: float


def load_dataset(
    source: Mapping[str, Any],
    *,
    seed: int = 0,
    dev_fraction: float = 0.2,
    test_fraction: float = 0.2,
    task: Task | None = None,
) -> Dataset:
    """Load the dataset described by a spec's ``dataset:`` block and split it.

    ``source`` is one of ``{"name": "digits"}``, ``{"name": "mnist1d", "samples": 5000}``,
    ``{"name": "synthetic", "samples", "features", "classes", "task", "noise"}``,
    ``{"path": "file.csv", "target": "column"}`` or ``{"path": "file.npz"}``; file sources may
    also give ``task`` to override inference. Relative paths resolve against the working
    directory. ``seed`` drives both generation (mnist1d, synthetic) and the split.
    """
    if not isinstance(source, Mapping):
        raise DatasetError(
            f"dataset must be a mapping with 'name' or 'path', got {type(source).__name__}"
        )
    if ("name" in source) == ("path" in source):
        raise DatasetError(
            "dataset needs exactly one of 'name' (a built-in dataset: "
            f"{', '.join(_BUILTIN_KEYS)}) or 'path' (a .csv or .npz file)"
        )
    task = _merge_task(source.get("task"), task)
    split: _Split = {"seed": seed, "dev_fraction": dev_fraction, "test_fraction": test_fraction}
    if "path" in source:
        return _load_file(source, task=task, **split)

    name = source["name"]
    if not isinstance(name, str) or name not in _BUILTIN_KEYS:
        raise DatasetError(
            f"unknown dataset name {name!r}; built-in datasets are {', '.join(_BUILTIN_KEYS)} "
            "(or give a 'path' to a .csv or .npz file)"
        )
    _check_keys(source, _BUILTIN_KEYS[name], f"dataset {name!r}")
    if name == "digits":
        from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

        x, y = load_digits(return_X_y=True)
    elif name == "mnist1d":
        samples = _int_option(source, "samples", 5000, MIN_EXAMPLES, name)
        x, y = _make_mnist1d(samples, seed)
    else:
        x, y, task = _make_synthetic(source, task, seed)
    return from_arrays(name, x, y, task=task, **split)


def from_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    dev_fraction: float = 0.2,
    test_fraction: float = 0.2,
    task: Task | None = None,
    splits: Mapping[str, np.ndarray] | None = None,
) -> Dataset:
    """Validate, split and standardise in-memory arrays.

    ``x`` is ``[n, features]`` (1-D is read as one feature), ``y`` is ``[n]`` numbers or string
    labels. Without ``splits``, ``round(test_fraction * n)`` random examples become the test
    split and ``round(dev_fraction * rest)`` of the rest the dev split. ``splits`` may supply a
    ready ``x_test``/``y_test`` and optionally ``x_dev``/``y_dev``; ``x``/``y`` then hold the
    remaining examples (split into dev and train by the rule above when no dev split is given).
    The task is inferred with :func:`infer_task` when ``task`` is None.
    """
    for label, fraction in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise DatasetError(f"{label} must be a number, got {fraction!r}")
        if not 0 < fraction < 1:
            raise DatasetError(f"{label} must be between 0 and 1 (exclusive), got {fraction}")
    if task is not None and task not in _TASKS:
        raise DatasetError(f"task must be one of {', '.join(_TASKS)}, got {task!r}")

    x, y = _check_xy(x, y, name)
    rng = np.random.default_rng(seed)
    if splits is None:
        order = rng.permutation(len(x))
        n_test = round(test_fraction * len(x))
        x_test, y_test = x[order[:n_test]], y[order[:n_test]]
        x, y = x[order[n_test:]], y[order[n_test:]]
        ready_dev = None
    else:
        _check_split_names(set(splits), name)
        x_test, y_test = _check_xy(splits["x_test"], splits["y_test"], name, "_test")
        ready_dev = (splits["x_dev"], splits["y_dev"]) if "x_dev" in splits else None
    if ready_dev is not None:
        x_dev, y_dev = _check_xy(*ready_dev, name, "_dev")
        x_train, y_train = x, y
    else:
        order = rng.permutation(len(x))
        n_dev = round(dev_fraction * len(x))
        x_dev, y_dev = x[order[:n_dev]], y[order[:n_dev]]
        x_train, y_train = x[order[n_dev:]], y[order[n_dev:]]

    xs = {"train": x_train, "dev": x_dev, "test": x_test}
    ys = {"train": y_train, "dev": y_dev, "test": y_test}
    total = sum(len(part) for part in xs.values())
    if total < MIN_EXAMPLES:
        raise DatasetError(f"{name}: only {total} examples; at least {MIN_EXAMPLES} are needed")
    for split, part in xs.items():
        if len(part) == 0:
            raise DatasetError(
                f"{name}: the {split} split is empty ({total} examples, "
                f"dev_fraction={dev_fraction}, test_fraction={test_fraction})"
            )
        if part.shape[1] != x_train.shape[1]:
            raise DatasetError(
                f"{name}: the {split} split has {part.shape[1]} features but train has "
                f"{x_train.shape[1]}"
            )
    if len({part.dtype.kind == "U" for part in ys.values()}) > 1:
        raise DatasetError(f"{name}: the splits mix string labels and numeric labels")

    y_all = np.concatenate(list(ys.values()))
    task = task or infer_task(y_all)
    target_mean, target_std = 0.0, 1.0
    if task == "classification":
        if y_all.dtype.kind == "f" and not np.array_equal(y_all, np.round(y_all)):
            example = y_all[y_all != np.round(y_all)][0]
            raise DatasetError(
                f"{name}: task is classification but y has non-integer values such as {example}"
            )
        classes, ids = np.unique(y_all, return_inverse=True)
        if len(classes) < 2:
            raise DatasetError(f"{name}: y has a single class ({classes[0]}); need at least 2")
        num_outputs = len(classes)
        bounds = np.cumsum([len(part) for part in ys.values()])[:-1]
        ys = dict(zip(ys, np.split(ids.astype(np.int32), bounds), strict=True))
    else:
        if y_all.dtype.kind == "U":
            raise DatasetError(f"{name}: task is regression but y holds string labels")
        num_outputs = 1
        target_mean = float(np.mean(y_train, dtype=np.float64))
        target_std = float(np.std(y_train, dtype=np.float64)) or 1.0
        ys = {k: ((v - target_mean) / target_std).astype(np.float32) for k, v in ys.items()}

    with np.errstate(over="ignore"):  # an overflow is refused just below
        feature_mean = x_train.mean(axis=0, dtype=np.float64)
        feature_std = x_train.std(axis=0, dtype=np.float64)
    float32_max = float(np.finfo(np.float32).max)
    if not all(np.all(np.abs(v) <= float32_max) for v in (feature_mean, feature_std)):
        raise DatasetError(
            f"{name}: x holds values too large to standardise in float32 (the mean or spread "
            f"of a feature is over {float32_max:.3g}); scale the features down"
        )
    feature_std[feature_std == 0] = 1.0
    xs = {k: ((v - feature_mean) / feature_std).astype(np.float32) for k, v in xs.items()}
    return Dataset(
        name=name,
        task=task,
        x_train=xs["train"],
        y_train=ys["train"],
        x_dev=xs["dev"],
        y_dev=ys["dev"],
        x_test=xs["test"],
        y_test=ys["test"],
        num_outputs=num_outputs,
        feature_mean=feature_mean.astype(np.float32),
        feature_std=feature_std.astype(np.float32),
        target_mean=target_mean,
        target_std=target_std,
    )


#: Features of a synthetic dataset whose source names none.
SYNTHETIC_FEATURES = 20


def _informative(features: int) -> int:
    """The informative features of a synthetic classification dataset of `features`."""
    return min(features, max(2, features // 2))


def max_synthetic_classes(features: int) -> int:
    """The most classes a synthetic dataset of `features` features can be made with (one
    cluster a class, each on a corner of the informative features' hypercube)."""
    return 2 ** min(_informative(features), 62)


def infer_task(y: np.ndarray) -> Task:
    """Classification for string/boolean labels or integer values with at most
    ``MAX_CLASSES`` distinct values; regression otherwise."""
    y = np.asarray(y)
    if y.dtype.kind in "bU":
        return "classification"
    if y.dtype.kind in "iu":
        integral = True
    elif y.dtype.kind == "f":
        integral = bool(np.all(np.isfinite(y)) and np.array_equal(y, np.round(y)))
    else:
        raise DatasetError(f"cannot infer a task from labels of dtype {y.dtype}")
    return "classification" if integral and len(np.unique(y)) <= MAX_CLASSES else "regression"


def read_npz(
    source: str | os.PathLike[str] | bytes,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """Read an ``.npz`` archive (a path, or the file's bytes) holding ``x`` and ``y``.

    Returns ``(x, y, splits)``: ``splits`` holds ready ``x_test``/``y_test`` (and
    ``x_dev``/``y_dev`` if present), or is None when the archive has none. Pickled arrays are
    refused.
    """
    where = _where(source, "npz")
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        loaded = np.load(file, allow_pickle=False)
    except FileNotFoundError as e:
        raise DatasetError(f"{where}: file not found") from e
    except OSError as e:
        raise DatasetError(f"{where}: cannot read file ({e})") from e
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{where}: not an npz archive; save one with numpy.savez") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(f"{where}: not an npz archive (a single .npy array?); use np.savez")
    with loaded:
        names = set(loaded.files)
        missing = {"x", "y"} - names
        unknown = names - {"x", "y"} - _SPLIT_KEYS
        if missing or unknown:
            problems = [f"missing {', '.join(sorted(missing))}"] if missing else []
            problems += [f"unexpected {', '.join(sorted(unknown))}"] if unknown else []
            raise DatasetError(
                f"{where}: {'; '.join(problems)} (expected arrays x and y, optionally "
                "x_test and y_test, and x_dev and y_dev)"
            )
        arrays: dict[str, np.ndarray] = {}
        for key in loaded.files:
            try:
                arrays[key] = loaded[key]
            except ValueError as e:  # pickled (object dtype) or malformed array
                raise DatasetError(
                    f"{where}: cannot load array {key!r} ({e}); store plain numbers, or strings "
                    "for labels"
                ) from e
            except (OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError) as e:
                raise DatasetError(f"{where}: array {key!r} is corrupt ({e})") from e
    x, y = _check_xy(arrays.pop("x"), arrays.pop("y"), where)
    if not arrays:
        return x, y, None
    _check_split_names(set(arrays), where)
    splits: dict[str, np.ndarray] = {}
    for suffix in ("_test", "_dev"):
        if f"x{suffix}" in arrays:
            splits[f"x{suffix}"], splits[f"y{suffix}"] = _check_xy(
                arrays[f"x{suffix}"], arrays[f"y{suffix}"], where, suffix
            )
    return x, y, splits


def read_csv(source: str | os.PathLike[str] | bytes, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV (a path, or the file's bytes) with a header row.

    Column ``target`` becomes ``y``: float64 if every cell is a number, else string labels.
    All other columns must be numeric and become ``x`` (float64 ``[n, features]``).
    """
    where = _where(source, "CSV")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError as e:
        raise DatasetError(f"{where}: file not found") from e
    except OSError as e:
        raise DatasetError(f"{where}: cannot read file ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: not UTF-8 text ({e})") from e

    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    lines: list[int] = []
    rows: list[list[str]] = []
    try:
        for row in reader:
            if not row:
                continue
            if header is None:
                header = [cell.strip() for cell in row]
            elif len(row) != len(header):
                raise DatasetError(
                    f"{where}: line {reader.line_num} has {len(row)} fields but the header has "
                    f"{len(header)}"
                )
            else:
                lines.append(reader.line_num)
                rows.append(row)
    except csv.Error as e:
        raise DatasetError(f"{where}: line {reader.line_num}: {e}") from e
    if header is None:
        raise DatasetError(f"{where}: the file is empty; expected a header row")
    if not rows:
        raise DatasetError(f"{where}: no data rows after the header")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{where}: duplicate column names: {', '.join(duplicates)}")
    if target not in header:
        raise DatasetError(
            f"{where}: no column named {target!r} for the target; columns are {', '.join(header)}"
        )
    if len(header) == 1:
        raise DatasetError(f"{where}: no feature columns besides the target {target!r}")

    cells = np.array(rows, dtype=str)
    t = header.index(target)
    feature_columns = [i for i in range(len(header)) if i != t]
    try:
        x = cells[:, feature_columns].astype(np.float64)
    except ValueError:  # slow path: parse cell by cell to report the first bad one
        x = np.array(
            [
                [
                    _parse_number(row[i], f"{where}: line {line}, column {header[i]!r}")
                    for i in feature_columns
                ]
                for line, row in zip(lines, rows, strict=True)
            ]
        )
    bad: np.ndarray = np.argwhere(~np.isfinite(x))
    if len(bad):
        r, j = bad[0]
        raise DatasetError(
            f"{where}: line {lines[r]}, column {header[feature_columns[j]]!r}: non-finite value "
            f"{rows[r][feature_columns[j]].strip()!r}"
        )

    labels = np.char.strip(cells[:, t])
    empty = np.flatnonzero(labels == "")
    if len(empty):
        raise DatasetError(f"{where}: line {lines[empty[0]]}: empty value in target {target!r}")
    try:
        y = labels.astype(np.float64)
    except ValueError:
        return x, labels
    bad = np.flatnonzero(~np.isfinite(y))
    if len(bad):
        raise DatasetError(
            f"{where}: line {lines[bad[0]]}, column {target!r}: non-finite value {labels[bad[0]]!r}"
        )
    return x, y


def _load_file(source: Mapping[str, Any], *, task: Task | None, **split: Any) -> Dataset:
    path = source["path"]
    if not isinstance(path, str | os.PathLike):
        raise DatasetError(f"dataset 'path' must be a string, got {path!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        _check_keys(source, {"path", "target", "task"}, f"CSV dataset {str(path)!r}")
        target = source.get("target")
        if not isinstance(target, str):
            raise DatasetError(
                f"CSV dataset {str(path)!r} needs 'target', the name of the label column"
            )
        x, y = read_csv(path, target)
        splits = None
    elif suffix == ".npz":
        _check_keys(source, {"path", "task"}, f"npz dataset {str(path)!r}")
        x, y, splits = read_npz(path)
    else:
        raise DatasetError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; use .csv or .npz"
        )
    return from_arrays(path.stem, x, y, task=task, splits=splits, **split)


def _make_mnist1d(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate mnist1d offline (``samples`` is rounded down to a multiple of 10 classes)."""
    from mnist1d.data import get_dataset_args, make_dataset  # imported lazily: slow to import

    args = get_dataset_args()
    args.num_samples = samples
    args.seed = seed
    # make_dataset reseeds the global `random` and `np.random` generators; leave them as found.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]])


def _make_synthetic(
    source: Mapping[str, Any], task: Task | None, seed: int
) -> tuple[np.ndarray, np.ndarray, Task]:
    """Generate scikit-learn's make_classification/make_regression data from a source block."""
    from sklearn.datasets import make_classification, make_regression

    samples = _int_option(source, "samples", 2000, MIN_EXAMPLES, "synthetic")
    features = _int_option(source, "features", SYNTHETIC_FEATURES, 1, "synthetic")
    task = task or "classification"
    if task == "regression":
        if "classes" in source:
            raise DatasetError("synthetic: 'classes' does not apply to task 'regression'")
        noise = source.get("noise", 0.1)
        if isinstance(noise, bool) or not isinstance(noise, int | float) or noise < 0:
            raise DatasetError(f"synthetic: 'noise' must be a number >= 0, got {noise!r}")
        x, y = make_regression(
            n_samples=samples, n_features=features, noise=noise, random_state=seed
        )
        return x, y, task

    if "noise" in source:
        raise DatasetError("synthetic: 'noise' only applies to task 'regression'")
    classes = _int_option(source, "classes", 2, 2, "synthetic")
    informative = _informative(features)
    try:
        x, y = make_classification(
            n_samples=samples,
            n_features=features,
            n_informative=informative,
            n_redundant=min(2, features - informative),
            n_classes=classes,
            n_clusters_per_class=2 if classes * 2 <= 2**informative else 1,
            random_state=seed,
        )
    except ValueError as e:
        raise DatasetError(
            f"synthetic: cannot make {classes} classes from {features} features ({e})"
        ) from e
    return x, y, task


def _check_xy(x: Any, y: Any, where: str, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Validate one (x, y) pair: dtypes, shapes, matching lengths, finite values."""
    x_name, y_name = f"x{suffix}", f"y{suffix}"
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: {x_name} must be numeric, got dtype {x.dtype}")
    if y.dtype.kind not in "biufU":
        raise DatasetError(
            f"{where}: {y_name} must hold numbers or string labels, got dtype {y.dtype}"
        )
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2 or x.shape[1] == 0:
        raise DatasetError(f"{where}: {x_name} must be 2-D [examples, features], got {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{where}: {y_name} must be 1-D [examples], got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{where}: {x_name} has {len(x)} rows but {y_name} has {len(y)}")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        r, c = bad[0]
        raise DatasetError(f"{where}: {x_name}[{r}, {c}] is {x[r, c]}; values must be finite")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        r = np.flatnonzero(~np.isfinite(y))[0]
        raise DatasetError(f"{where}: {y_name}[{r}] is {y[r]}; values must be finite")
    return x, y


def _parse_number(cell: str, where: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise DatasetError(f"{where}: {cell.strip()!r} is not a number") from None


def _check_split_names(names: set[str], where: str) -> None:
    """Ready splits are x_test and y_test, optionally with x_dev and y_dev."""
    if not {"x_test", "y_test"} <= names <= _SPLIT_KEYS or ("x_dev" in names) != ("y_dev" in names):
        raise DatasetError(
            f"{where}: ready splits must be x_test and y_test, optionally with x_dev and y_dev; "
            f"got {', '.join(sorted(names))}"
        )


def _check_keys(source: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(source) - allowed
    if unknown:
        raise DatasetError(
            f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _int_option(source: Mapping[str, Any], key: str, default: int, minimum: int, what: str) -> int:
    value = source.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"{what}: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _merge_task(from_source: Any, argument: Task | None) -> Task | None:
    """Combine a ``task`` key in the source block with the ``task`` argument."""
    if from_source is None:
        return argument
    if from_source not in _TASKS:
        raise DatasetError(f"task must be one of {', '.join(_TASKS)}, got {from_source!r}")
    if argument is not None and argument != from_source:
        raise DatasetError(f"dataset task {from_source!r} conflicts with task {argument!r}")
    return from_source


def _where(source: str | os.PathLike[str] | bytes, kind: str) -> str:
    return f"{kind} data" if isinstance(source, bytes) else str(source)
