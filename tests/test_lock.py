"""The lock files in requirements/ pin what pyproject.toml asks for (`make lock` refreshes them)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
#: Each lock file and the optional dependency groups it holds besides the library's own.
LOCKS = {"base": [], "dev": ["dev"], "cuda": ["cuda"], "tpu": ["tpu"]}
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\$")


def pinned(lock: str) -> dict[str, str]:
    """Name → version of every package the lock installs on this interpreter; each has a hash."""
    lines = (ROOT / "requirements" / f"{lock}.txt").read_text().splitlines()
    versions: dict[str, str] = {}
    for number, line in enumerate(lines):
        match = _ENTRY.match(line)
        if match is None:
            continue
        name, version, marker = match.groups()
        assert "--hash=sha256:" in lines[number + 1], f"{lock}: {name} has no hash"
        if marker is None or Marker(marker).evaluate():
            versions[canonicalize_name(name)] = version
    return versions


def wanted(groups: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [
        line for group in groups for line in project["optional-dependencies"][group]
    ]
    return [Requirement(line) for line in names]


@pytest.mark.parametrize("lock", LOCKS)
def test_every_dependency_is_pinned_within_its_range(lock: str) -> None:
    versions = pinned(lock)
    for requirement in wanted(LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in versions, f"requirements/{lock}.txt lacks {name}: run `make lock`"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={versions[name]}, outside {requirement}: "
            "run `make lock`"
        )
        for extra in requirement.extras:  # jax[cuda12] brings its plugin, jax[tpu] libtpu
            brought = "libtpu" if extra == "tpu" else f"{name}-{extra}"
            assert any(other.startswith(brought) for other in versions), (lock, extra)
