"""What `caviar worker` says and does when it starts: its devices and precision, or a refusal."""

import os
import signal
import subprocess
import sys

from caviar.db.migrate import upgrade


def start_worker(url: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "caviar.service.cli", "worker", "--database-url", url],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_worker_that_requires_an_accelerator_refuses_to_start_on_the_cpu(tmp_path):
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    upgrade(url)
    worker = start_worker(url, CAVIAR_REQUIRE_ACCELERATOR="true")
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 2
    assert "accelerator was required" in err and "only the CPU" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def start_line(tmp_path, **env: str) -> str:
    """The line a worker prints when it starts (it is stopped right after)."""
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    upgrade(url)
    worker = start_worker(url, **env)
    assert worker.stdout is not None
    line = worker.stdout.readline()
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=60)
    return line


def test_a_worker_prints_its_devices_matmul_precision_and_group_size(tmp_path):
    line = start_line(tmp_path, CAVIAR_MATMUL_PRECISION="high")
    assert "devices: TFRT_CPU_0" in line or "devices: cpu" in line.lower(), line
    assert "matmul precision: high" in line
    assert "32 trials a claim, 4 a compiled call" in line  # the CPU's measured group size
    assert "rounds in lockstep" in line  # the CPU's default


def test_a_group_size_setting_sets_the_claim_and_the_compiled_call(tmp_path):
    line = start_line(tmp_path, CAVIAR_GROUP_SIZE="64", CAVIAR_DISPATCH_AHEAD="1")
    assert "64 trials a claim, 64 a compiled call" in line, line
    assert "rounds dispatched ahead" in line, line
