"""Model files: a trained model saved, loaded back and used on new raw data."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from caviar.models.data import Dataset, load_dataset
from caviar.models.export import (
    FORMAT_VERSION,
    ModelFileError,
    TrainedModel,
    load_model,
    save_model,
)
from caviar.models.train import Shape, TrainData, predict, train_batch


def _train(ds: Dataset, shape: Shape, hparams: dict) -> dict:
    data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev, ds.target_std)
    return train_batch(shape, [hparams], data, epochs=8).trial_variables(0)


def _raw(ds: Dataset, x: np.ndarray) -> np.ndarray:
    """Undo the dataset's standardisation: the features as a user would have them."""
    return x.astype(np.float64) * ds.feature_std + ds.feature_mean


def _model(ds: Dataset, shape: Shape, variables: dict, **kwargs) -> TrainedModel:
    return TrainedModel(
        shape=shape,
        variables=variables,
        feature_mean=ds.feature_mean,
        feature_std=ds.feature_std,
        target_mean=ds.target_mean,
        target_std=ds.target_std,
        **kwargs,
    )


@pytest.fixture(scope="module")
def blobs() -> Dataset:
    return load_dataset({"name": "synthetic", "samples": 400, "features": 6, "classes": 3}, seed=3)


@pytest.fixture(scope="module")
def classifier(blobs: Dataset) -> TrainedModel:
    """Batch norm and dropout: eval mode must use running averages and no dropout."""
    shape = Shape(
        input_dim=blobs.num_features,
        num_outputs=blobs.num_outputs,
        hidden=(16, 8),
        batch_norm=True,
        use_dropout=True,
        batch_size=32,
    )
    variables = _train(blobs, shape, {"learning_rate": 0.01, "dropout": 0.2, "seed": 1})
    return _model(blobs, shape, variables, metadata={"search": "s-1", "dev_accuracy": 0.9})


@pytest.fixture(scope="module")
def regression() -> Dataset:
    return load_dataset(
        {"name": "synthetic", "samples": 400, "features": 4, "task": "regression", "noise": 5.0},
        seed=2,
    )


def test_classifier_round_trip_predicts_the_same_on_raw_data(
    blobs: Dataset, classifier: TrainedModel
) -> None:
    loaded = load_model(save_model(classifier))
    assert loaded.shape == classifier.shape
    assert loaded.metadata == {"search": "s-1", "dev_accuracy": 0.9}
    assert "batch_stats" in loaded.variables

    x_new = _raw(blobs, blobs.x_test)
    ids = loaded.predict(x_new)
    np.testing.assert_array_equal(ids, classifier.predict(x_new))
    assert ids.dtype.kind == "i" and ids.shape == (len(x_new),)
    # Standardising the raw data again reproduces the engine's predictions on the dataset.
    engine = predict(classifier.shape, classifier.variables, blobs.x_test)
    assert np.mean(ids == engine) > 0.99
    assert np.mean(ids == blobs.y_test) > 0.6
    # One example as a vector of features gives one prediction.
    np.testing.assert_array_equal(loaded.predict(x_new[0]), ids[:1])


def test_class_labels_map_ids_to_the_original_labels(
    blobs: Dataset, classifier: TrainedModel
) -> None:
    labelled = _model(
        blobs, classifier.shape, classifier.variables, classes=np.array(["ant", "bee", "cat"])
    )
    loaded = load_model(save_model(labelled))
    assert loaded.classes == ["ant", "bee", "cat"]
    x_new = _raw(blobs, blobs.x_test[:50])
    np.testing.assert_array_equal(
        loaded.predict(x_new), np.array(["ant", "bee", "cat"])[classifier.predict(x_new)]
    )
    with pytest.raises(ValueError, match="labels of the 3 outputs"):
        _model(blobs, classifier.shape, classifier.variables, classes=["ant", "bee"])


def test_regression_predicts_on_the_original_target_scale(regression: Dataset, tmp_path) -> None:
    shape = Shape(
        input_dim=regression.num_features,
        num_outputs=1,
        hidden=(16,),
        task="regression",
        batch_size=32,
    )
    variables = _train(regression, shape, {"learning_rate": 0.01, "seed": 0})
    path = tmp_path / "model.npz"
    path.write_bytes(save_model(_model(regression, shape, variables)))
    loaded = load_model(path)
    assert loaded.target_mean == regression.target_mean
    assert loaded.target_std == regression.target_std

    y_pred = loaded.predict(_raw(regression, regression.x_test))
    y_raw = regression.y_test.astype(np.float64) * regression.target_std + regression.target_mean
    r2 = 1 - np.sum((y_pred - y_raw) ** 2) / np.sum((y_raw - y_raw.mean()) ** 2)
    assert r2 > 0.5
    engine = predict(shape, variables, regression.x_test)
    expected = engine * regression.target_std + regression.target_mean
    np.testing.assert_allclose(y_pred, expected, rtol=1e-4, atol=1e-3 * regression.target_std)


def test_wrong_feature_count_names_expected_and_got(classifier: TrainedModel) -> None:
    with pytest.raises(ValueError, match=r"expected 6 features.*shape \(2, 5\)"):
        classifier.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        classifier.predict(np.full((1, 6), np.nan))


def test_file_is_a_plain_npz_without_pickles(classifier: TrainedModel) -> None:
    with np.load(io.BytesIO(save_model(classifier)), allow_pickle=False) as archive:
        assert {"__caviar__", "feature_mean", "feature_std", "params/Dense_0/kernel"} <= set(
            archive.files
        )
        assert "batch_stats/BatchNorm_0/mean" in archive.files
        header = json.loads(archive["__caviar__"].tobytes())
        arrays = {name: archive[name] for name in archive.files}
    assert header["format_version"] == FORMAT_VERSION
    assert header["shape"]["hidden"] == [16, 8]
    assert all(a.dtype != object for a in arrays.values())


def _rewrite(data: bytes, change) -> bytes:
    """The model file with its arrays (a dict, header decoded) edited by `change`."""
    with np.load(io.BytesIO(data)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays["__caviar__"].tobytes())
    change(arrays, header)
    arrays["__caviar__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_bad_files_raise_model_file_errors(classifier: TrainedModel) -> None:
    data = save_model(classifier)
    cases = [
        (b"definitely not a model", "not a complete npz archive"),
        (data[: len(data) // 2], "not a complete npz archive"),  # truncated
        (_npy_bytes(np.zeros(3)), "a single .npy array"),
        (_without_header(data), "no '__caviar__' header"),
        (_rewrite(data, lambda a, h: h.update(format_version=2)), "format version 2"),
        (_rewrite(data, lambda a, h: h.pop("classes")), "lacks 'classes'"),
        (_rewrite(data, lambda a, h: a.pop("feature_std")), "missing array\\(s\\) feature_std"),
        (
            _rewrite(data, lambda a, h: a.pop("params/Dense_1/kernel")),
            "missing params/Dense_1/kernel",
        ),
        (
            _rewrite(data, lambda a, h: a.update({"params/Dense_0/kernel": np.zeros((6, 4))})),
            "params/Dense_0/kernel has shape \\(6, 4\\), expected \\(6, 16\\)",
        ),
        (
            _rewrite(data, lambda a, h: a.update({"params/Dense_9/bias": np.zeros(3)})),
            "unexpected params/Dense_9/bias",
        ),
    ]
    for content, message in cases:
        with pytest.raises(ModelFileError, match=message):
            load_model(content)


def test_corrupt_member_data_is_a_model_file_error(classifier: TrainedModel) -> None:
    data = bytearray(save_model(classifier))
    start = data.index(b"params/Dense_0/kernel.npy") + 200  # inside the compressed kernel
    data[start : start + 64] = bytes(64)
    with pytest.raises(ModelFileError, match="corrupt model file"):
        load_model(bytes(data))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _without_header(data: bytes) -> bytes:
    with np.load(io.BytesIO(data)) as archive:
        arrays = {name: archive[name] for name in archive.files if name != "__caviar__"}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_readme_example_runs_beside_a_users_own_models_py(
    classifier: TrainedModel, blobs: Dataset, tmp_path
) -> None:
    """Caviar installs as `caviar.*`: a notebook's own models.py, db.py, search.py or service.py
    in the working directory shadows nothing of it."""
    for name in ("models", "db", "search", "service"):
        (tmp_path / f"{name}.py").write_text(f"OWNER = 'the user, not Caviar ({name})'\n")
    (tmp_path / "best.npz").write_bytes(save_model(classifier))
    raw_x = _raw(blobs, blobs.x_test)
    np.save(tmp_path / "raw_x.npy", raw_x)
    snippet = (
        "import numpy as np\n"
        "import models\n"
        "from caviar.models.export import load_model\n"
        "model = load_model('best.npz')\n"
        "np.save('predictions.npy', model.predict(np.load('raw_x.npy')))\n"
        "print(models.OWNER)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "the user, not Caviar" in done.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "predictions.npy"), classifier.predict(raw_x))
