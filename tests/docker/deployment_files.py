"""What the deployment tests share: the folders, the compose files, and the check that a
deployed command is a real `caviar` command."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.remote-workers.yml"]
#: How long a GPU worker has, after SIGTERM, to give its trials back: compose and Kubernetes.
WORKER_GRACE = "30s"
#: The port a worker serves Prometheus metrics on in its container or pod, compose and Kubernetes.
METRICS_PORT = 9500


def compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def seconds(duration: str) -> int:
    """A compose duration such as `30s`, `1m30s` or `2m`, in seconds."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    minutes, secs = (int(p or 0) for p in parts.groups())
    return 60 * minutes + secs


def assert_caviar_command(where: str, command: list[str]) -> None:
    """`command` (the arguments after `caviar`) names a subcommand whose options all exist."""
    words = [w for w in command if not w.startswith("-")]
    subcommand = words[:2] if words[0] in ("db", "keys") else words[:1]
    done = subprocess.run(
        [sys.executable, "-m", "caviar.service.cli", *subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, (where, done.stderr)
    for option in [w for w in command if w.startswith("--")]:
        assert option in done.stdout, (where, option)
