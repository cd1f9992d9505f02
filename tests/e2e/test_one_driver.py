"""One search driver: a spec run with `caviar run` and the same spec submitted to `caviar serve`
and trained by one `caviar worker`, on the same seed, give the same trials, parameters and
values; and the service sees the run like any search it was given. Real processes, PostgreSQL."""

import os
import signal
from typing import TYPE_CHECKING

import httpx

from caviar.models.export import load_model

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_fault_tolerance import wait_until
    from tests.e2e.test_service import caviar, free_port, start, wait_for
else:
    from test_fault_tolerance import wait_until
    from test_service import caviar, free_port, start, wait_for

SPEC = """
name: one-driver
dataset: {name: synthetic, samples: 400, features: 6, classes: 3}
budget: {epochs: 4}
seed: 7
space:
  learning_rate: {low: 1.0e-3, high: 0.3, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
  hidden_units: {low: 4, high: 16, type: int}
fixed: {optimizer: momentum, batch_size: 32, hidden_layers: 1}
stages: [{trials: 5}, {trials: 3, keep_top: 0.4}]
"""


def trials(api: httpx.Client, search_id: str) -> list[tuple]:
    items = api.get(f"/v1/searches/{search_id}/trials").json()["items"]
    return sorted((t["stage"], t["number"], t["state"], t["params"], t["value"]) for t in items)


def test_caviar_run_and_a_worker_drive_a_search_the_same_way(tmp_path, postgres_url):
    port = free_port()
    env = {
        **os.environ,
        "CAVIAR_DATABASE_URL": postgres_url,
        "CAVIAR_API_URL": f"http://127.0.0.1:{port}",
    }
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    ran = caviar("run", str(spec), "--batch", "3", env=env).stdout.splitlines()[0]

    token = caviar("keys", "create", "local", env=env).stdout.split()[-1]
    env["CAVIAR_TOKEN"] = token  # the key of owner `local`, who owns what `caviar run` starts
    server = start("serve", "--port", str(port), env=env)
    worker = None
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        api = httpx.Client(
            base_url=env["CAVIAR_API_URL"],
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        submitted = caviar("submit", str(spec), env=env).stdout.strip()
        worker = start("worker", "--batch", "3", "--idle-sleep", "0.2", env=env)
        wait_until(
            lambda: api.get(f"/v1/searches/{submitted}").json()["status"] == "completed",
            300,
            "the worker to finish the search",
        )
        by_run, by_worker = (api.get(f"/v1/searches/{i}").json() for i in (ran, submitted))
        assert by_run["status"] == "completed" and by_run["progress"]["total"] == 8
        run_trials, worker_trials = trials(api, ran), trials(api, submitted)
        assert len(run_trials) == 8 and {t[2] for t in run_trials} <= {"COMPLETE", "PRUNED"}
        assert run_trials == worker_trials
        same = {**by_worker["best"], "study": by_run["best"]["study"]}  # named by search id
        assert by_run["best"] == same  # the same best trial, with the same test figures

        # `caviar report` and `caviar export` see the run like any other search.
        caviar("report", ran, "-o", str(tmp_path / "run.html"), env=env)
        assert "Optimization history by stage" in (tmp_path / "run.html").read_text()
        caviar("export", ran, str(tmp_path / "run.npz"), env=env)
        assert load_model(tmp_path / "run.npz").metadata["search_id"] == ran

        # The worker logged each batch's buckets and their padding waste.
        worker.send_signal(signal.SIGTERM)
        logged = worker.communicate(timeout=30)[0]
        assert "INFO caviar.search.trials: 3 trials of" in logged, logged
        assert "padding waste" in logged and "(new, ~" in logged
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        server.terminate()
        server.wait(timeout=30)
