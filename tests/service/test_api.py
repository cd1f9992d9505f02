"""The API contract: auth on every route, isolation between owners, limits, idempotency, errors."""

import copy
import io
import json
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pytest

from caviar.db.storage import optuna_storage
from caviar.service.app import create_app
from caviar.service.settings import Settings

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.service.support import SPEC, auth
else:
    from support import SPEC, auth


def submit(client, token, spec=SPEC, **headers):
    return client.post("/v1/searches", json=spec, headers={**auth(token), **headers})


def v1_routes(app):
    """Every (method, path) of the app's /v1 API, path parameters filled in."""
    for path, operations in app.openapi()["paths"].items():
        if path.startswith("/v1"):
            for method in operations:
                yield method.upper(), path.replace("{search_id}", "x").replace("{dataset_id}", "x")


def test_every_v1_route_needs_a_valid_token(client):
    routes = list(v1_routes(client.app))
    assert len(routes) >= 10
    for method, path in routes:
        missing = client.request(method, path)
        assert missing.status_code == 401, (method, path)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, path, headers=auth("cav_nope_nope"))
        assert wrong.status_code == 401, (method, path)


def test_an_owner_never_sees_another_owners_search_or_dataset(client, tokens):
    search_id = submit(client, tokens["alice"]).json()["id"]
    upload = client.post(
        "/v1/datasets",
        files={"file": ("d.csv", b"a,b,label\n" + b"1,2,0\n3,4,1\n" * 10)},
        data={"target": "label"},
        headers=auth(tokens["alice"]),
    )
    assert upload.status_code == 201, upload.text
    bob = auth(tokens["bob"])
    for method, path in [
        ("GET", f"/v1/searches/{search_id}"),
        ("GET", f"/v1/searches/{search_id}/trials"),
        ("GET", f"/v1/searches/{search_id}/report"),
        ("GET", f"/v1/searches/{search_id}/events"),
        ("GET", f"/v1/searches/{search_id}/model"),
        ("POST", f"/v1/searches/{search_id}/cancel"),
        ("DELETE", f"/v1/datasets/{upload.json()['id']}"),
    ]:
        response = client.request(method, path, headers=bob)
        assert response.status_code == 404, (method, path, response.status_code)
    assert client.get("/v1/searches", headers=bob).json()["total"] == 0
    assert client.get("/v1/datasets", headers=bob).json()["items"] == []
    assert client.get("/v1/searches", headers=auth(tokens["alice"])).json()["total"] == 1


def test_submit_returns_201_and_the_search_reads_back_queued(client, tokens):
    created = submit(client, tokens["alice"])
    assert created.status_code == 201
    body = client.get(f"/v1/searches/{created.json()['id']}", headers=auth(tokens["alice"]))
    assert body.json()["status"] == "queued"
    assert body.json()["progress"] == {
        "complete": 0,
        "pruned": 0,
        "failed": 0,
        "running": 0,
        "total": 4,
    }


def test_a_malformed_spec_is_a_422_naming_the_field(client, tokens):
    spec = copy.deepcopy(SPEC)
    spec["space"]["momentum"] = {"low": 0.9, "high": 1.5, "scale": "one_minus_log"}
    response = submit(client, tokens["alice"], spec)
    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["detail"]]
    assert ["body", "space", "momentum"] in [loc[:3] for loc in locs]


def test_idempotency_key_returns_the_same_search_and_refuses_another_body(client, tokens):
    first = submit(client, tokens["alice"], **{"Idempotency-Key": "k1"})
    again = submit(client, tokens["alice"], **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    other = copy.deepcopy(SPEC)
    other["seed"] = 5
    assert submit(client, tokens["alice"], other, **{"Idempotency-Key": "k1"}).status_code == 409
    # The same key of another owner is another search.
    assert (
        submit(client, tokens["bob"], **{"Idempotency-Key": "k1"}).json()["id"]
        != first.json()["id"]
    )


def test_cancel_a_queued_search(client, tokens):
    search_id = submit(client, tokens["alice"]).json()["id"]
    cancelled = client.post(f"/v1/searches/{search_id}/cancel", headers=auth(tokens["alice"]))
    assert cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/searches/{search_id}/cancel", headers=auth(tokens["alice"]))
    assert again.status_code == 409


def test_list_is_paginated(client, tokens):
    ids = [submit(client, tokens["alice"]).json()["id"] for _ in range(3)]
    page = client.get("/v1/searches?limit=2&offset=0", headers=auth(tokens["alice"])).json()
    rest = client.get("/v1/searches?limit=2&offset=2", headers=auth(tokens["alice"])).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and len(rest["items"]) == 1
    assert {i["id"] for i in page["items"] + rest["items"]} == set(ids)


@pytest.mark.parametrize(
    ("setting", "limit", "path", "value"),
    [
        ("max_trials", 4, ("budget", "trials"), 4),
        ("max_epochs", 2, ("budget", "epochs"), 2),
        ("max_hidden_layers", 1, ("fixed", "hidden_layers"), 1),
        ("max_hidden_units", 8, ("fixed", "hidden_units"), 8),
    ],
)
def test_each_limit_at_its_boundary(settings, tokens, setting, limit, path, value):
    from fastapi.testclient import TestClient

    app = create_app(settings.model_copy(update={setting: limit}))
    with TestClient(app) as client:
        at_limit = copy.deepcopy(SPEC)
        at_limit[path[0]][path[1]] = value
        assert submit(client, tokens["alice"], at_limit).status_code == 201
        over = copy.deepcopy(SPEC)
        over[path[0]][path[1]] = value + 1
        response = submit(client, tokens["alice"], over)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == list(path)


def test_parameter_count_limit(settings, tokens):
    from fastapi.testclient import TestClient

    # synthetic 5 features → 8 hidden → 2 classes: 5*8+8 + 8*2+2 = 66 parameters.
    for limit, expected in ((66, 201), (65, 422)):
        with TestClient(create_app(settings.model_copy(update={"max_parameters": limit}))) as c:
            response = submit(c, tokens["alice"])
            assert response.status_code == expected, response.text
            if expected == 422:
                assert "66 parameters" in response.json()["detail"][0]["msg"]


def test_concurrent_searches_per_owner_are_limited(client, tokens):
    for _ in range(3):
        assert submit(client, tokens["alice"]).status_code == 201
    response = submit(client, tokens["alice"])
    assert response.status_code == 429
    assert submit(client, tokens["bob"]).status_code == 201  # another owner is not limited


def test_spec_size_limit_at_its_boundary(settings, tokens):
    from fastapi.testclient import TestClient

    body = json.dumps(SPEC)
    with TestClient(create_app(settings.model_copy(update={"max_spec_bytes": len(body)}))) as c:
        headers = {**auth(tokens["alice"]), "Content-Type": "application/json"}
        assert c.post("/v1/searches", content=body, headers=headers).status_code == 201
        too_big = c.post("/v1/searches", content=body + " ", headers=headers)
        assert too_big.status_code == 413


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_the_parameter_limit_counts_an_uploaded_datasets_inputs_and_classes(client, tokens):
    """1,000 features and labels 0-599: regression by default (more distinct integers than
    classes are inferred for), 600 classes where the spec asks for classification."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1200, 1000)).astype(np.float32), np.arange(1200) % 600
    alice = auth(tokens["alice"])
    files = {"file": ("d.npz", npz_bytes(x=x, y=y))}
    upload = client.post("/v1/datasets", files=files, headers=alice)
    assert upload.status_code == 201, upload.text
    # At 1,024 units: 1,026,049 parameters with one output, 1,640,024 with 600.
    limit = client.app.state.settings.model_copy(update={"max_parameters": 1_600_000})
    client.app.state.settings = limit
    spec = {**SPEC, "dataset": {"id": upload.json()["id"]}}
    spec["fixed"] = {**SPEC["fixed"], "hidden_units": 1024}
    assert submit(client, tokens["alice"], spec).status_code == 201
    classified = {**spec, "name": "classified", "task": "classification"}
    refused = submit(client, tokens["alice"], classified)
    assert refused.status_code == 422, refused.text
    (error,) = refused.json()["detail"]
    assert error["loc"] == ["space"] and "1,640,024 parameters" in error["msg"]
    client.app.state.settings = limit.model_copy(update={"max_parameters": 1_000_000})
    refused = submit(client, tokens["alice"], {**spec, "name": "wide"})  # the inputs count too
    assert refused.status_code == 422 and "1,026,049 parameters" in refused.text


@pytest.mark.parametrize(
    ("labels", "task_field", "task", "loc"),
    [
        (np.array(["cat", "dog"] * 60), "task", "regression", ["task"]),
        (np.array(["cat", "dog"] * 60), "dataset", "regression", ["dataset", "task"]),
        (np.linspace(0.5, 2.5, 120), "task", "classification", ["task"]),
    ],
)
def test_a_task_the_uploads_labels_rule_out_is_refused_at_submission(
    client, tokens, labels, task_field, task, loc
):
    """Regression on string labels, classification on fractional ones: a 422 at the task, not
    a search that fails in the worker; the same upload with its task inferred is accepted."""
    x = np.random.default_rng(0).normal(size=(len(labels), 4))
    alice = auth(tokens["alice"])
    upload = client.post(
        "/v1/datasets", files={"file": ("d.npz", npz_bytes(x=x, y=labels))}, headers=alice
    )
    assert upload.status_code == 201, upload.text
    spec = {**SPEC, "dataset": {"id": upload.json()["id"]}}
    asked = (
        {**spec, "task": task}
        if task_field == "task"
        else {**spec, "dataset": {**spec["dataset"], "task": task}}
    )
    refused = submit(client, tokens["alice"], asked)
    assert refused.status_code == 422, refused.text
    (error,) = refused.json()["detail"]
    assert error["loc"] == loc and task in error["msg"], error
    assert submit(client, tokens["alice"], spec).status_code == 201


def test_upload_size_limit_at_its_boundary(settings, tokens):
    from fastapi.testclient import TestClient

    rng = np.random.default_rng(0)
    content = npz_bytes(x=rng.normal(size=(40, 3)), y=rng.integers(0, 2, 40))
    with TestClient(
        create_app(settings.model_copy(update={"max_upload_bytes": len(content)}))
    ) as c:
        ok = c.post(
            "/v1/datasets", files={"file": ("d.npz", content)}, headers=auth(tokens["alice"])
        )
        assert ok.status_code == 201, ok.text
        assert ok.json()["rows"] == 40 and ok.json()["columns"] == 3
        over = c.post(
            "/v1/datasets",
            files={"file": ("d.npz", content + b"\0")},
            headers=auth(tokens["alice"]),
        )
        assert over.status_code == 413


@pytest.mark.parametrize(
    ("name", "content", "status"),
    [
        ("d.txt", b"hello", 415),
        ("d.npz", b"not a zip file", 422),
        ("d.npz", npz_bytes(x=np.array([[1.0, np.nan]] * 20), y=np.zeros(20)), 422),
        ("d.npz", npz_bytes(x=np.array([{"a": 1}] * 20, dtype=object), y=np.zeros(20)), 422),
        ("d.csv", b"a,b\n1,2\n", 422),  # no target column given
    ],
)
def test_bad_uploads_are_4xx_with_a_reason(client, tokens, name, content, status):
    response = client.post(
        "/v1/datasets", files={"file": (name, content)}, headers=auth(tokens["alice"])
    )
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_dataset_upload_list_and_delete(client, tokens):
    alice = auth(tokens["alice"])
    created = client.post(
        "/v1/datasets",
        files={"file": ("d.csv", b"a,b,label\n" + b"1,2,x\n3,4,y\n" * 8)},
        data={"target": "label"},
        headers=alice,
    ).json()
    assert created["format"] == "csv" and created["rows"] == 16 and created["columns"] == 2
    assert [d["id"] for d in client.get("/v1/datasets", headers=alice).json()["items"]] == [
        created["id"]
    ]
    spec = {**SPEC, "dataset": {"id": created["id"]}}
    submit(client, tokens["alice"], spec)
    assert client.delete(f"/v1/datasets/{created['id']}", headers=alice).status_code == 409
    search_id = client.get("/v1/searches", headers=alice).json()["items"][0]["id"]
    client.post(f"/v1/searches/{search_id}/cancel", headers=alice)
    assert client.delete(f"/v1/datasets/{created['id']}", headers=alice).status_code == 204
    assert client.get("/v1/datasets", headers=alice).json()["items"] == []


def test_health_readiness_and_metrics(client, settings, tokens, tmp_path):
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").status_code == 200
    submit(client, tokens["alice"])
    metrics = client.get("/metrics").text
    assert 'caviar_searches{status="queued"} 1' in metrics
    assert "caviar_trial_duration_seconds_count 0" in metrics
    study = optuna.create_study(storage=optuna_storage(settings.database_url))
    study.tell(study.ask(), 1.0)  # a finished trial: its times come back from SQLite as text
    metrics = client.get("/metrics").text
    assert 'caviar_trials{state="COMPLETE"} 1' in metrics
    assert "caviar_trial_duration_seconds_count 1" in metrics
    from fastapi.testclient import TestClient

    stale = Settings(database_url=f"sqlite:///{tmp_path / 'never-migrated.db'}")
    with TestClient(create_app(stale)) as c:
        response = c.get("/readyz")
        assert response.status_code == 503
        assert "caviar db upgrade" in response.json()["detail"]


def test_openapi_names_and_describes_every_schema(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("SearchSpec", "SearchPublic", "Progress", "TrialList", "DatasetPublic"):
        assert name in schemas
    undescribed = [
        name
        for name, schema in schemas.items()
        if not schema.get("description") and name not in ("HTTPValidationError", "ValidationError")
    ]
    assert undescribed == []
    assert client.get("/docs").status_code == 200


def test_a_seed_numpy_cannot_take_is_a_422_naming_seed(client, tokens):
    assert submit(client, tokens["alice"], {**SPEC, "seed": 2**32 - 1}).status_code == 201
    for seed in (2**32, 10**30):
        response = submit(client, tokens["alice"], {**SPEC, "seed": seed})
        assert response.status_code == 422, response.text
        assert [error["loc"][-1] for error in response.json()["detail"]] == ["seed"]


@pytest.mark.parametrize(
    ("setting", "limit", "dataset", "field"),
    [
        ("max_samples", 300, {"name": "synthetic", "samples": 300, "features": 5}, "samples"),
        ("max_samples", 5000, {"name": "mnist1d"}, "samples"),  # the default size counts
        ("max_features", 5, {"name": "synthetic", "samples": 300, "features": 5}, "features"),
        ("max_classes", 3, {"name": "synthetic", "samples": 300, "classes": 3}, "classes"),
        ("max_dataset_values", 1500, {"name": "synthetic", "samples": 300, "features": 5}, None),
        ("max_dataset_values", 200_000, {"name": "mnist1d", "samples": 5000}, None),
    ],
)
def test_dataset_sizes_are_limited_at_their_boundary(
    settings, tokens, setting, limit, dataset, field
):
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings.model_copy(update={setting: limit}))) as client:
        at_limit = {**SPEC, "dataset": dataset}
        assert submit(client, tokens["alice"], at_limit).status_code == 201
        key = field or "samples"
        value = dataset.get(key, 5000)
        over = {**SPEC, "dataset": {**dataset, key: value + 1}}
        response = submit(client, tokens["alice"], over)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["dataset", key]
        assert f"{limit:,}" in error["msg"]


def test_the_default_limits_refuse_datasets_that_would_exhaust_a_worker(client, tokens):
    for dataset in (
        {"name": "synthetic", "samples": 1_000_000_000},
        {"name": "synthetic", "features": 40_000_000},
        {"name": "mnist1d", "samples": 1_000_000_000},
    ):
        response = submit(client, tokens["alice"], {**SPEC, "dataset": dataset})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][:1] == ["dataset"]


def path_spec(path: str) -> dict:
    return {**SPEC, "dataset": {"path": path, "target": "label"}}


def test_a_spec_may_not_name_a_file_without_a_data_directory(client, tokens, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("password,label\nhunter2,1\n")
    for path in (str(secret), str(tmp_path / "missing.csv")):
        response = submit(client, tokens["alice"], path_spec(path))
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["dataset", "path"]
        assert "hunter2" not in response.text and "password" not in response.text
    # Existing or not, the answer is the same: it reveals nothing of the worker's disk.
    assert (
        submit(client, tokens["alice"], path_spec(str(secret))).json()
        == submit(client, tokens["alice"], path_spec(str(tmp_path / "missing.csv"))).json()
    )


def test_a_data_directory_admits_its_files_and_nothing_outside_it(settings, tokens, tmp_path):
    from fastapi.testclient import TestClient

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "train.csv").write_text("a,label\n1,0\n")
    outside = tmp_path / "outside.csv"
    outside.write_text("password,label\nhunter2,1\n")
    (data / "link.csv").symlink_to(outside)
    (data / "dirlink").symlink_to(tmp_path)
    app = create_app(settings.model_copy(update={"data_dir": str(data)}))
    with TestClient(app) as client:
        for good in ("sub/train.csv", str(data / "sub" / "train.csv"), "sub/../sub/train.csv"):
            assert submit(client, tokens["alice"], path_spec(good)).status_code == 201, good
        refused = {}
        for bad in (
            "../outside.csv",
            str(outside),
            "link.csv",
            "dirlink/outside.csv",
            "../missing.csv",
            "sub/missing.csv",
        ):
            response = submit(client, tokens["alice"], path_spec(bad))
            assert response.status_code == 422, bad
            assert response.json()["detail"][0]["loc"] == ["dataset", "path"]
            assert "hunter2" not in response.text
            refused[bad] = response.json()["detail"][0]["msg"]
    # Outside the directory, existing and missing files are refused alike.
    assert refused["../outside.csv"] == refused["../missing.csv"] == refused["link.csv"]
    assert "sub/missing.csv" in refused["sub/missing.csv"]


def test_a_spec_naming_no_dataset_of_the_owners_is_a_422_at_submit(client, tokens):
    rng = np.random.default_rng(0)
    content = npz_bytes(x=rng.normal(size=(40, 3)), y=rng.integers(0, 2, 40))
    bobs = client.post(
        "/v1/datasets", files={"file": ("d.npz", content)}, headers=auth(tokens["bob"])
    ).json()["id"]
    for dataset_id in ("ds-missing", bobs):  # another owner's dataset is not found either
        spec = {**SPEC, "dataset": {"id": dataset_id}}
        response = submit(client, tokens["alice"], spec)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["dataset", "id"] and "no dataset" in error["msg"]
    assert submit(client, tokens["bob"], {**SPEC, "dataset": {"id": bobs}}).status_code == 201


def test_a_cancelled_search_has_finished(client, tokens):
    search_id = submit(client, tokens["alice"]).json()["id"]
    cancelled = client.post(f"/v1/searches/{search_id}/cancel", headers=auth(tokens["alice"]))
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
