"""The FastAPI application factory: `create_app(settings)` builds the whole API around them."""

from __future__ import annotations

import contextlib
import logging
import threading

import anyio
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from caviar.db.storage import GRACE_PERIOD_S
from caviar.search.worker import reap_stale_trials
from caviar.service.errors import install_error_handlers
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

    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(searches.router)
    app.include_router(datasets.router)
    return app


def _reap_until(database_url: str, stop: threading.Event) -> None:
    """The API's share of reaping: fail stale trials of dead workers so that others rerun them."""
    while not stop.wait(GRACE_PERIOD_S / 4):
        try:
            reap_stale_trials(database_url)
        except Exception as error:  # the database may be down or not migrated yet
            log.warning("reaper: %s", error)
