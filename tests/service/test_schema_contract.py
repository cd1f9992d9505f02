"""The API keeps its OpenAPI contract: generated requests (Schemathesis), explicit examples
included, never get a 5xx or a status, content type or body the schema does not document."""

import tempfile
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from caviar.db.keys import create_key
from caviar.db.migrate import upgrade
from caviar.db.session import session_scope
from caviar.service.app import create_app
from caviar.service.routes.searches import SPEC_EXAMPLES
from caviar.service.settings import Settings

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.service.support import auth
else:
    from support import auth

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


#: The schema is read when the module is collected, so the app exists then; its database (a real
#: SQLite file) is only created by the `token` fixture.
_DATA = tempfile.TemporaryDirectory(prefix="caviar-contract-")
URL = f"sqlite:///{_DATA.name}/contract.db"
# Room for every example search: the per-owner limit (429) is tested elsewhere.
APP = create_app(Settings(database_url=URL, max_concurrent_searches=10**6))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def token() -> str:
    upgrade(URL)
    with session_scope(URL) as session:
        return create_key(session, "alice", "contract")[1]


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_generated_requests_keep_the_contract(case, token):
    """About 25 generated requests per operation, plus Schemathesis's boundary cases and the
    schema's examples: some 850 requests in all, a few of them searches really created."""
    case.call_and_validate(headers=auth(token), checks=CHECKS)


@pytest.mark.parametrize("name", SPEC_EXAMPLES)
def test_every_documented_example_spec_creates_a_search(client, tokens, name):
    response = client.post(
        "/v1/searches", json=SPEC_EXAMPLES[name]["value"], headers=auth(tokens["alice"])
    )
    assert response.status_code == 201, response.text
