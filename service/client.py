"""A small HTTP client of the API for the CLI (`CAVIAR_API_URL`, `CAVIAR_TOKEN`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class ApiError(RuntimeError):
    """The API answered with an error; the message carries its status and detail."""


class Client:
    """Calls the API with the caller's bearer token."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0) -> None:
        if not token:
            raise ApiError("no API token: set CAVIAR_TOKEN (see `caviar keys create`)")
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ApiError(f"cannot reach the API at {self.http.base_url}: {error}") from None
        if response.status_code >= 400:
            raise ApiError(f"{response.status_code}: {_detail(response)}")
        return response

    def events(self, search_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs of a search's server-sent events until `done`."""
        path = f"/v1/searches/{search_id}/events"
        with self.http.stream("GET", path, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(f"{response.status_code}: {_detail(response)}")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: ") and event:
                    yield event, json.loads(line[len("data: ") :])
                    event = None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text
    if isinstance(detail, list):  # validation errors: "field.path: message" per line
        return "; ".join(
            ".".join(str(p) for p in e.get("loc", []) if p != "body") + f": {e.get('msg')}"
            for e in detail
        )
    return str(detail)
