"""The trial axis sharded across several devices gives the single-device results (trials of
different shapes in one bucket), kept weights included.

Four CPU devices are simulated in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before JAX starts).
"""

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = """
import json, jax
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: compiles.append(1) if event.endswith("backend_compile_duration") else 0
)
from caviar.models.data import load_dataset
from caviar.models.placement import Placement
from caviar.models.train import Shape, TrainData, train_batch
ds = load_dataset({"name": "synthetic", "samples": 500, "features": 8, "classes": 3}, seed=2)
data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
shapes = [Shape(8, 3, (16 - 3 * (i % 3),) * (1 + i % 2), optimizer=("adam", "momentum")[i % 2],
               batch_size=32, use_dropout=True) for i in range(6)]
trials = [{"learning_rate": 10 ** (-3 + i / 3), "dropout": 0.1 * (i % 3), "seed": i}
          for i in range(6)]
compiled_by_round = []
def callback(report):
    compiled_by_round.append(len(compiles))
result = train_batch(shapes, trials, data, epochs=3, group_size=4, callback=callback)
print(json.dumps({
    "compiles_after_first_epoch": compiled_by_round[-1] - compiled_by_round[0],
    "devices": len(jax.devices()),
    "placement": Placement.local(6).devices,
    "history": [[h["dev_loss"] for h in t.history] for t in result.trials],
    "best_epochs": [t.best_epoch for t in result.trials],
    "kept": [[float(abs(leaf).sum()) for leaf in jax.tree_util.tree_leaves(
        result.trial_variables(i))] for i in range(len(trials))],
}))
"""


def run(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sharded_trials_match_single_device_results():
    one, four = run(1), run(4)
    assert (one["devices"], four["devices"], four["placement"]) == (1, 4, 4)
    # Sharded or not, an epoch program compiles once per shape, not again for epoch 2's layout.
    assert one["compiles_after_first_epoch"] == four["compiles_after_first_epoch"] == 0
    np.testing.assert_allclose(four["history"], one["history"], rtol=1e-5, atol=1e-6)
    # Each trial's kept weights are read from the shard that holds its slot.
    assert four["best_epochs"] == one["best_epochs"]
    for sharded, single in zip(four["kept"], one["kept"], strict=True):
        np.testing.assert_allclose(sharded, single, rtol=1e-5)
