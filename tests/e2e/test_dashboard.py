"""The Optuna dashboard, started by `caviar dashboard` on a finished search, in Chromium."""

import json
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.external import CHROMIUM_HINT, find_chromium, missing
else:
    from external import CHROMIUM_HINT, find_chromium, missing

SPEC = """
name: dash
dataset: {name: synthetic, samples: 300, features: 5, classes: 2}
budget: {trials: 5, epochs: 2}
space:
  learning_rate: {low: 1.0e-3, high: 0.1, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
fixed: {optimizer: momentum, batch_size: 32, hidden_units: 8, hidden_layers: 1}
"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


def chromium() -> str:
    """Chromium's path; fails (CI) or skips the test where it is not installed."""
    path = find_chromium()
    if path is None:
        missing(f"Chromium: not found; {CHROMIUM_HINT}")
    return path


def render(url: str, profile) -> str:
    """The page's DOM after its scripts ran."""
    done = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


def test_dashboard_lists_the_search_and_shows_its_trials(tmp_path):
    chromium()  # before the search: without a browser the test fails or skips at once
    (tmp_path / "spec.yaml").write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "caviar.service.cli",
            "run",
            "spec.yaml",
            "--json",
            "--database-url",
            url,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    study = json.loads(run.stdout.strip().splitlines()[-1])["studies"][0]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "caviar.service.cli",
            "dashboard",
            "--port",
            str(port),
            "--database-url",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/api/studies", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.3)
        home = render(f"{base}/dashboard", tmp_path / "profile-home")
        assert study in home
        trials = render(f"{base}/dashboard/studies/1/trials", tmp_path / "profile-trials")
        shown = {f"Trial {n}" for n in range(5) if f"Trial {n}" in trials}
        assert len(shown) == 5, trials[:2000]
        assert "one_minus_momentum" in trials
    finally:
        dashboard.terminate()
        output = dashboard.communicate(timeout=20)[0]
    assert "127.0.0.1" in output and "only this machine" in output
