"""The command line reaches what the API does: list, cancel, trials, datasets; --json on reads."""

import json
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_service import caviar, service, start
else:
    from test_service import caviar, service, start  # noqa: F401  (service is a fixture)

CSV = "a,b,label\n" + "".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(200))
SPEC = """
name: {name}
dataset: {{id: {dataset}}}
budget: {{trials: 3, epochs: 2}}
space:
  learning_rate: {{low: 1.0e-3, high: 0.3, scale: log}}
  momentum: {{low: 0.9, high: 0.999, scale: one_minus_log}}
fixed: {{optimizer: momentum, batch_size: 32, hidden_units: 8, hidden_layers: 1}}
"""


def read_json(*args, env):
    return json.loads(caviar(*args, "--json", env=env).stdout)


def test_datasets_searches_trials_and_cancel_from_the_command_line(service):
    env, tmp = service
    (tmp / "data.csv").write_text(CSV)
    dataset = caviar("datasets", "upload", str(tmp / "data.csv"), "--target", "label", env=env)
    dataset_id = dataset.stdout.strip()
    listed = read_json("datasets", "list", env=env)
    assert [(d["id"], d["rows"], d["columns"]) for d in listed] == [(dataset_id, 200, 2)]
    assert dataset_id in caviar("datasets", "list", env=env).stdout  # the table

    for name in ("trained", "queued"):
        (tmp / f"{name}.yaml").write_text(SPEC.format(name=name, dataset=dataset_id))
    trained = caviar("submit", str(tmp / "trained.yaml"), env=env).stdout.strip()
    worker = start("worker", "--batch", "3", env=env)
    try:
        caviar("watch", trained, env=env, timeout=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    queued = caviar("submit", str(tmp / "queued.yaml"), env=env).stdout.strip()

    page = read_json("list", env=env)
    assert [s["id"] for s in page["items"]] == [queued, trials_id := trained]
    assert [s["status"] for s in page["items"]] == ["queued", "completed"]
    table = caviar("list", env=env).stdout
    assert trials_id in table and "completed" in table and "dev_accuracy" in table

    trials = read_json("trials", trained, env=env)
    assert len(trials) == 3 and {t["state"] for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert all(0.9 <= t["params"]["momentum"] < 1 for t in trials)  # β shown as β
    table = caviar("trials", trained, env=env).stdout
    assert "learning_rate" in table and "momentum" in table

    assert caviar("cancel", queued, env=env).stdout.strip() == f"{queued}: cancelled"
    assert read_json("status", queued, env=env)["status"] == "cancelled"
    again = caviar("cancel", queued, env=env, check=False)
    assert again.returncode == 2 and "already cancelled" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1

    in_use = caviar("datasets", "delete", "ds-missing", env=env, check=False)
    assert in_use.returncode == 2 and "not found" in in_use.stderr
    assert caviar("datasets", "delete", dataset_id, env=env).stdout.strip().endswith("deleted")
    assert read_json("datasets", "list", env=env) == []
