"""What the API returns: one schema family per resource, each named and described for OpenAPI."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from caviar.db.tables import SearchStatus


class Progress(BaseModel):
    """Trials of a search by state; `total` is the budget over all stages."""

    complete: int = Field(description="Trials that finished with a value.")
    pruned: int = Field(description="Trials stopped early by the pruner.")
    failed: int = Field(description="Trials that failed (diverged, cancelled, ...).")
    running: int = Field(description="Trials being trained now.")
    total: int = Field(description="The search's trial budget.")


class SearchCreated(BaseModel):
    """A submitted search."""

    id: str = Field(description="The search id.")
    status: SearchStatus = Field(description="Lifecycle state.")


class SearchPublic(BaseModel):
    """A search: its state, progress and best trial so far."""

    id: str = Field(description="The search id.")
    name: str = Field(description="The spec's name.")
    status: SearchStatus = Field(description="queued, running, completed, failed or cancelled.")
    stage: int = Field(description="Current coarse-to-fine stage (0 before a worker starts it).")
    studies: list[str] = Field(description="Optuna study names, one per stage started.")
    progress: Progress | None = Field(None, description="Trial counts (omitted in lists).")
    best: dict[str, Any] | None = Field(
        None,
        description="Best trial: params, its dev metric, and test figures once the search ends.",
    )
    error: str | None = Field(None, description="Why the search failed.")
    created_at: datetime = Field(description="When it was submitted.")
    started_at: datetime | None = Field(None, description="When a worker started it.")
    finished_at: datetime | None = Field(None, description="When it ended.")


class SearchList(BaseModel):
    """A page of the caller's searches, newest first."""

    items: list[SearchPublic] = Field(description="The searches of this page.")
    total: int = Field(description="How many searches the caller has.")
    offset: int = Field(description="Index of the first item.")
    limit: int = Field(description="Page size.")


class TrialPublic(BaseModel):
    """One trial of a search."""

    stage: int = Field(description="Coarse-to-fine stage.")
    number: int = Field(description="Trial number within its stage's study.")
    state: str = Field(description="COMPLETE, PRUNED, FAIL, RUNNING or WAITING.")
    value: float | None = Field(None, description="The objective (best dev epoch).")
    params: dict[str, Any] = Field(description="Hyperparameters the model used (β as β).")
    attributes: dict[str, Any] = Field(description="Epochs, best epoch, figures, failure reason.")
    started_at: datetime | None = Field(None, description="When training started.")
    finished_at: datetime | None = Field(None, description="When it finished.")


class TrialList(BaseModel):
    """Every trial of a search, by stage then number."""

    items: list[TrialPublic] = Field(description="The trials.")


class DatasetPublic(BaseModel):
    """An uploaded dataset (its content is only read by workers)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Name it in a spec as `dataset: {id: ...}`.")
    name: str = Field(description="The uploaded file's name.")
    format: Literal["npz", "csv"] = Field(description="File format.")
    target: str | None = Field(None, description="Target column (csv).")
    rows: int = Field(description="Examples.")
    columns: int = Field(description="Features.")
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Checksum of the file.")
    created_at: datetime = Field(description="Upload time.")


class DatasetList(BaseModel):
    """The caller's datasets."""

    items: list[DatasetPublic] = Field(description="The datasets.")


class Health(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok", "unavailable"] = Field(description="ok when the check passes.")
    detail: str | None = Field(None, description="What is wrong, when something is.")


class Problem(BaseModel):
    """Why a request failed."""

    detail: str | list[dict[str, Any]] = Field(
        description="A message, or one entry per invalid field: `loc` (its path), `msg` (why)."
    )


_ERRORS = {
    400: "The body cannot be read: an empty upload, a malformed or too deeply nested body.",
    401: "The bearer token is missing, wrong or revoked.",
    404: "No such search or dataset among the caller's (another owner's id is not found either).",
    409: "The request contradicts the resource's state (the route's description says when).",
    411: "The request has no Content-Length.",
    413: "The body is over the configured size limit; the detail states the limit.",
    415: "The file type is not supported.",
    422: "A field is invalid or over a configured limit: each problem names its field.",
    429: "The caller is over a per-owner concurrency limit.",
    503: "The database is unreachable; retry later.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting the error statuses `codes` with the Problem body."""
    return {code: {"model": Problem, "description": _ERRORS[code]} for code in codes}


def content_response(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a 200 that is not JSON. Declare its route with
    `response_class=Response`, so that its errors are documented as the JSON they are."""
    return {200: {"content": {media_type: {}}, "description": description}}
