"""The FastAPI application factory: `create_app(settings)` builds the whole API around them."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any

import anyio
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from caviar.db.session import DatabaseError, DatabaseUnavailable
from caviar.db.storage import GRACE_PERIOD_S
from caviar.search.pool import reap_stale_trials
from caviar.search.spec import printable
from caviar.service.events import EventStreams
from caviar.service.routes import datasets, ops, searches
from caviar.service.settings import Settings, get_settings

log = logging.getLogger("caviar.api")

DESCRIPTION = """Submit hyperparameter searches of MLPs, follow them, and fetch their best model.

Every `/v1` route needs `Authorization: Bearer <token>` (`caviar keys create NAME`); an owner
sees only their own searches and datasets."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API on `settings` (default: the `CAVIAR_*` environment)."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        reaper = threading.Thread(
            target=_reap_until,
            args=(settings.database_url, stop),
            name="caviar-reaper",
            daemon=True,
        )
        reaper.start()
        yield
        stop.set()
        reaper.join(timeout=10)

    app = FastAPI(title="Caviar", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.event_streams = EventStreams(settings.max_event_streams)
    app.state.upload_parsing = anyio.CapacityLimiter(1)  # one upload parsed at a time
    app.state.uploading = set()  # owners with an upload being parsed (one each, 429 beyond)

    @app.middleware("http")
    async def limit_spec_size(request: Request, call_next):
        """Refuse an oversized search spec before reading it (413)."""
        if request.method == "POST" and request.url.path == "/v1/searches":
            length = request.headers.get("content-length")
            if length is None or int(length) > settings.max_spec_bytes:
                detail = (
                    f"spec larger than {settings.max_spec_bytes} bytes"
                    if length is not None
                    else "Content-Length required"
                )
                code = (
                    status.HTTP_413_CONTENT_TOO_LARGE if length else status.HTTP_411_LENGTH_REQUIRED
                )
                return JSONResponse({"detail": detail}, status_code=code)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        """422 naming each field, even when the input holds NaN, infinity or a lone surrogate."""
        detail = _encodable(jsonable_encoder(error.errors()))
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(DatabaseError)
    async def database_error(request: Request, error: DatabaseError) -> JSONResponse:
        """503 when the database cannot be reached, else 500; the detail is only logged, since
        it names the database."""
        log.error("%s %s: %s", request.method, request.url.path, error, exc_info=error)
        if isinstance(error, DatabaseUnavailable):
            detail = "database unavailable; try again later"
            return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        return JSONResponse(
            {"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR
        )

    app.include_router(ops.router)
    app.include_router(searches.router)
    app.include_router(datasets.router)
    return app


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


def _reap_until(database_url: str, stop: threading.Event) -> None:
    """The API's share of reaping: fail stale trials of dead workers so that others rerun them."""
    while not stop.wait(GRACE_PERIOD_S / 4):
        try:
            reap_stale_trials(database_url)
        except Exception as error:  # the database may be down or not migrated yet
            log.warning("reaper: %s", error)
