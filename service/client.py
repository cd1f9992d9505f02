"""A small HTTP client of the API for the CLI (`CAVIAR_API_URL`, `CAVIAR_TOKEN`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from caviar.models.errors import CaviarError


class ApiError(CaviarError, RuntimeError):
    """The API answered with an error; the message carries its status and detail."""


class Client:
    """Calls the API with the caller's bearer token."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0) -> None:
        if not token:
            raise ApiError("no API token: set CAVIAR_TOKEN (see `caviar keys create`)")
        if not (token.isascii() and token.isprintable()):
            raise ApiError("CAVIAR_TOKEN holds characters no API token has: set it again")
        try:
            self.http = httpx.Client(
                base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
            )
        except httpx.InvalidURL as error:
            raise ApiError(f"CAVIAR_API_URL {base_url!r} is not a URL: {error}") from None

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise ApiError(f"cannot reach the API at {self.http.base_url}: {error}") from None
        if response.status_code >= 400:
            raise ApiError(f"{response.status_code}: {_detail(response)}")
        return response

    def events(
        self,
        search_id: str,
        retry_for: float = 120.0,
        on_retry: Callable[[str], None] | None = None,
    ) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs of a search's server-sent events until `done`.

        When the stream breaks (the API restarted, a proxy dropped it), this reconnects with
        `Last-Event-ID`, so that no event is lost or repeated; `on_retry` hears why. It gives
        up with ApiError once the API has been unreachable for `retry_for` seconds.
        """
        path = f"/v1/searches/{quote(search_id, safe='')}/events"
        last_id: str | None = None
        down_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream("GET", path, headers=headers, timeout=_STREAM_TIMEOUT) as r:
                    if r.status_code in _RETRY_STATUSES:
                        reason = f"the API answered {r.status_code}"
                    elif r.status_code >= 400:
                        r.read()
                        raise ApiError(f"{r.status_code}: {_detail(r)}")
                    else:
                        down_since = None
                        for event_id, event, data in _server_sent_events(r.iter_lines()):
                            last_id = event_id or last_id
                            yield event, data
                            if event == "done":
                                return
                        reason = "the event stream ended before the search did"
            except httpx.TransportError as error:
                reason = f"lost the API at {self.http.base_url} ({type(error).__name__})"
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > retry_for:
                raise ApiError(f"{reason}; gave up after {retry_for:g} s")
            if on_retry is not None:
                on_retry(f"{reason}; reconnecting")
            time.sleep(1.0)


#: A stream waits as long as the search takes; connecting to it does not.
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)

#: Answers of an API or proxy that is restarting: retried like a dropped connection.
_RETRY_STATUSES = (502, 503, 504)


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str, dict]]:
    """(id, event, data) of each complete server-sent event (an event cut off is dropped)."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


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
