"""JAX's persistent compilation cache: a restarted process does not recompile a shape."""

import json
import subprocess
import sys

SCRIPT = """
import json, sys, jax
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name))
from models.runtime import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
from models.data import load_dataset
from models.train import Shape, TrainData, train_batch
ds = load_dataset({"name": "synthetic", "samples": 300, "features": 5, "classes": 2})
data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
train_batch(Shape(5, 2, (8,), optimizer="momentum", batch_size=32), [{}, {}], data, epochs=1)
print(json.dumps({"cache_hits": sum("cache_hits" in name for name in hits),
                  "cache_misses": sum("cache_misses" in name for name in hits)}))
"""


def run(cache_dir) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restarted_process_reuses_the_compiled_programs(tmp_path):
    first, second = run(tmp_path), run(tmp_path)
    assert first["cache_hits"] == 0 and first["cache_misses"] > 0
    assert second["cache_hits"] >= first["cache_misses"] - 1 and second["cache_misses"] <= 1
