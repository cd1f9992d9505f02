"""Operations: liveness, readiness and Prometheus metrics (no authentication)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import DateTime, func, inspect, select, text

from caviar.db.migrate import is_current
from caviar.db.session import DatabaseError, session_scope
from caviar.db.tables import SEARCH_STATUSES, Search
from caviar.service.deps import SettingsDep
from caviar.service.schemas import Health, content_response, error_responses

log = logging.getLogger("caviar.api")
router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(settings: SettingsDep):
    """The database answers and its migrations are current."""
    try:
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
        current = is_current(settings.database_url)
    except DatabaseError as error:
        log.error("readyz: %s", error)  # the reason names the database: only the log shows it
        return _unavailable("database unreachable")
    if not current:
        return _unavailable("database migrations are not current: run `caviar db upgrade`")
    return Health(status="ok")


#: Upper bounds (seconds) of the trial-duration histogram's buckets.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **content_response("text/plain", "Prometheus text format."),
        **error_responses(503),
    },
)
def metrics(settings: SettingsDep) -> PlainTextResponse:
    """Prometheus text: searches by status, trials by state, trial durations."""
    with session_scope(settings.database_url) as session:
        by_status = dict(
            session.execute(select(Search.status, func.count()).group_by(Search.status)).all()
        )
        tables = set(inspect(session.connection()).get_table_names())
        trials: list[tuple[str, int]] = []
        durations = []
        if "trials" in tables:  # Optuna's table, once any study exists
            rows = session.execute(text("SELECT state, COUNT(*) FROM trials GROUP BY state"))
            trials = [(str(state).rsplit(".", 1)[-1], count) for state, count in rows]
            # Typed columns: SQLite hands timestamps back as text.
            finished = session.execute(
                text(
                    "SELECT datetime_start, datetime_complete FROM trials "
                    "WHERE datetime_start IS NOT NULL AND datetime_complete IS NOT NULL"
                ).columns(datetime_start=DateTime, datetime_complete=DateTime)
            )
            durations = [(end - start).total_seconds() for start, end in finished]
    lines = ["# HELP caviar_searches Searches by status.", "# TYPE caviar_searches gauge"]
    lines += [f'caviar_searches{{status="{s}"}} {by_status.get(s, 0)}' for s in SEARCH_STATUSES]
    lines += ["# HELP caviar_trials Trials by state.", "# TYPE caviar_trials gauge"]
    lines += [f'caviar_trials{{state="{state}"}} {count}' for state, count in sorted(trials)]
    lines += [
        "# HELP caviar_trial_duration_seconds Wall time of finished trials.",
        "# TYPE caviar_trial_duration_seconds histogram",
    ]
    for bound in DURATION_BUCKETS:
        count = sum(d <= bound for d in durations)
        lines.append(f'caviar_trial_duration_seconds_bucket{{le="{bound}"}} {count}')
    lines.append(f'caviar_trial_duration_seconds_bucket{{le="+Inf"}} {len(durations)}')
    lines.append(f"caviar_trial_duration_seconds_sum {sum(durations):.3f}")
    lines.append(f"caviar_trial_duration_seconds_count {len(durations)}")
    return PlainTextResponse("\n".join(lines) + "\n")


def _unavailable(detail: str) -> JSONResponse:
    body = Health(status="unavailable", detail=detail).model_dump()
    return JSONResponse(body, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
