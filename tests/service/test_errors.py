"""One mapping from Caviar's errors to HTTP: each error class a request can raise has its status."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from caviar.db.migrate import NotUpgraded
from caviar.db.session import ConstraintViolation, DatabaseError, DatabaseUnavailable
from caviar.models.data import DatasetError
from caviar.models.errors import CaviarError
from caviar.models.export import ModelFileError
from caviar.search.datadir import DataPathError
from caviar.search.spec import SpecError
from caviar.service.client import ApiError
from caviar.service.errors import BadEventId, Conflict, NotFound, TooMany, http_status
from caviar.service.uploads import UploadError

EXPECTED = {
    NotFound: 404,
    Conflict: 409,
    TooMany: 429,
    BadEventId: 422,
    SpecError: 422,
    DatasetError: 422,
    DataPathError: 422,
    ModelFileError: 422,
    DatabaseUnavailable: 503,
    DatabaseError: 500,
    ConstraintViolation: 500,  # a constraint the service should have checked first: our fault
    NotUpgraded: 500,
}
#: Errors the API never answers: the HTTP client's own, and uploads (which carry their status).
NOT_ANSWERED = {ApiError, UploadError}


def _every_error_class() -> set[type]:
    for package in ("caviar.models", "caviar.search", "caviar.db", "caviar.service"):
        path = importlib.import_module(package).__path__
        for module in pkgutil.walk_packages(path, package + "."):
            if ".migrations" not in module.name:  # Alembic runs those, inside a migration
                importlib.import_module(module.name)
    found: set[type] = set()
    todo: list[type] = [CaviarError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return found - {CaviarError}


def test_every_caviar_error_has_a_decided_status() -> None:
    """A new error class must be given its status here (and in HTTP_STATUS where it is not 500)."""
    undecided = _every_error_class() - EXPECTED.keys() - NOT_ANSWERED
    assert undecided == set(), f"no HTTP status decided for {sorted(map(str, undecided))}"


@pytest.mark.parametrize(("error_class", "status"), EXPECTED.items(), ids=lambda v: str(v))
def test_each_error_maps_to_its_status(error_class: type[CaviarError], status: int) -> None:
    assert http_status(error_class.__new__(error_class)) == status


def test_an_upload_error_answers_with_its_own_status() -> None:
    assert http_status(UploadError(413, "too large")) == 413
    assert http_status(UploadError(415, "not a zip")) == 415
