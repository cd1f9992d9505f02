"""Tests for models.data: built-in datasets, files, splits, standardisation and bad input."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from caviar.models.data import (
    Dataset,
    DatasetError,
    from_arrays,
    infer_task,
    load_dataset,
    read_csv,
    read_npz,
)

SPLITS = ("train", "dev", "test")


def _with_ids(n: int, features: int = 3, seed: int = 0) -> np.ndarray:
    """Random features with a shift and scale, plus column 0 holding the row id 0..n-1."""
    x = np.random.default_rng(seed).normal(5.0, 3.0, size=(n, features))
    x[:, 0] = np.arange(n)
    return x


def _ids(ds: Dataset, split: str) -> np.ndarray:
    """Undo the standardisation of column 0 to recover the original row ids of a split."""
    column = getattr(ds, f"x_{split}")[:, 0]
    return np.rint(column * ds.feature_std[0] + ds.feature_mean[0]).astype(int)


def test_digits() -> None:
    ds = load_dataset({"name": "digits"})
    # 1797 examples: test = round(0.2 * 1797) = 359, dev = round(0.2 * 1438) = 288.
    assert (len(ds.x_train), len(ds.x_dev), len(ds.x_test)) == (1150, 288, 359)
    assert ds.task == "classification"
    assert ds.num_features == 64
    assert ds.num_outputs == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_dev, ds.y_test]))) == set(range(10))
    # Pixel 0 is blank in every image: a constant feature keeps std 1 rather than dividing by 0.
    assert ds.feature_std[0] == 1.0
    assert np.all(np.isfinite(ds.x_train))


def test_mnist1d_default_size() -> None:
    ds = load_dataset({"name": "mnist1d"})
    assert ds.describe() == "mnist1d: 3200 train / 800 dev / 1000 test, 40 features, 10 classes"
    assert ds.x_test.shape == (1000, 40) and ds.x_test.dtype == np.float32
    assert ds.y_test.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_mnist1d_is_deterministic_and_leaves_global_rngs_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)

    first = load_dataset({"name": "mnist1d", "samples": 200}, seed=1)
    assert (np.random.random(), random.random()) == (expected_numpy, expected_python)

    again = load_dataset({"name": "mnist1d", "samples": 200}, seed=1)
    other = load_dataset({"name": "mnist1d", "samples": 200}, seed=2)
    assert (len(first.x_train), len(first.x_dev), len(first.x_test)) == (128, 32, 40)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    assert not np.array_equal(first.x_train, other.x_train)


@pytest.mark.parametrize("classes", [2, 3])
def test_synthetic_classification(classes: int) -> None:
    ds = load_dataset({"name": "synthetic", "samples": 300, "features": 8, "classes": classes})
    assert (len(ds.x_train), len(ds.x_dev), len(ds.x_test)) == (192, 48, 60)
    assert ds.num_features == 8
    assert ds.num_outputs == classes
    assert set(np.unique(ds.y_train)) == set(range(classes))


def test_synthetic_regression() -> None:
    ds = load_dataset(
        {"name": "synthetic", "samples": 300, "features": 4, "task": "regression", "noise": 1.0}
    )
    assert ds.task == "regression"
    assert ds.num_outputs == 1
    assert ds.y_train.dtype == np.float32
    assert ds.describe().endswith("4 features, regression")
    assert abs(ds.y_train.mean()) < 1e-5
    assert ds.y_train.std() == pytest.approx(1.0, abs=1e-5)


def test_splits_are_disjoint_and_cover_everything() -> None:
    n = 137
    ds = from_arrays("ids", _with_ids(n), np.arange(n) % 4)
    ids = {split: _ids(ds, split) for split in SPLITS}
    # test = round(0.2 * 137) = 27, dev = round(0.2 * 110) = 22.
    assert [len(ids[split]) for split in SPLITS] == [88, 22, 27]
    assert sorted(np.concatenate(list(ids.values()))) == list(range(n))
    # Labels travel with their rows.
    np.testing.assert_array_equal(ds.y_test, ids["test"] % 4)


def test_splits_depend_only_on_the_seed() -> None:
    x, y = _with_ids(100), np.arange(100) % 2
    first, again = from_arrays("a", x, y, seed=7), from_arrays("a", x, y, seed=7)
    other = from_arrays("a", x, y, seed=8)
    for split in SPLITS:
        np.testing.assert_array_equal(_ids(first, split), _ids(again, split))
    assert set(_ids(first, "test")) != set(_ids(other, "test"))


def test_fractions_set_split_sizes() -> None:
    ds = from_arrays("f", _with_ids(200), np.arange(200) % 2, dev_fraction=0.25, test_fraction=0.1)
    assert (len(ds.x_train), len(ds.x_dev), len(ds.x_test)) == (135, 45, 20)


def test_standardisation_uses_training_statistics_only() -> None:
    x = _with_ids(400, features=4)
    x[:, 3] = 2.5  # a constant feature
    ds = from_arrays("std", x, np.arange(400) % 3)

    raw_train = x[_ids(ds, "train")]
    np.testing.assert_allclose(ds.feature_mean, raw_train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ds.feature_std[:3], raw_train[:, :3].std(axis=0), rtol=1e-5)
    assert ds.feature_std[3] == 1.0
    assert ds.feature_mean.dtype == ds.feature_std.dtype == np.float32

    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train[:, :3].std(axis=0), 1.0, atol=1e-5)
    # The held-out splits are transformed with the training statistics, not re-centred.
    assert np.all(np.abs(ds.x_test[:, 1:3].mean(axis=0)) > 1e-4)
    np.testing.assert_allclose(
        ds.x_test * ds.feature_std + ds.feature_mean, x[_ids(ds, "test")], atol=1e-4
    )


def test_regression_target_is_standardised_with_training_statistics() -> None:
    n = 120
    y = 100.0 + 2.5 * np.arange(n)  # all distinct, so inferred as regression
    ds = from_arrays("reg", _with_ids(n), y)
    assert ds.task == "regression" and ds.num_outputs == 1
    raw_train = y[_ids(ds, "train")]
    assert ds.target_mean == pytest.approx(raw_train.mean())
    assert ds.target_std == pytest.approx(raw_train.std())
    np.testing.assert_allclose(ds.y_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        ds.y_test * ds.target_std + ds.target_mean, y[_ids(ds, "test")], rtol=1e-5
    )


@pytest.mark.parametrize(
    ("y", "task"),
    [
        (np.array([0, 1, 2, 1] * 5), "classification"),
        (np.array([1.0, 3.0, 5.0] * 5), "classification"),
        (np.array([True, False] * 5), "classification"),
        (np.array(["cat", "dog"] * 5), "classification"),
        (np.array([0.5, 1.25, 2.0] * 5), "regression"),
        (np.arange(101), "regression"),  # integers, but too many distinct values
        (np.arange(100), "classification"),
    ],
)
def test_infer_task(y: np.ndarray, task: str) -> None:
    assert infer_task(y) == task


def test_class_labels_map_to_contiguous_ids_in_sorted_order() -> None:
    y = np.array([10, -3, 7] * 10)
    ds = from_arrays("labels", _with_ids(30), y)
    assert ds.num_outputs == 3
    for split in SPLITS:
        expected = np.searchsorted([-3, 7, 10], y[_ids(ds, split)])
        np.testing.assert_array_equal(getattr(ds, f"y_{split}"), expected)


def test_explicit_task_overrides_inference() -> None:
    ds = from_arrays("counts", _with_ids(50), np.arange(50) % 5, task="regression")
    assert ds.task == "regression" and ds.num_outputs == 1 and ds.y_train.dtype == np.float32
    with pytest.raises(DatasetError, match=r"non-integer values such as 0\.5"):
        from_arrays("floats", _with_ids(50), np.full(50, 0.5), task="classification")


def test_csv_round_trip_with_string_labels(tmp_path: Path) -> None:
    names = ["dog", "cat", "bird"]
    lines = ["id,label,size"] + [f"{i},{names[i % 3]},{i * 0.5 + 1}" for i in range(60)]
    path = tmp_path / "animals.csv"
    path.write_text("\n".join(lines) + "\n")

    ds = load_dataset({"path": str(path), "target": "label"})
    assert ds.name == "animals"
    assert ds.task == "classification"
    assert ds.num_features == 2 and ds.num_outputs == 3
    class_of = {"bird": 0, "cat": 1, "dog": 2}  # sorted label order
    expected = [class_of[names[i % 3]] for i in _ids(ds, "test")]
    np.testing.assert_array_equal(ds.y_test, expected)

    x, y = read_csv(path.read_bytes(), "label")
    assert x.shape == (60, 2) and list(y[:3]) == names
    np.testing.assert_array_equal(x[:, 1], np.arange(60) * 0.5 + 1)


def test_csv_numeric_target_and_task_override(tmp_path: Path) -> None:
    path = tmp_path / "houses.csv"
    rows = [f"{i},{i % 4},{3 * i}" for i in range(40)]
    path.write_text("\n".join(["id,rooms,price", *rows]))
    ds = load_dataset({"path": path, "target": "rooms"})
    assert ds.task == "classification" and ds.num_outputs == 4
    forced = load_dataset({"path": path, "target": "rooms", "task": "regression"})
    assert forced.task == "regression"


def test_npz_with_ready_splits_uses_them(tmp_path: Path) -> None:
    path = tmp_path / "ready.npz"
    x_all, y_all = _with_ids(80), np.arange(80) % 2
    np.savez(
        path,
        x=x_all[:50], y=y_all[:50],
        x_dev=x_all[50:60], y_dev=y_all[50:60],
        x_test=x_all[60:], y_test=y_all[60:],
    )  # fmt: skip
    ds = load_dataset({"path": str(path)})
    np.testing.assert_array_equal(_ids(ds, "train"), np.arange(50))
    np.testing.assert_array_equal(_ids(ds, "dev"), np.arange(50, 60))
    np.testing.assert_array_equal(_ids(ds, "test"), np.arange(60, 80))
    np.testing.assert_allclose(ds.feature_mean, x_all[:50].mean(axis=0), rtol=1e-5)


def test_npz_with_only_a_test_split_splits_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "test_only.npz"
    x_all, y_all = _with_ids(70), np.arange(70) % 2
    np.savez(path, x=x_all[:50], y=y_all[:50], x_test=x_all[50:], y_test=y_all[50:])
    ds = load_dataset({"path": path})
    assert (len(ds.x_train), len(ds.x_dev), len(ds.x_test)) == (40, 10, 20)
    assert sorted(np.concatenate([_ids(ds, "train"), _ids(ds, "dev")])) == list(range(50))


def test_read_npz_from_bytes_reshapes_1d_x(tmp_path: Path) -> None:
    path = tmp_path / "flat.npz"
    np.savez(path, x=np.arange(20.0), y=np.arange(20) % 2)
    x, y, splits = read_npz(path.read_bytes())
    assert x.shape == (20, 1) and y.shape == (20,) and splits is None


def _write(tmp_path: Path, name: str, content: str | dict[str, np.ndarray]) -> str:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        # mypy checks **content against the stub's `allow_pickle: bool` too
        np.savez(path, **content)  # type: ignore[arg-type]
    return str(path)


CSV_ROWS = "\n".join(f"{i},{i % 2}" for i in range(20))


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("no_label.csv", "a,b\n" + CSV_ROWS, {"target": "label"}, "no column named 'label'"),
        ("nan.csv", "a,label\n1,0\nnan,1\n" + CSV_ROWS, {"target": "label"}, r"line 3.*'a'"),
        ("text.csv", "a,label\n1,0\nabc,1\n" + CSV_ROWS, {"target": "label"}, r"line 3.*'abc'"),
        ("ragged.csv", "a,label\n1,0\n2,1,5\n" + CSV_ROWS, {"target": "label"}, "line 3 has 3"),
        ("empty.csv", "", {"target": "label"}, "empty"),
        ("no_target.csv", "a,label\n" + CSV_ROWS, {}, "needs 'target'"),
        (
            "pickled.npz",
            {"x": np.array([[{"a": 1}]] * 20, dtype=object), "y": np.zeros(20)},
            {},
            "(?i)array 'x' .*object arrays",
        ),
        ("no_y.npz", {"x": np.zeros((20, 2))}, {}, "missing y"),
        ("lengths.npz", {"x": np.zeros((20, 2)), "y": np.zeros(19)}, {}, "x has 20 rows"),
        ("cube.npz", {"x": np.zeros((20, 2, 2)), "y": np.zeros(20)}, {}, "must be 2-D"),
        (
            "inf.npz",
            {"x": np.array([[1.0], [np.inf]] * 10), "y": np.arange(20)},
            {},
            r"x\[1, 0\] is inf",
        ),
        ("garbage.npz", "not a zip", {}, "not an npz archive"),
        ("data.json", "{}", {}, "unsupported file type '.json'"),
    ],
)
def test_bad_files_raise_dataset_error(
    tmp_path: Path, name: str, content: str | dict[str, np.ndarray], extra: dict, message: str
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DatasetError, match=message):
        load_dataset({"path": path, **extra})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"name": "cifar"}, "unknown dataset name 'cifar'"),
        ({"name": ["digits"]}, "unknown dataset name"),
        ({"name": "digits", "path": "x.csv"}, "exactly one of 'name'"),
        ({}, "exactly one of 'name'"),
        ({"name": "mnist1d", "size": 10}, "unknown key.*size"),
        ({"name": "mnist1d", "samples": 5}, "'samples' must be an integer >= 10"),
        ({"name": "synthetic", "task": "ranking"}, "task must be one of"),
        ({"path": "missing.csv", "target": "y"}, "file not found"),
    ],
)
def test_bad_sources_raise_dataset_error(source: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(source)


def test_bad_arrays_raise_dataset_error() -> None:
    x = _with_ids(20)
    with pytest.raises(DatasetError, match="at least 10"):
        from_arrays("tiny", x[:5], np.arange(5) % 2)
    x_nan = x.copy()
    x_nan[4, 2] = np.nan
    with pytest.raises(DatasetError, match=r"x\[4, 2\] is nan"):
        from_arrays("nan", x_nan, np.arange(20) % 2)
    with pytest.raises(DatasetError, match="y\\[3\\] is nan"):
        from_arrays("nan", x, np.where(np.arange(20) == 3, np.nan, 1.5))
    with pytest.raises(DatasetError, match="single class"):
        from_arrays("one", x, np.zeros(20, dtype=int))
    with pytest.raises(DatasetError, match="dev split is empty"):
        from_arrays("small", x, np.arange(20) % 2, dev_fraction=0.01)
    with pytest.raises(DatasetError, match="string labels"):
        from_arrays("words", x, np.array(["a", "b"] * 10), task="regression")
