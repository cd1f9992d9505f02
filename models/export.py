"""A trained model as one portable file: variables, architecture and preprocessing statistics.

The file is an ``.npz`` archive that ``np.load(..., allow_pickle=False)`` reads: every variable
leaf under its path (``params/Dense_0/kernel``), the feature statistics under ``feature_mean``
and ``feature_std``, and a UTF-8 JSON header (format version, :class:`Shape` fields, target
statistics, class labels, metadata) stored as a uint8 array under ``__caviar__``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from caviar.models.errors import CaviarError
from caviar.models.mlp import variable_template
from caviar.models.train import Shape
from caviar.models.train import predict as predict_outputs

FORMAT_VERSION = 1

_HEADER = "__caviar__"
_STATS = ("feature_mean", "feature_std")


class ModelFileError(CaviarError, ValueError):
    """A model file that cannot be read; the message says why."""


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained MLP with what it needs to predict on raw data.

    ``variables`` are the Flax variables of one model (no trial axis). Raw features are
    standardised as ``(x - feature_mean) / feature_std``; regression outputs map back to the
    target's scale as ``prediction * target_std + target_mean``. ``classes`` lists the original
    class labels by id, when known. Construction validates everything against ``shape`` (a
    ValueError says what does not match) and stores numpy copies of the arrays.
    """

    shape: Shape
    variables: dict
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float = 0.0
    target_std: float = 1.0
    classes: list[str | int | float] | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        flat = {path: np.asarray(leaf) for path, leaf in _flatten(self.variables).items()}
        _check_variables(self.shape, flat)
        stats = [
            np.asarray(self.feature_mean, np.float32),
            np.asarray(self.feature_std, np.float32),
        ]
        for name, stat in zip(_STATS, stats, strict=True):
            if stat.shape != (self.shape.input_dim,):
                raise ValueError(
                    f"{name} has shape {stat.shape}; expected ({self.shape.input_dim},)"
                )
            if not np.all(np.isfinite(stat)):
                raise ValueError(f"{name} has non-finite values")
        if not np.all(stats[1] > 0):
            raise ValueError("feature_std must be positive")
        target_mean, target_std = float(self.target_mean), float(self.target_std)
        if not (np.isfinite(target_mean) and np.isfinite(target_std) and target_std > 0):
            raise ValueError(
                f"target_mean must be finite and target_std positive, got {target_mean}, "
                f"{target_std}"
            )
        classes = self.classes
        if classes is not None:
            classes = [c.item() if isinstance(c, np.generic) else c for c in classes]
            if self.shape.task != "classification" or len(classes) != self.shape.num_outputs:
                raise ValueError(
                    f"classes must list the labels of the {self.shape.num_outputs} outputs of a "
                    f"classification model, got {len(classes)} for task {self.shape.task!r}"
                )
            if not all(isinstance(c, str | int | float) for c in classes):
                raise ValueError("class labels must be strings or numbers")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        object.__setattr__(self, "variables", _unflatten(flat))
        object.__setattr__(self, "feature_mean", stats[0])
        object.__setattr__(self, "feature_std", stats[1])
        object.__setattr__(self, "target_mean", target_mean)
        object.__setattr__(self, "target_std", target_std)
        object.__setattr__(self, "classes", classes)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predict from raw features ``[n, features]`` (or one example ``[features]``).

        Returns ``[n]`` class ids, or the original labels when ``classes`` is set, for
        classification; float64 targets on the original scale for regression. Runs in eval mode
        (no dropout, batch-norm running averages). Raises ValueError on a wrong feature count or
        non-finite values.
        """
        x = np.asarray(x, np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.shape.input_dim:
            raise ValueError(
                f"expected {self.shape.input_dim} features (x of shape "
                f"[n, {self.shape.input_dim}]), got x of shape {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("x has non-finite values (NaN or infinity)")
        out = predict_outputs(
            self.shape, self.variables, (x - self.feature_mean) / self.feature_std
        )
        if self.shape.task == "regression":
            return out.astype(np.float64) * self.target_std + self.target_mean
        return out if self.classes is None else np.asarray(self.classes)[out]


def save_model(model: TrainedModel) -> bytes:
    """The model as the bytes of one compressed ``.npz`` file (see the module docstring).

    Raises TypeError when ``metadata`` holds values JSON cannot store (numpy scalars and arrays
    are converted).
    """
    header = {
        "format_version": FORMAT_VERSION,
        "shape": dataclasses.asdict(model.shape),
        "target_mean": model.target_mean,
        "target_std": model.target_std,
        "classes": model.classes,
        "metadata": model.metadata,
    }
    text = json.dumps(header, default=_json_default)
    arrays = {
        _HEADER: np.frombuffer(text.encode(), np.uint8),
        "feature_mean": model.feature_mean,
        "feature_std": model.feature_std,
        **_flatten(model.variables),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def load_model(source: bytes | str | os.PathLike[str]) -> TrainedModel:
    """Read a model file (its bytes, or a path) written by :func:`save_model`.

    Raises ModelFileError when the data is not an npz archive, has no caviar header or another
    format version, or its arrays are missing, corrupt or do not fit the architecture; OSError
    when a path cannot be read.
    """
    try:
        file = io.BytesIO(source) if isinstance(source, bytes) else source
        archive = np.load(file, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ModelFileError("not a caviar model file: not a complete npz archive") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ModelFileError("not a caviar model file: a single .npy array, not an npz archive")
    with archive:
        try:
            arrays = {name: archive[name] for name in archive.files}
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise ModelFileError(f"corrupt model file ({e})") from e
    header = _read_header(arrays.pop(_HEADER, None))
    missing = [name for name in _STATS if name not in arrays]
    if missing:
        raise ModelFileError(f"invalid model file: missing array(s) {', '.join(missing)}")
    feature_mean, feature_std = (arrays.pop(name) for name in _STATS)
    try:
        fields = header["shape"]
        shape = Shape(**{**fields, "hidden": tuple(fields["hidden"])})
        _check_variables(shape, arrays)
        return TrainedModel(
            shape=shape,
            variables=_unflatten(arrays),
            feature_mean=feature_mean,
            feature_std=feature_std,
            target_mean=header["target_mean"],
            target_std=header["target_std"],
            classes=header["classes"],
            metadata=header["metadata"],
        )
    except KeyError as e:
        raise ModelFileError(f"invalid model file: the header lacks {e}") from e
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"invalid model file: {e}") from e


def _read_header(array: np.ndarray | None) -> dict[str, Any]:
    if array is None:
        raise ModelFileError(f"not a caviar model file: no {_HEADER!r} header array")
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ModelFileError(f"invalid model file: the {_HEADER!r} header is not a uint8 vector")
    try:
        header = json.loads(array.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"invalid model file: the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelFileError("invalid model file: the header is not a JSON object")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"unsupported model file format version {version!r}; this version of caviar reads "
            f"version {FORMAT_VERSION}"
        )
    return header


def _check_variables(shape: Shape, flat: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless the flat variable leaves are exactly those of `shape`'s MLP."""
    expected = _leaf_shapes(shape)
    problems = [f"missing {path}" for path in expected if path not in flat]
    problems += [f"unexpected {path}" for path in flat if path not in expected]
    for path, leaf in flat.items():
        if path in expected and leaf.shape != expected[path]:
            problems.append(f"{path} has shape {leaf.shape}, expected {expected[path]}")
        elif path in expected and leaf.dtype.kind != "f":
            problems.append(f"{path} has dtype {leaf.dtype}, expected floating point")
    if problems:
        raise ValueError(f"variables do not fit the architecture: {'; '.join(problems)}")


@functools.lru_cache(maxsize=64)
def _leaf_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Path → array shape of every variable leaf of `shape`'s MLP (traced, nothing computed)."""
    template = variable_template(shape.model, shape.input_dim)
    return {path: tuple(leaf.shape) for path, leaf in _flatten(template).items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → {"params/Dense_0/kernel": leaf}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"model metadata value {value!r} is not JSON-serialisable")
