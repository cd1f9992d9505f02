"""/v1/searches: submit, read, list, cancel, trials, report, events, model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from caviar.db.session import session_scope
from caviar.db.storage import optuna_storage
from caviar.db.tables import StoredModel
from caviar.search.report import render_report
from caviar.search.spec import SearchSpec, SpecError
from caviar.service import searches
from caviar.service.deps import Owner, SessionDep, SettingsDep
from caviar.service.errors import Conflict, NotFound
from caviar.service.events import EventCursor, EventStreams, events
from caviar.service.limits import spec_limit_errors
from caviar.service.schemas import (
    Problem,
    SearchCreated,
    SearchList,
    SearchPublic,
    TrialList,
    content_response,
    error_responses,
)

#: Specs shown in the docs; the contract test submits each of them.
SPEC_EXAMPLES: dict[str, dict[str, Any]] = {
    "coarse_to_fine": {
        "summary": "MNIST-1D, Adam's β1 on a 1-β log scale, two stages",
        "value": {
            "name": "quickstart",
            "dataset": {"name": "mnist1d"},
            "budget": {"trials": 48, "epochs": 60},
            "space": {
                "learning_rate": {"low": 1e-4, "high": 1.0, "scale": "log"},
                "momentum": {"low": 0.9, "high": 0.999, "scale": "one_minus_log"},
                "hidden_units": {"low": 32, "high": 512, "scale": "log", "type": "int"},
                "optimizer": {"choices": ["momentum", "adam"]},
            },
            "fixed": {"batch_size": 128},
            "stages": [{"trials": 32}, {"trials": 16, "keep_top": 0.25, "margin": 0.1}],
            "final_fit": "train_dev",
        },
    },
    "pruned": {
        "summary": "scikit-learn digits, momentum SGD, median pruning",
        "value": {
            "name": "digits",
            "dataset": {"name": "digits"},
            "budget": {"trials": 24, "epochs": 40},
            "pruner": {"name": "median", "warmup_epochs": 5},
            "space": {
                "learning_rate": {"low": 1e-3, "high": 0.5, "scale": "log"},
                "l2": {"low": 1e-6, "high": 1e-2, "scale": "log"},
            },
            "fixed": {"optimizer": "momentum", "hidden_layers": 2},
        },
    },
    "regression": {
        "summary": "Synthetic regression ranked by dev R²",
        "value": {
            "name": "regression",
            "dataset": {"name": "synthetic", "task": "regression", "samples": 2000, "features": 8},
            "task": "regression",
            "objective": {"metric": "dev_r2"},
            "budget": {"trials": 16, "epochs": 30},
            "sampler": "tpe",
            "space": {"dropout": {"low": 0.0, "high": 0.5}},
        },
    },
}

router = APIRouter(
    prefix="/v1/searches", tags=["searches"], responses=error_responses(401, 422, 503)
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SearchCreated,
    responses=error_responses(400, 409, 411, 413, 429),
)
def submit_search(
    spec: Annotated[SearchSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    owner: Owner,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, description="Same key and body: same search.")
    ] = None,
) -> SearchCreated:
    """Queue a search; workers pick it up.

    422 names each invalid field: the rules across fields are in SearchSpec's description, and a
    spec over a configured limit (`CAVIAR_MAX_*`) is refused too. 409: the `Idempotency-Key`
    was used with another spec. 411 or 413: no Content-Length, or a body over
    `CAVIAR_MAX_SPEC_BYTES`. 429: the owner has `CAVIAR_MAX_CONCURRENT_SEARCHES` open searches.
    """
    errors = spec_limit_errors(spec, settings, searches.uploaded_sizes(session, owner, spec))
    errors += searches.dataset_errors(session, owner, spec)
    if errors:
        raise SpecError(errors)
    search, _ = searches.submit_search(
        session,
        owner,
        spec,
        idempotency_key=idempotency_key,
        max_concurrent=settings.max_concurrent_searches,
    )
    return SearchCreated(id=search.id, status=search.status)


@router.get("", response_model=SearchList)
def list_searches(
    owner: Owner,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="Searches to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> SearchList:
    """The caller's searches, newest first."""
    rows, total = searches.list_searches(session, owner, offset, limit)
    items = [searches.public_search(row) for row in rows]
    return SearchList(items=items, total=total, offset=offset, limit=limit)


@router.get("/{search_id}", response_model=SearchPublic, responses=error_responses(404))
def get_search(
    search_id: str, owner: Owner, session: SessionDep, settings: SettingsDep
) -> SearchPublic:
    """Status, stage, progress and best trial of one search."""
    search = searches.owned_search(session, owner, search_id)
    return searches.public_search(search, searches.progress(settings.database_url, search))


@router.get("/{search_id}/trials", response_model=TrialList, responses=error_responses(404))
def get_trials(
    search_id: str, owner: Owner, session: SessionDep, settings: SettingsDep
) -> TrialList:
    """Every trial of the search with its parameters (β as β) and figures."""
    search = searches.owned_search(session, owner, search_id)
    trials = searches.search_trials(settings.database_url, search)
    return TrialList(items=[searches.public_trial(*t) for t in trials])


@router.post(
    "/{search_id}/cancel", response_model=SearchPublic, responses=error_responses(404, 409)
)
def cancel_search(search_id: str, owner: Owner, session: SessionDep) -> SearchPublic:
    """Cancel the search; workers stop its trials within an epoch."""
    search = searches.owned_search(session, owner, search_id)
    searches.cancel_search(session, search)
    return searches.public_search(search)


@router.get(
    "/{search_id}/report",
    response_class=Response,
    responses={
        **content_response("text/html", "The HTML report."),
        **error_responses(404, 409),
    },
)
def get_report(
    search_id: str, owner: Owner, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    """The search's self-contained HTML report."""
    search = searches.owned_search(session, owner, search_id)
    if not search.studies:
        raise Conflict("the search has not started yet")
    spec = SearchSpec.model_validate(search.spec)
    result = searches.search_result(settings.database_url, search)
    return HTMLResponse(render_report(spec, optuna_storage(settings.database_url), result))


@router.get(
    "/{search_id}/events",
    response_class=StreamingResponse,
    responses={
        **content_response("text/event-stream", "The event stream."),
        **error_responses(404),
        429: {
            "model": Problem,
            "description": "The owner has CAVIAR_MAX_EVENT_STREAMS streams open.",
        },
    },
)
async def get_events(
    search_id: str,
    owner: Owner,
    settings: SettingsDep,
    request: Request,
    last_event_id: Annotated[
        str | None,
        Header(max_length=8192, description="Resume after this event: the `id` it carried."),
    ] = None,
) -> StreamingResponse:
    """Server-sent events: `stage` per stage opened, `trial` per finished trial, then `done`.

    Each event carries an `id`; a client that reconnects with `Last-Event-ID` gets every later
    event once. An owner may hold CAVIAR_MAX_EVENT_STREAMS streams at once (429 beyond).
    """
    after = EventCursor.decode(last_event_id) if last_event_id else None
    streams: EventStreams = request.app.state.event_streams
    url = settings.database_url
    await streams.run(_check_owned, url, owner, search_id)
    streams.acquire(owner)
    return _EventStream(
        events(streams, url, owner, search_id, after),
        release=lambda: streams.release(owner),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class _EventStream(StreamingResponse):
    """A stream that gives its owner's slot back however it ends (done, disconnect, error)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


@router.get(
    "/{search_id}/model",
    response_class=Response,
    responses={
        **content_response("application/octet-stream", "The model file (.npz)."),
        **error_responses(404),
    },
)
def get_model(search_id: str, owner: Owner, session: SessionDep) -> Response:
    """The refit best model (parameters, architecture, preprocessing) as one .npz file."""
    searches.owned_search(session, owner, search_id)
    model = session.get(StoredModel, search_id)
    if model is None:
        raise NotFound("no model yet: the search has not completed")
    return Response(
        model.content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{search_id}.npz"'},
    )


def _check_owned(database_url: str, owner: str, search_id: str) -> None:
    with session_scope(database_url) as session:
        searches.owned_search(session, owner, search_id)
