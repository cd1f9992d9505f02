"""The service as users run it: real `caviar serve` (uvicorn), real workers, real PostgreSQL."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from caviar.models.data import load_dataset
from caviar.models.export import load_model

SPEC = """
name: e2e
dataset: {name: synthetic, samples: 400, features: 6, classes: 3}
budget: {trials: 6, epochs: 3}
space:
  learning_rate: {low: 1.0e-3, high: 0.3, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
fixed: {optimizer: momentum, batch_size: 32, hidden_units: 8, hidden_layers: 1}
stages: [{trials: 4}, {trials: 2}]
"""
# Long enough (over a minute) that a cancel always lands while its first trials train.
SLOW = (
    SPEC.replace("name: e2e", "name: slow")
    .replace("epochs: 3", "epochs: 1000")
    .replace("samples: 400", "samples: 20000")
    .replace("batch_size: 32", "batch_size: 8")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caviar(*args, env, timeout=300, check=True):
    done = subprocess.run(
        [sys.executable, "-m", "caviar.service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def start(*args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "caviar.service.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
def service(tmp_path, postgres_url):
    port = free_port()
    env = {
        **os.environ,
        "CAVIAR_DATABASE_URL": postgres_url,
        "CAVIAR_API_URL": f"http://127.0.0.1:{port}",
    }
    caviar("db", "upgrade", env=env)
    line = caviar("keys", "create", "alice", env=env).stdout.strip().splitlines()[-1]
    env["CAVIAR_TOKEN"] = line.split()[-1]
    server = start("serve", "--port", str(port), env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        yield env, tmp_path
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_submit_work_watch_read_export_and_cancel(service):
    env, tmp = service
    (tmp / "spec.yaml").write_text(SPEC)
    (tmp / "slow.yaml").write_text(SLOW)
    search_id = caviar("submit", str(tmp / "spec.yaml"), env=env).stdout.strip()
    api = httpx.Client(
        base_url=env["CAVIAR_API_URL"],
        headers={"Authorization": f"Bearer {env['CAVIAR_TOKEN']}"},
        timeout=30,
    )
    assert api.get(f"/v1/searches/{search_id}").json()["status"] == "queued"

    worker = start("worker", "--batch", "4", "--idle-sleep", "0.2", env=env)
    try:
        watched = caviar("watch", search_id, env=env, timeout=300)
        assert "completed" in watched.stdout
        search = api.get(f"/v1/searches/{search_id}").json()
        assert search["status"] == "completed"
        progress = search["progress"]
        assert progress["complete"] + progress["pruned"] + progress["failed"] == 6
        assert progress["total"] == 6 and progress["running"] == 0
        assert {"params", "dev_accuracy", "test_accuracy"} <= set(search["best"])

        events = api.get(f"/v1/searches/{search_id}/events").text
        kinds = [line.split(": ", 1)[1] for line in events.splitlines() if line.startswith("event")]
        assert kinds.count("trial") == 6 and kinds.count("stage") == 2 and kinds[-1] == "done"

        trials = api.get(f"/v1/searches/{search_id}/trials").json()["items"]
        assert {t["stage"] for t in trials} == {1, 2}
        assert all(0.9 <= t["params"]["momentum"] < 1 for t in trials)

        # A slow search, submitted now (workers take open searches in turn, so one submitted
        # earlier would share the worker with the first): cancel it while its trials train,
        # and they stop within an epoch.
        slow_id = caviar("submit", str(tmp / "slow.yaml"), env=env).stdout.strip()
        deadline = time.monotonic() + 120
        while api.get(f"/v1/searches/{slow_id}").json()["progress"]["running"] == 0:
            assert time.monotonic() < deadline, "the worker never started the second search"
            time.sleep(0.3)
        assert api.post(f"/v1/searches/{slow_id}/cancel").json()["status"] == "cancelled"
        deadline = time.monotonic() + 60
        while api.get(f"/v1/searches/{slow_id}").json()["progress"]["running"] > 0:
            assert time.monotonic() < deadline, "cancelled trials kept running"
            time.sleep(0.3)
        cancelled = api.get(f"/v1/searches/{slow_id}/trials").json()["items"]
        assert {t["attributes"].get("reason") for t in cancelled} == {"cancelled"}
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0

    model_path = tmp / "best.npz"
    caviar("export", search_id, str(model_path), env=env)
    model = load_model(model_path)
    ds = load_dataset({"name": "synthetic", "samples": 400, "features": 6, "classes": 3})
    raw_test = ds.x_test * ds.feature_std + ds.feature_mean
    accuracy = float(np.mean(model.predict(raw_test) == ds.y_test))
    assert accuracy == pytest.approx(search["best"]["test_accuracy"], abs=1e-6)

    report = caviar("report", search_id, "-o", str(tmp / "r.html"), env=env)
    assert "report written" in report.stdout
    unwritable = caviar("report", search_id, "-o", str(tmp), env=env, check=False)  # a folder
    assert unwritable.returncode == 2
    assert unwritable.stderr.strip().splitlines() == [f"error: cannot write {tmp}: Is a directory"]
    assert "Optimization history by stage" in (tmp / "r.html").read_text()
    status = caviar("status", search_id, env=env).stdout
    assert "completed" in status and "test_accuracy" in status
    assert json.loads(json.dumps(search["best"]))  # JSON-clean


def test_cli_errors_are_clear(service):
    env, _ = service
    bad = caviar("status", "no-such-search", env=env, check=False)
    assert bad.returncode == 2 and "404" in bad.stdout + bad.stderr
    wrong = caviar("status", "x", env={**env, "CAVIAR_TOKEN": "cav_x_y"}, check=False)
    assert wrong.returncode == 2 and "401" in wrong.stdout + wrong.stderr


def test_hostile_cli_arguments_and_settings_are_one_line_errors(service):
    env, _ = service
    cases = [
        (["status", ""], {}, "the id is empty"),
        (["status", "?x"], {}, "404"),
        (["status", "../../v1/datasets"], {}, "404"),
        (["datasets", "delete", ""], {}, "the id is empty"),
        (["list"], {"CAVIAR_API_URL": "http://[::1"}, "CAVIAR_API_URL"),
        (["list"], {"CAVIAR_TOKEN": "é"}, "CAVIAR_TOKEN holds characters"),
        (["list"], {"CAVIAR_MAX_TRIALS": "abc"}, "CAVIAR_MAX_TRIALS: "),
    ]
    for args, env_update, reason in cases:
        done = caviar(*args, env={**env, **env_update}, check=False)
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and reason in lines[0], (args, lines)
