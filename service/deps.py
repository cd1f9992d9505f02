"""Route dependencies as `Annotated` aliases, so route signatures read as plain parameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from caviar.db.keys import authenticate
from caviar.db.session import session_scope
from caviar.service.settings import Settings


def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One database session per request, committed when the route returns."""
    with session_scope(settings.database_url) as session:
        yield session


#: scope="function": the session commits before the response is sent, so that a client never
#: reads a 201 for a write that is not yet (or never) committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="An API key from `caviar keys create`.")


def current_owner(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The owner of the request's bearer token; 401 when it is missing, wrong or revoked."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing bearer token")
    with session_scope(settings.database_url) as session:
        key = authenticate(session, credentials.credentials)
        owner = key.owner if key is not None else None
    if owner is None:
        raise _unauthorized("invalid or revoked token")
    return owner


Owner = Annotated[str, Depends(current_owner)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )
