"""Uploaded datasets: good files parse, bad ones are refused with a status and a reason."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile

import numpy as np
import pytest

from caviar.service import uploads
from caviar.service.uploads import ParsedUpload, UploadError, UploadLimits, parse_upload

LIMITS = UploadLimits()


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # mypy checks **arrays against the stub's `allow_pickle: bool` too
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _xy(n: int = 40, features: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, features)), "y": np.arange(n) % 2}


def _csv(rows: int = 30, features: int = 3) -> bytes:
    header = ",".join([f"f{j}" for j in range(features)] + ["label"])
    lines = [
        ",".join([f"{i * 0.5 + j}" for j in range(features)] + [f"c{i % 3}"]) for i in range(rows)
    ]
    return ("\n".join([header, *lines]) + "\n").encode()


def _refused(filename: str, content: bytes, *, target: str | None = None, limits=LIMITS):
    with pytest.raises(UploadError) as info:
        parse_upload(filename, content, target=target, limits=limits)
    return info.value


@pytest.fixture
def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the npz data would be loaded (the checks must refuse it first)."""

    def fail(*args, **kwargs):
        raise AssertionError("the npz data was loaded")

    monkeypatch.setattr(uploads, "read_npz", fail)


def test_good_npz() -> None:
    content = _npz(**_xy(40, 3), x_test=np.ones((10, 3)), y_test=np.arange(10) % 2)
    parsed = parse_upload("Data.NPZ", content, target=None, limits=LIMITS)
    assert parsed == ParsedUpload(
        format="npz",
        rows=50,
        columns=3,
        outputs=2,
        classes=2,
        labels="integer",
        target=None,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )


def test_good_csv() -> None:
    content = _csv(rows=30, features=4)
    parsed = parse_upload("data.csv", content, target="label", limits=LIMITS)
    assert (parsed.format, parsed.rows, parsed.columns, parsed.target) == ("csv", 30, 4, "label")
    assert parsed.sha256 == hashlib.sha256(content).hexdigest()
    assert parsed.size == len(content)
    assert (parsed.labels, parsed.classes, parsed.outputs) == ("text", 3, 3)


@pytest.mark.parametrize(
    ("y", "labels", "classes", "outputs"),
    [
        (np.arange(40) % 2 == 0, "integer", 2, 2),
        (np.arange(40) * 0.25, "real", None, 1),
        (np.arange(120) * 1.0, "integer", 120, 1),
    ],
)
def test_an_upload_keeps_what_its_labels_are(y, labels, classes, outputs) -> None:
    """Booleans and whole floats can be classes; fractions cannot (and 120 distinct whole
    values infer regression, but may still be asked to be 120 classes)."""
    x = np.random.default_rng(0).normal(size=(len(y), 3))
    parsed = parse_upload("d.npz", _npz(x=x, y=y), target=None, limits=LIMITS)
    assert (parsed.labels, parsed.classes, parsed.outputs) == (labels, classes, outputs)


def test_unsupported_extension() -> None:
    error = _refused("data.txt", _csv(), target="label")
    assert error.status_code == 415 and "unsupported file type '.txt'" in error.reason
    assert _refused("data", _csv(), target="label").status_code == 415


def test_empty_file() -> None:
    error = _refused("data.csv", b"", target="label")
    assert error.status_code == 400 and "empty" in error.reason


def test_size_limit_boundary() -> None:
    base = _csv()
    limits = UploadLimits(max_bytes=len(base) + 100)
    exact = base + b"\n" * 100  # blank lines are skipped: still a valid csv
    assert parse_upload("d.csv", exact, target="label", limits=limits).size == limits.max_bytes
    error = _refused("d.csv", exact + b"\n", target="label", limits=limits)
    assert error.status_code == 413
    # The limit, not the bytes read: a route reads one byte past the limit, never the whole file.
    assert error.reason == f"the file is larger than the limit of {limits.max_bytes} bytes"


def test_compressible_npz_over_the_array_limit_is_refused_before_loading(
    forbid_loading: None,
) -> None:
    content = _npz(x=np.zeros((2000, 100)), y=np.zeros(2000))  # 1.6 MB of zeros
    limits = UploadLimits(max_array_bytes=2**20)
    assert len(content) < 20_000
    error = _refused("bomb.npz", content, limits=limits)
    assert error.status_code == 413 and "uncompressed" in error.reason


def _member(name: str, header: dict, data: bytes = b"") -> tuple[str, bytes]:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return name, buffer.getvalue() + data


def _zip(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def test_declared_huge_shape_is_refused_from_the_header_alone(forbid_loading: None) -> None:
    """A header declaring 8 TB with no data behind it: only the header can have been read."""
    huge = {"descr": "<f8", "fortran_order": False, "shape": (10**9, 1000)}
    content = _zip(_member("x.npy", huge), _member("y.npy", {**huge, "shape": (10**9,)}, bytes(80)))
    assert len(content) < 1000
    error = _refused("bomb.npz", content)
    assert error.status_code == 413 and str(8 * 10**12 + 8 * 10**9) in error.reason


def test_negative_declared_shape_is_refused(forbid_loading: None) -> None:
    header = {"descr": "<f8", "fortran_order": False, "shape": (-5, 3)}
    error = _refused("neg.npz", _zip(_member("x.npy", header)))
    assert error.status_code == 422 and "invalid shape" in error.reason


def test_object_array_is_never_unpickled(forbid_loading: None) -> None:
    content = _npz(x=np.array([{"a": 1}, None] * 10, dtype=object), y=np.zeros(20))
    error = _refused("pickle.npz", content)
    assert error.status_code == 422
    assert "'x'" in error.reason and "Python objects" in error.reason


def test_structured_and_non_numeric_dtypes_are_refused(forbid_loading: None) -> None:
    structured = np.zeros(20, dtype=[("a", "<f8"), ("b", "<i4")])
    error = _refused("s.npz", _npz(x=structured, y=np.zeros(20)))
    assert error.status_code == 422 and "'x'" in error.reason
    error = _refused("c.npz", _npz(x=np.zeros((20, 2)), y=np.zeros(20, complex)))
    assert error.status_code == 422 and "'y'" in error.reason and "complex" in error.reason


def test_non_npy_member_is_refused(forbid_loading: None) -> None:
    buffer = io.BytesIO(_npz(**_xy()))
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("readme.txt", "hello")
    error = _refused("d.npz", buffer.getvalue())
    assert error.status_code == 422 and "'readme.txt' is not a .npy array" in error.reason


def test_member_that_is_not_npy_data_is_refused(forbid_loading: None) -> None:
    error = _refused("d.npz", _zip(("x.npy", b"not an array"), ("y.npy", b"nor this")))
    assert error.status_code == 422 and "'x' is not a valid .npy array" in error.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    arrays = _xy()
    arrays["x"][3, 1] = bad
    error = _refused("d.npz", _npz(**arrays))
    assert error.status_code == 422 and "x[3, 1]" in error.reason and "finite" in error.reason
    arrays = {**_xy(), "y": np.linspace(0, 1, 40)}
    arrays["y"][7] = bad
    error = _refused("d.npz", _npz(**arrays))
    assert error.status_code == 422 and "y[7]" in error.reason
    content = _csv().replace(b"\n1.0,", f"\n{bad},".encode(), 1)
    error = _refused("d.csv", content, target="label")
    assert error.status_code == 422 and "non-finite" in error.reason


def test_features_too_large_for_float32_are_refused() -> None:
    """Finite, but their spread overflows float32: training and the model file would hold inf."""
    arrays = _xy()
    arrays["x"] = arrays["x"] * 1e300
    error = _refused("d.npz", _npz(**arrays))
    assert error.status_code == 422 and "too large to standardise in float32" in error.reason


def test_npz_content_errors_from_models_data() -> None:
    error = _refused("d.npz", _npz(x=np.zeros((40, 2)), y=np.zeros(39)))
    assert error.status_code == 422 and "40 rows but y has 39" in error.reason
    error = _refused("d.npz", _npz(x=np.zeros((4, 2)), y=np.arange(4) % 2))
    assert error.status_code == 422 and "at least 10" in error.reason
    error = _refused("d.npz", _npz(**_xy(), z=np.zeros(3)))
    assert error.status_code == 422 and "unexpected z" in error.reason


def test_npz_takes_no_target() -> None:
    error = _refused("d.npz", _npz(**_xy()), target="label")
    assert error.status_code == 422 and "give no target" in error.reason


def test_npz_column_and_row_caps(forbid_loading: None) -> None:
    content = _npz(**_xy(40, 6))
    error = _refused("d.npz", content, limits=UploadLimits(max_columns=5))
    assert error.status_code == 422 and "6 feature columns" in error.reason
    error = _refused("d.npz", content, limits=UploadLimits(max_rows=39))
    assert error.status_code == 422 and "40 rows" in error.reason


def test_csv_without_target() -> None:
    for target in (None, ""):
        error = _refused("d.csv", _csv(), target=target)
        assert error.status_code == 422 and "need a target column" in error.reason


def test_csv_column_cap_boundary() -> None:
    limits = UploadLimits(max_columns=5)
    parsed = parse_upload("d.csv", _csv(features=4), target="label", limits=limits)
    assert parsed.columns == 4  # 5 columns with the target
    error = _refused("d.csv", _csv(features=5), target="label", limits=limits)
    assert error.status_code == 422 and "6 columns" in error.reason


def test_csv_column_cap_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the csv was parsed")

    monkeypatch.setattr(uploads, "read_csv", fail)
    content = b",".join(b"c%d" % i for i in range(20_000)) + b"\n" + b"not,parsed\n" * 1000
    error = _refused("wide.csv", content, target="c0")
    assert error.status_code == 422 and "20000 columns" in error.reason


def test_csv_row_cap() -> None:
    error = _refused("d.csv", _csv(rows=30), target="label", limits=UploadLimits(max_rows=29))
    assert error.status_code == 422 and "30 rows" in error.reason


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"a,b,label\n1,2,x\n1,2\n", "line 3 has 2 fields but the header has 3"),
        (b"a,b,label\n" + b"1,oops,x\n" * 20, "'oops' is not a number"),
        (b"a,b,other\n" + b"1,2,3\n" * 20, "no column named 'label'"),
        (b"a,b,label\n\xff\xfe,1,2\n", "not UTF-8"),
        (b"a,b,label\n1," + b"2" * 200_000 + b",x\n", "field larger than field limit"),
    ],
    ids=["short-row", "not-a-number", "no-target-column", "not-utf8", "huge-field"],
)
def test_malformed_csv(content: bytes, problem: str) -> None:
    error = _refused("d.csv", content, target="label")
    assert error.status_code == 422 and problem in error.reason


def test_corrupt_npz_member_data() -> None:
    """Garbage deep inside a member (past the header) fails the CRC or the inflate: 422."""
    x = np.random.default_rng(0).integers(0, 5, size=(20_000, 10)).astype(float)
    data = bytearray(_npz(x=x, y=np.arange(20_000) % 2))
    start = data.index(b"x.npy") + 30_000
    data[start : start + 4096] = np.random.default_rng(1).bytes(4096)
    error = _refused("d.npz", bytes(data))
    assert error.status_code == 422 and "corrupt" in error.reason


def test_non_zip_bytes_named_npz() -> None:
    error = _refused("d.npz", b"x,y\n1,2\n")
    assert error.status_code == 422 and "not an npz archive" in error.reason
    error = _refused("d.npz", _npz(**_xy())[:200])  # truncated: the directory at the end is gone
    assert error.status_code == 422 and "not an npz archive" in error.reason


def test_npz_of_many_members_is_refused_quickly_stating_the_limit(forbid_loading: None) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(100_000):
            archive.writestr(f"a{i}.npy", b"")
    content = buffer.getvalue()
    started = time.perf_counter()
    error = _refused("d.npz", content, limits=UploadLimits(max_bytes=len(content)))
    assert time.perf_counter() - started < 0.5  # reading every member header took seconds
    assert error.status_code == 422
    assert f"more than {LIMITS.max_members} members" in error.reason
    assert "a0" not in error.reason and len(error.reason) < 200


def test_npz_at_the_member_limit_is_read() -> None:
    arrays = {**_xy(), **{f"x{i}": np.zeros(1) for i in range(LIMITS.max_members - 2)}}
    error = _refused("d.npz", _npz(**arrays))
    assert "members" not in error.reason and "unexpected" in error.reason


@pytest.mark.parametrize(
    ("filename", "target", "reason"),
    [
        ("x" * 197 + ".csv", "label", "the file name is longer than the limit of 200 characters"),
        ("d\0.csv", "label", "the file name must not contain a NUL character"),
        ("d.csv", "t" * 201, "the target is longer than the limit of 200 characters"),
        ("d.csv", "label\0", "the target must not contain a NUL character"),
    ],
)
def test_file_name_and_target_must_fit_their_columns(
    filename: str, target: str, reason: str
) -> None:
    error = _refused(filename, _csv(), target=target)
    assert (error.status_code, error.reason) == (422, reason)


def test_file_name_of_200_characters_is_accepted() -> None:
    assert parse_upload("x" * 196 + ".csv", _csv(), target="label", limits=LIMITS).rows == 30


def test_narrow_numbers_count_as_float64_against_the_array_limit(forbid_loading: None) -> None:
    """Validation holds an int8 x as float64: the limit counts what it would materialise."""
    content = _npz(x=np.zeros((1000, 100), dtype=np.int8), y=np.zeros(1000, dtype=np.int8))
    error = _refused("narrow.npz", content, limits=UploadLimits(max_array_bytes=200_000))
    assert error.status_code == 413 and str(8 * 101_000) in error.reason


def _npz_with(compression: int, arrays: dict[str, np.ndarray]) -> tuple[bytearray, zipfile.ZipFile]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.save(member, array)
            archive.writestr(f"{name}.npy", member.getvalue())
    raw = bytearray(buffer.getvalue())
    return raw, zipfile.ZipFile(io.BytesIO(bytes(raw)))


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("where", ["header", "data"])
def test_a_corrupt_compressed_member_is_a_422(compression: int, where: str) -> None:
    """bzip2 and LZMA streams fail with other errors than deflate's: each is a 422, not a 500."""
    x = np.random.default_rng(0).normal(size=(5000, 3))
    raw, archive = _npz_with(compression, {"x": x, "y": np.arange(5000) % 2})
    member = archive.getinfo("x.npy")
    start = member.header_offset + 30 + len(member.filename)
    garbled = (
        range(start, start + 40)
        if where == "header"
        else range(start + member.compress_size // 2, start + member.compress_size - 10)
    )
    for i in garbled:
        raw[i] ^= 0x5A
    error = _refused("d.npz", bytes(raw))
    assert error.status_code == 422, error.reason
    assert "corrupt" in error.reason or "not a valid .npy array" in error.reason
