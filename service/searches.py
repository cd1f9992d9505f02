"""Searches as the API and the CLI see them: submit, read, list, cancel, trials.

Routes stay thin and call these functions; each takes a database session and returns values.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from optuna.trial import FrozenTrial
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from caviar.db.session import lock_owner
from caviar.db.storage import optuna_storage, trial_states
from caviar.db.tables import (
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    Search,
    SearchStatus,
    StoredDataset,
    utcnow,
)
from caviar.search import runner
from caviar.search.runner import SearchResult, SearchTrial, new_search_row, tally_states
from caviar.search.spec import SearchSpec, SpecIssue, text_problem
from caviar.service.errors import Conflict, NotFound, TooMany
from caviar.service.schemas import Progress, SearchPublic, TrialPublic


def request_digest(spec: SearchSpec) -> str:
    """A digest of the spec's canonical JSON, to compare bodies sent with one idempotency key."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_search(
    session: Session,
    owner: str,
    spec: SearchSpec,
    *,
    idempotency_key: str | None,
    max_concurrent: int,
) -> tuple[Search, bool]:
    """Queue a search; returns (search, created). The same key and body return the same search.

    The owner's lock, held until the transaction commits, makes the limit and the key exact
    however many of the owner's requests arrive at once.
    """
    digest = request_digest(spec)
    lock_owner(session, owner)
    if idempotency_key is not None:
        existing = session.scalar(
            select(Search).where(Search.owner == owner, Search.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.request_sha256 != digest:
                raise Conflict("Idempotency-Key was already used with a different spec")
            return existing, False
    open_count = session.execute(
        select(func.count())
        .select_from(Search)
        .where(Search.owner == owner, Search.status.in_(OPEN_STATUSES))
    ).scalar_one()
    if open_count >= max_concurrent:
        raise TooMany(f"{open_count} searches are queued or running; the limit is {max_concurrent}")
    search = new_search_row(spec, owner)
    search.idempotency_key, search.request_sha256 = idempotency_key, digest
    session.add(search)
    session.flush()
    return search, True


def owned_search(session: Session, owner: str, search_id: str) -> Search:
    """The owner's search, or NotFound (also for an id no database could hold)."""
    search = session.get(Search, search_id) if text_problem(search_id) is None else None
    if search is None or search.owner != owner:
        raise NotFound(f"search {search_id!r} not found")
    return search


def list_searches(session: Session, owner: str, offset: int, limit: int) -> tuple[list, int]:
    """A page of the owner's searches (newest first) and how many there are."""
    total = session.scalar(select(func.count()).select_from(Search).where(Search.owner == owner))
    rows = session.scalars(
        select(Search)
        .where(Search.owner == owner)
        .order_by(Search.created_at.desc(), Search.id)
        .offset(offset)
        .limit(limit)
    )
    return list(rows), int(total or 0)


def cancel_search(session: Session, search: Search) -> None:
    """Cancel a queued or running search; workers stop its trials within an epoch."""
    if search.status in TERMINAL_STATUSES:
        raise Conflict(f"search is already {search.status}")
    search.cancel_requested = True
    search.status = SearchStatus.CANCELLED
    search.finished_at = utcnow()


def dataset_errors(session: Session, owner: str, spec: SearchSpec) -> list[SpecIssue]:
    """Pydantic-style errors for the dataset a spec names, so that the search is refused, not
    failed later: at `dataset.id` when it names no dataset of the owner's (another owner's
    dataset is not found either), at the task when the upload's labels do not allow it."""
    dataset_id = spec.dataset.id
    if dataset_id is None:
        return []
    row = session.get(StoredDataset, dataset_id)
    if row is None or row.owner != owner:
        message = f"no dataset {dataset_id!r} among yours: upload it first (POST /v1/datasets)"
        return [{"loc": ["dataset", "id"], "msg": message, "type": "not_found"}]
    unfit = _UNFIT_LABELS.get((spec.declared_task, row.labels))
    if unfit is None:
        return []
    loc: list[str | int] = ["task"] if spec.task else ["dataset", "task"]
    message = f"dataset {dataset_id!r} has {unfit}; leave the task out to infer it from them"
    return [{"loc": loc, "msg": message, "type": "value_error"}]


#: The labels that rule out a task, by (task, what an upload's labels are).
_UNFIT_LABELS: dict[tuple[str | None, str | None], str] = {
    ("regression", "text"): "string labels, and regression needs numbers",
    ("classification", "real"): (
        "labels with fractional parts, and classification needs whole numbers or strings"
    ),
}


def uploaded_sizes(session: Session, owner: str, spec: SearchSpec) -> tuple[int, int] | None:
    """Inputs and outputs of the owner's uploaded dataset that the spec names, for the task the
    spec asks for (else the one its labels imply); None for any other dataset."""
    dataset_id = spec.dataset.id
    row = session.get(StoredDataset, dataset_id) if dataset_id is not None else None
    if row is None or row.owner != owner:
        return None
    task = spec.declared_task
    if task == "regression":
        return row.columns, 1
    if task == "classification":
        return row.columns, row.classes or row.outputs or 1
    return row.columns, row.outputs or 1


def search_trials(database_url: str, search: Search) -> list[SearchTrial]:
    """Every trial of a search with its stage and engine parameters, stage by stage."""
    spec = SearchSpec.model_validate(search.spec)
    return runner.search_trials(optuna_storage(database_url), spec, search.studies or [])


def progress(database_url: str, search: Search) -> Progress:
    """Counts of the search's trials by state (one query); `total` is its budget."""
    counts = tally_states(trial_states(database_url, search.studies or []))
    return Progress(**{**counts, "total": int(search.spec["budget"]["trials"])})


def public_search(search: Search, progress_: Progress | None = None) -> SearchPublic:
    """The API's view of a search."""
    return SearchPublic(
        id=search.id,
        name=search.name,
        status=search.status,
        stage=search.stage,
        studies=list(search.studies or []),
        progress=progress_,
        best=search.best,
        error=search.error,
        created_at=search.created_at,
        started_at=search.started_at,
        finished_at=search.finished_at,
    )


def public_trial(stage: int, trial: FrozenTrial, params: dict[str, Any]) -> TrialPublic:
    """The API's view of a trial."""
    return TrialPublic(
        stage=stage,
        number=trial.number,
        state=trial.state.name,
        value=trial.value,
        params={k: v for k, v in params.items() if k in trial.params or _one_minus(k, trial)},
        attributes={k: v for k, v in trial.user_attrs.items() if k != "stage"},
        started_at=trial.datetime_start,
        finished_at=trial.datetime_complete,
    )


def _one_minus(name: str, trial: FrozenTrial) -> bool:
    return f"one_minus_{name}" in trial.params


def search_result(database_url: str, search: Search) -> SearchResult:
    """The search as the report renders it."""
    counts = tally_states(trial_states(database_url, search.studies or []))
    return SearchResult(search.id, list(search.studies or []), counts, search.best)
