"""Files a search submitted to the service may read: only those inside the operator's data
directory (`CAVIAR_DATA_DIR`), never through `..` or a symbolic link out of it.

Refusals never say whether a file outside the directory exists.
"""

from __future__ import annotations

from pathlib import Path

from caviar.models.errors import CaviarError


class DataPathError(CaviarError, ValueError):
    """A `dataset.path` the service will not read; the message says why."""


def resolve_data_path(path: str, data_dir: str | None) -> Path:
    """The real path of `path` (relative to `data_dir`, or absolute inside it).

    Raises DataPathError when no data directory is set, when the path leads out of it (also
    through a symbolic link), or when it names no file inside it.
    """
    if data_dir is None:
        raise DataPathError(
            "this service reads no files: upload the dataset (POST /v1/datasets) and name its "
            "id, or use a built-in name"
        )
    root = Path(data_dir).resolve()
    outside = DataPathError("must name a file inside the data directory")
    try:
        resolved = (root / path).resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        raise outside from None
    if not resolved.is_relative_to(root):
        raise outside
    if not resolved.is_file():
        raise DataPathError(f"no file {path!r} in the data directory")
    return resolved
