"""Every client error is a 4xx that names what is wrong, and no answer names the database."""

import copy
import json
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from caviar.db.keys import create_key
from caviar.db.migrate import upgrade
from caviar.db.session import session_scope
from caviar.service.app import create_app
from caviar.service.settings import Settings

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.service.support import SPEC, auth
else:
    from support import SPEC, auth


def strict_json(response) -> Any:
    """The body parsed as strict JSON (no NaN or Infinity, valid UTF-8)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"the body holds {constant}, which is not JSON")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)


def post_raw(client, token, body: str):
    headers = {**auth(token), "Content-Type": "application/json"}
    return client.post(
        "/v1/searches", content=body.encode("utf-8", "surrogatepass"), headers=headers
    )


def spec_json(**changes) -> str:
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = spec
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return json.dumps(spec)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (spec_json(budget__trials="@").replace('"@"', "NaN"), ["budget", "trials"]),
        (spec_json(fixed__l2="@").replace('"@"', "Infinity"), ["fixed", "l2"]),
        (spec_json(dataset__noise="@").replace('"@"', "-Infinity"), ["dataset", "noise"]),
        (
            spec_json(space__learning_rate__high="@").replace('"@"', "1e999"),
            ["space", "learning_rate", "high"],
        ),
        (spec_json(name="@").replace('"@"', '"\\ud800"'), ["name"]),
        (spec_json(dataset__id="@").replace('"@"', '"ds-\\udfff"'), ["dataset", "id"]),
    ],
    ids=["nan", "infinity", "minus-infinity", "1e999", "surrogate-name", "surrogate-id"],
)
def test_non_finite_numbers_and_lone_surrogates_are_a_422_naming_the_field(
    client, tokens, body, loc
):
    response = post_raw(client, tokens["alice"], body)
    assert response.status_code == 422, response.text
    assert ["body", *loc] in [error["loc"] for error in strict_json(response)["detail"]]


@pytest.mark.parametrize(
    ("changes", "loc", "reason"),
    [
        ({"name": "x" * 201}, ["name"], "at most 200 characters"),
        ({"name": "a\0b"}, ["name"], "NUL"),
        ({"dataset": {"id": "ds-\0"}}, ["dataset", "id"], "NUL"),
        ({"dataset": {"path": "d\0.csv", "target": "y"}}, ["dataset", "path"], "NUL"),
        ({"fixed": {**SPEC["fixed"], "activation": "re\0lu"}}, ["fixed", "activation"], "NUL"),
    ],
    ids=["long-name", "nul-name", "nul-id", "nul-path", "nul-fixed"],
)
def test_text_the_database_cannot_hold_is_a_422_naming_the_field(
    client, tokens, changes, loc, reason
):
    response = client.post("/v1/searches", json={**SPEC, **changes}, headers=auth(tokens["alice"]))
    assert response.status_code == 422, response.text
    errors = {tuple(e["loc"]): e["msg"] for e in strict_json(response)["detail"]}
    assert reason in errors[("body", *loc)]


def test_a_name_of_200_characters_is_accepted(client, tokens):
    response = client.post(
        "/v1/searches", json={**SPEC, "name": "x" * 200}, headers=auth(tokens["alice"])
    )
    assert response.status_code == 201, response.text


CSV = b"a,b,label\n" + b"1,2,0\n3,4,1\n" * 10


@pytest.mark.parametrize(
    ("filename", "target", "reason"),
    [
        ("x" * 197 + ".csv", "label", "file name is longer than the limit of 200 characters"),
        ("d.csv", "t" * 201, "target is longer than the limit of 200 characters"),
        ("d.csv", "label\0", "target must not contain a NUL character"),
    ],
)
def test_upload_names_that_do_not_fit_are_a_422(client, tokens, filename, target, reason):
    response = client.post(
        "/v1/datasets",
        files={"file": (filename, CSV)},
        data={"target": target},
        headers=auth(tokens["alice"]),
    )
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]


def test_an_offset_beyond_the_databases_integers_is_a_422(client, tokens):
    alice = auth(tokens["alice"])
    largest = client.get(f"/v1/searches?offset={2**63 - 1}", headers=alice)
    assert largest.status_code == 200 and largest.json()["items"] == []
    response = client.get(f"/v1/searches?offset={2**63}", headers=alice)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "offset"]


def test_ids_no_database_could_hold_are_not_found(database_url):
    upgrade(database_url)
    with session_scope(database_url) as session:
        token = create_key(session, "alice", "test")[1]
    with TestClient(create_app(Settings(database_url=database_url))) as client:
        for method, path in [
            ("GET", "/v1/searches/a%00b"),
            ("GET", "/v1/searches/a%00b/trials"),
            ("POST", "/v1/searches/a%00b/cancel"),
            ("DELETE", "/v1/datasets/ds-%00"),
        ]:
            response = client.request(method, path, headers=auth(token))
            assert response.status_code == 404, (method, path, response.text)


#: A token of the right form, so that authenticating it needs the database.
WELL_FORMED_TOKEN = "cav_" + "0" * 24 + "_secret"


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("sqlite:////nonexistent-dir/secret-name.db", ["nonexistent-dir", "secret-name", "sqlite"]),
        (
            "postgresql://secret_user:hunter2@127.0.0.1:1/secret_db",
            ["secret_db", "secret_user", "hunter2", "127.0.0.1", "postgres"],
        ),
    ],
    ids=["sqlite", "postgresql"],
)
def test_an_unreachable_database_is_a_503_that_does_not_name_it(url, secrets, caplog):
    with TestClient(create_app(Settings(database_url=url))) as client:
        responses = [
            client.get("/v1/searches", headers=auth(WELL_FORMED_TOKEN)),
            client.post("/v1/searches", json=SPEC, headers=auth(WELL_FORMED_TOKEN)),
            client.get("/readyz"),
        ]
    for response in responses:
        assert response.status_code == 503, response.text
        assert not [secret for secret in secrets if secret in response.text], response.text
    assert responses[0].json()["detail"] == "database unavailable; try again later"
    assert responses[2].json()["detail"] == "database unreachable"
    assert secrets[0] in caplog.text  # the operator still finds the reason in the log
    assert "hunter2" not in caplog.text
