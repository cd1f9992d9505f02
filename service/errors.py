"""The API's errors and their one mapping to HTTP.

Routes and the functions they call raise Caviar's errors (`CaviarError` and its subclasses); the
handlers installed by `install_error_handlers` turn each into its status and a `detail` the
client can act on. Server-side faults (5xx) are logged and answered without their message, which
may name the database.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from caviar.db.session import DatabaseUnavailable
from caviar.models.data import DatasetError
from caviar.models.errors import CaviarError
from caviar.models.export import ModelFileError
from caviar.search.datadir import DataPathError
from caviar.search.spec import SpecError, printable
from caviar.service.uploads import UploadError

__all__ = ["BadEventId", "Conflict", "NotFound", "TooMany", "http_status", "install_error_handlers"]

log = logging.getLogger("caviar.api")


class NotFound(CaviarError, LookupError):
    """No such resource for this owner (another owner's id is not found either)."""


class Conflict(CaviarError, RuntimeError):
    """The request contradicts the resource's state (e.g. a reused idempotency key)."""


class TooMany(CaviarError, RuntimeError):
    """The owner is over a concurrency limit."""


class BadEventId(CaviarError, ValueError):
    """A `Last-Event-ID` that no event of this API carried."""

    def __str__(self) -> str:
        return f"Last-Event-ID: {self.args[0]}"


HTTP_STATUS: dict[type[CaviarError], int] = {
    NotFound: status.HTTP_404_NOT_FOUND,
    Conflict: status.HTTP_409_CONFLICT,
    TooMany: status.HTTP_429_TOO_MANY_REQUESTS,
    BadEventId: status.HTTP_422_UNPROCESSABLE_CONTENT,
    SpecError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    DatasetError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    DataPathError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ModelFileError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    DatabaseUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
}
"""The status of each kind of error; the nearest class in an error's MRO decides, else 500."""


def http_status(error: CaviarError) -> int:
    """The HTTP status the API answers `error` with."""
    if isinstance(error, UploadError):
        return error.status_code
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return status.HTTP_500_INTERNAL_SERVER_ERROR


def install_error_handlers(app: FastAPI) -> None:
    """Answer request validation errors and every `CaviarError` as JSON `{"detail": ...}`."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        """422 naming each field, even when the input holds NaN, infinity or a lone surrogate."""
        detail = _encodable(jsonable_encoder(error.errors()))
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(CaviarError)
    async def caviar_error(request: Request, error: CaviarError) -> JSONResponse:
        """The error's status; below 500 its message, else a generic one (the fault is logged)."""
        code = http_status(error)
        if isinstance(error, SpecError):  # one entry per field, as request validation has them
            return JSONResponse({"detail": _encodable(error.errors)}, status_code=code)
        if code < status.HTTP_500_INTERNAL_SERVER_ERROR:
            return JSONResponse({"detail": str(error)}, status_code=code)
        log.error("%s %s: %s", request.method, request.url.path, error, exc_info=error)
        detail = (
            "database unavailable; try again later"
            if code == status.HTTP_503_SERVICE_UNAVAILABLE
            else "internal error"
        )
        return JSONResponse({"detail": detail}, status_code=code)


def _encodable(value: Any) -> Any:
    """`value` with what strict JSON cannot hold spelled out: non-finite floats as text, lone
    surrogates escaped."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value
