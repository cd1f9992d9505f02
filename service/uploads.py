"""Safe parsing of uploaded datasets (``.npz`` or ``.csv``) before they are stored.

Size limits are enforced before any data is decoded: npz members' shapes and dtypes are read
from their ``.npy`` headers, so a zip bomb or a pickled object array is refused without being
decompressed or unpickled. The data is then validated by :mod:`models.data` exactly as a search
would load it. Every rejection is an :class:`UploadError` with an HTTP status and a reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import lzma
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

import numpy as np
from numpy.lib import format as npy_format

from caviar.models.data import DatasetError, from_arrays, read_csv, read_npz
from caviar.models.errors import CaviarError
from caviar.search.spec import MAX_NAME_LENGTH, text_problem

#: Array names whose first axis counts examples (their sum is the upload's rows).
_X_ARRAYS = ("x", "x_dev", "x_test")


#: What an upload's labels are; see :func:`label_kind`.
LabelKind = Literal["text", "integer", "real"]


@dataclass(frozen=True)
class UploadLimits:
    """Caps on an upload: file size and declared array bytes (413); columns, rows, npz members
    and the length of the file name and target (422)."""

    max_bytes: int = 64 * 2**20
    max_array_bytes: int = 256 * 2**20
    max_columns: int = 10_000
    max_rows: int = 5_000_000
    max_members: int = 16
    max_name_length: int = MAX_NAME_LENGTH


class UploadError(CaviarError, ValueError):
    """An upload refused with an HTTP status and a reason the user can act on."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # raised in a parser process
        return UploadError, (self.status_code, self.reason)


@dataclass(frozen=True)
class ParsedUpload:
    """What a valid upload holds: examples over all splits, feature columns, outputs of the
    task its labels imply, distinct labels where they can be classes, what the labels are,
    content hash."""

    format: Literal["npz", "csv"]
    rows: int
    columns: int
    outputs: int
    classes: int | None
    labels: LabelKind
    target: str | None
    sha256: str
    size: int


def parse_upload(
    filename: str, content: bytes, *, target: str | None, limits: UploadLimits
) -> ParsedUpload:
    """Validate an uploaded dataset file and describe it, or raise UploadError.

    The format comes from the extension (415 otherwise). ``.npz`` files hold arrays ``x``, ``y``
    and optionally ``x_test``/``y_test`` and ``x_dev``/``y_dev``, and take no ``target``;
    ``.csv`` files have a header row and need ``target``, the label column. Too large → 413;
    anything malformed, over the column or row caps, or that models.data rejects → 422.
    """
    _check_text("file name", filename, limits)
    if target is not None:
        _check_text("target", target, limits)
    suffix = PurePath(filename).suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise UploadError(
            415, f"unsupported file type {suffix or '(no extension)'!r}; upload a .npz or .csv file"
        )
    if not content:
        raise UploadError(400, "the uploaded file is empty")
    if len(content) > limits.max_bytes:
        raise UploadError(413, f"the file is larger than the limit of {limits.max_bytes} bytes")
    if suffix == ".npz":
        if target is not None:
            raise UploadError(422, "npz uploads take their labels from array y; give no target")
        _check_npz_headers(content, limits)
        try:
            x, y, splits = read_npz(content)
        except zlib.error as e:
            raise UploadError(422, f"the npz archive is corrupt ({e})") from e
        except DatasetError as e:
            raise UploadError(422, str(e)) from e
    else:
        if not target:
            raise UploadError(422, "csv uploads need a target column: give the label column's name")
        _check_csv_header(content, limits)
        try:
            x, y = read_csv(content, target)
        except DatasetError as e:
            raise UploadError(422, str(e)) from e
        _check_rows(len(x), limits)
        splits = None
    try:
        dataset = from_arrays("upload", x, y, splits=splits)
    except DatasetError as e:
        raise UploadError(422, str(e)) from e
    labels = _all_labels(y, splits)
    kind = label_kind(labels)
    return ParsedUpload(
        format="npz" if suffix == ".npz" else "csv",
        rows=len(dataset.x_train) + len(dataset.x_dev) + len(dataset.x_test),
        columns=dataset.num_features,
        outputs=dataset.num_outputs,
        classes=None if kind == "real" else len(np.unique(labels)),
        labels=kind,
        target=target,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )


def _all_labels(y: np.ndarray, splits: dict[str, np.ndarray] | None) -> np.ndarray:
    """The labels of every split, together."""
    return np.concatenate([y, *(v for k, v in (splits or {}).items() if k.startswith("y"))])


def label_kind(labels: np.ndarray) -> LabelKind:
    """What the labels are: ``text`` (strings: classes only), ``integer`` (either task) or
    ``real`` (numbers with a fractional part: regression only)."""
    if labels.dtype.kind == "U":
        return "text"
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        return "real"
    return "integer"


def _check_text(field: str, value: str, limits: UploadLimits) -> None:
    problem = text_problem(value)
    if problem:
        raise UploadError(422, f"the {field} {problem}")
    if len(value) > limits.max_name_length:
        raise UploadError(
            422, f"the {field} is longer than the limit of {limits.max_name_length} characters"
        )


#: Signature and size of a zip archive's end-of-central-directory record.
_END_OF_ZIP, _END_OF_ZIP_SIZE = b"PK\x05\x06", 22


def _declared_members(content: bytes) -> int:
    """The member count a zip archive's end record declares (65535 for "at least that many"),
    read without parsing the central directory; 0 where there is no end record."""
    end = content.rfind(_END_OF_ZIP, max(0, len(content) - _END_OF_ZIP_SIZE - 0xFFFF))
    if end < 0 or end + _END_OF_ZIP_SIZE > len(content):
        return 0
    return int.from_bytes(content[end + 10 : end + 12], "little")


def _check_npz_headers(content: bytes, limits: UploadLimits) -> None:
    """Check the member count, then every member's .npy header (dtype, declared size, rows,
    columns), before loading anything."""
    if _declared_members(content) > limits.max_members:
        raise UploadError(
            422,
            f"the npz archive has more than {limits.max_members} members; a dataset holds "
            "arrays x and y, optionally x_dev, y_dev, x_test and y_test",
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile as e:
        raise UploadError(
            422, "not an npz archive (not a zip file); save one with numpy.savez"
        ) from e
    total = 0
    rows = 0
    with archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                raise UploadError(
                    422,
                    f"npz member {member.filename!r} is not a .npy array; save with numpy.savez",
                )
            name = member.filename.removesuffix(".npy")
            shape, dtype = _npy_header(archive, member, name)
            if dtype.hasobject:
                raise UploadError(
                    422,
                    f"array {name!r} holds Python objects (pickled data), which are never loaded; "
                    "store plain numbers, or strings for labels",
                )
            if dtype.names is not None or dtype.kind not in "biufU":
                raise UploadError(
                    422,
                    f"array {name!r} has dtype {dtype}; store plain numbers, or strings for labels",
                )
            # What validation materialises: numbers as float64 (an int8 array takes 8 bytes a
            # value there), strings at their width.
            total += math.prod(shape) * max(dtype.itemsize, 8)
            if name in _X_ARRAYS and shape:
                rows += shape[0]
            if name == "x" and len(shape) == 2 and shape[1] > limits.max_columns:
                raise UploadError(
                    422, f"x has {shape[1]} feature columns; the limit is {limits.max_columns}"
                )
    if total > limits.max_array_bytes:
        raise UploadError(
            413,
            f"the arrays hold {total} bytes uncompressed as float64; the limit is "
            f"{limits.max_array_bytes}",
        )
    _check_rows(rows, limits)


def _check_rows(rows: int, limits: UploadLimits) -> None:
    if rows > limits.max_rows:
        raise UploadError(422, f"the data has {rows} rows; the limit is {limits.max_rows}")


def _npy_header(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str
) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a member's .npy header, decompressing only the header's bytes."""
    try:
        with archive.open(member) as stream:
            version = npy_format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    # Corrupt compressed bytes: zlib.error (deflate), OSError (bzip2), LZMAError (lzma).
    except (
        ValueError,
        EOFError,
        RuntimeError,
        OSError,
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
    ) as e:
        raise UploadError(422, f"array {name!r} is not a valid .npy array ({e})") from e
    if any(size < 0 for size in shape):
        raise UploadError(422, f"array {name!r} declares an invalid shape {shape}")
    return shape, dtype


def _check_csv_header(content: bytes, limits: UploadLimits) -> None:
    """Count the header row's columns without parsing the rest of the file.

    Undecodable bytes are replaced here; read_csv reports them with their line.
    """
    text = io.TextIOWrapper(io.BytesIO(content), encoding="utf-8-sig", errors="replace", newline="")
    try:
        header = next((row for row in csv.reader(text) if row), [])
    except csv.Error as e:
        raise UploadError(422, f"cannot read the csv header row ({e})") from e
    if len(header) > limits.max_columns:
        raise UploadError(
            422, f"the csv has {len(header)} columns; the limit is {limits.max_columns}"
        )
