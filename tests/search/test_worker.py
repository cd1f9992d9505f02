"""The worker loop on a real database: claims, stages, the end of a search, cancellation."""

import threading
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import select, text

from caviar.db.migrate import upgrade
from caviar.db.session import lock_search, session_scope
from caviar.db.storage import optuna_storage
from caviar.db.tables import OPEN_STATUSES, Lease, Search, StoredModel
from caviar.models.data import load_dataset
from caviar.models.export import load_model
from caviar.search.spec import parse_spec
from caviar.search.worker import Worker
from caviar.service.searches import submit_search

SPEC = """
name: pool
dataset: {name: synthetic, samples: 400, features: 6, classes: 3}
budget: {trials: 7, epochs: 3}
space:
  learning_rate: {low: 1.0e-3, high: 0.3, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
fixed: {optimizer: momentum, batch_size: 32, hidden_units: 8, hidden_layers: 1}
stages: [{trials: 4}, {trials: 3}]
"""


@pytest.fixture
def url(database_url):
    upgrade(database_url)
    return database_url


def queue(url, text=SPEC, owner="alice"):
    with session_scope(url) as session:
        search, _ = submit_search(
            session, owner, parse_spec(text), idempotency_key=None, max_concurrent=10
        )
        return search.id


def trials_of(url, studies):
    storage = optuna_storage(url)  # cached: one pool for the test's reads
    return [
        t for name in studies for t in optuna.load_study(study_name=name, storage=storage).trials
    ]


def test_a_worker_runs_a_queued_search_to_its_end(url):
    search_id = queue(url)
    Worker(url, batch=3).run(until_idle=True)
    with session_scope(url) as session:
        search = session.get_one(Search, search_id)
        assert search.status == "completed", search.error
        assert search.stage == 2
        assert search.studies == [f"caviar/{search_id}/stage-{n}" for n in (1, 2)]
        best, studies = search.best, search.studies
        content = session.get_one(StoredModel, search_id).content
    trials = trials_of(url, studies)
    assert len(trials) == 7  # exactly the budget, batches of 3 notwithstanding
    assert [t.user_attrs["stage"] for t in trials].count(2) == 3
    assert best is not None
    assert 0 <= best["test_accuracy"] <= 1 and "dev_accuracy" in best
    # The stored model predicts like the search measured, on the same (re-made) test split.
    ds = load_dataset({"name": "synthetic", "samples": 400, "features": 6, "classes": 3})
    model = load_model(content)
    raw_test = ds.x_test * ds.feature_std + ds.feature_mean
    accuracy = float(np.mean(model.predict(raw_test) == ds.y_test))
    assert accuracy == pytest.approx(best["test_accuracy"], abs=1e-6)


def test_cancelled_search_is_not_worked_on(url):
    search_id = queue(url)
    with session_scope(url) as session:
        search = session.get_one(Search, search_id)
        search.cancel_requested, search.status = True, "cancelled"
    Worker(url).run(until_idle=True)
    with session_scope(url) as session:
        assert session.get_one(Search, search_id).studies == []


def with_dataset(dataset: str) -> str:
    return SPEC.replace("{name: synthetic, samples: 400, features: 6, classes: 3}", dataset)


def queue_unchecked(url, spec: dict, owner="alice") -> str:
    """A search whose stored spec was never validated (as an older Caviar may have stored it)."""
    from caviar.search.runner import new_search_id

    with session_scope(url) as session:
        search = Search(id=new_search_id("raw"), owner=owner, name="raw", spec=spec)
        session.add(search)
        return search.id


def errors_of(url, *search_ids) -> list[tuple[str, str | None]]:
    with session_scope(url) as session:
        return [(s.status, s.error) for s in map(lambda i: session.get_one(Search, i), search_ids)]


def test_a_search_reads_files_only_inside_the_workers_data_directory(url, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.csv").write_text("password,label\nhunter2,1\n" * 20)
    (tmp_path / "secret.csv").write_text("password,label\nhunter2,1\n" * 20)
    bad = queue(url, with_dataset("{path: bad.csv, target: nope}"))
    outside = queue(url, with_dataset("{path: ../secret.csv, target: label}"))
    missing = queue(url, with_dataset("{path: ../missing.csv, target: label}"))
    Worker(url, data_dir=str(data)).run(until_idle=True)
    (bad_status, bad_error), *refused = errors_of(url, bad, outside, missing)
    assert bad_error is not None
    assert bad_status == "failed" and "dataset.path 'bad.csv'" in bad_error
    assert refused[0] == refused[1]  # a file outside exists or not: the same answer
    refused_error = refused[0][1]
    assert refused_error is not None
    assert refused[0][0] == "failed" and "inside the data directory" in refused_error
    for _, error in (bad_status, bad_error), *refused:
        assert error is not None
        assert "password" not in error and "hunter2" not in error


def test_without_a_data_directory_a_worker_reads_no_file(url, tmp_path):
    (tmp_path / "secret.csv").write_text("password,label\nhunter2,1\n" * 20)
    search_id = queue(url, with_dataset(f"{{path: {tmp_path / 'secret.csv'}, target: label}}"))
    Worker(url).run(until_idle=True)
    ((status, error),) = errors_of(url, search_id)
    assert error is not None
    assert status == "failed" and "dataset.path" in error and "hunter2" not in error


def test_diverging_trials_fail_and_the_search_still_completes(url):
    search_id = queue(
        url,
        SPEC.replace(
            "{low: 1.0e-3, high: 0.3, scale: log}", "{low: 10.0, high: 1.0e4, scale: log}"
        ).replace("stages: [{trials: 4}, {trials: 3}]", ""),
    )
    Worker(url).run(until_idle=True)
    with session_scope(url) as session:
        search = session.get_one(Search, search_id)
        studies, status = search.studies, search.status
    trials = trials_of(url, studies)
    assert len(trials) == 7
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs["reason"] == "diverged" for t in failed)
    assert status in ("completed", "failed")  # failed only if every trial diverged


def test_out_of_memory_errors_are_recognised():
    import jax

    from caviar.search.trials import is_out_of_memory

    assert is_out_of_memory(
        jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    )
    assert is_out_of_memory(MemoryError())
    # As CUDA, cuBLAS, cuDNN and XLA's allocator word it on GPU hosts.
    for message in (
        "INTERNAL: CUDA_ERROR_OUT_OF_MEMORY: out of memory",
        "INTERNAL: cuBLAS status: CUBLAS_STATUS_ALLOC_FAILED",
        "UNKNOWN: CUDNN_STATUS_ALLOC_FAILED in external/xla/xla/stream_executor/cuda/cuda_dnn.cc",
        "INTERNAL: Failed to allocate 1073741824 bytes for new constant",
    ):
        assert is_out_of_memory(jax.errors.JaxRuntimeError(message)), message
    assert not is_out_of_memory(ValueError("batch_size 4096 exceeds the 300 training examples"))


def store_csv(url, dataset_id: str, owner: str, content: bytes) -> None:
    """An uploaded CSV dataset (target column `label`), as the API stores it."""
    import hashlib

    from caviar.db.tables import StoredDataset

    lines = content.decode().strip().splitlines()
    with session_scope(url) as session:
        session.add(
            StoredDataset(
                id=dataset_id,
                owner=owner,
                name="d.csv",
                format="csv",
                target="label",
                rows=len(lines) - 1,
                columns=lines[0].count(","),
                size=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                content=content,
            )
        )


def test_a_search_on_an_uploaded_dataset_reads_it_from_the_database(url):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    labels = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    rows = "\n".join(
        f"{a:.4f},{b:.4f},{c:.4f},{d:.4f},{y}" for (a, b, c, d), y in zip(x, labels, strict=True)
    )
    store_csv(url, "ds-1", "alice", ("a,b,c,d,label\n" + rows + "\n").encode())
    spec = """
name: uploaded
dataset: {id: ds-1}
budget: {trials: 2, epochs: 30}
space: {learning_rate: {low: 1.0e-2, high: 3.0e-2, scale: log}}
fixed: {optimizer: adam, batch_size: 32, hidden_units: 16, hidden_layers: 1}
"""
    search_id = queue(url, spec)
    Worker(url).run(until_idle=True)
    with session_scope(url) as session:
        search = session.get_one(Search, search_id)
        assert search.status == "completed", search.error
        assert search.best is not None
        assert search.best["test_accuracy"] > 0.8  # a linearly separable task


def test_another_owners_dataset_is_not_found(url):
    store_csv(url, "ds-2", "bob", b"a,label\n" + b"1,0\n2,1\n" * 20)
    spec = SPEC.replace("{name: synthetic, samples: 400, features: 6, classes: 3}", "{id: ds-2}")
    search_id = queue(url, spec, owner="alice")
    Worker(url).run(until_idle=True)
    with session_scope(url) as session:
        search = session.get_one(Search, search_id)
        assert search.error is not None
        assert search.status == "failed" and "ds-2" in search.error


def test_the_largest_seed_runs_on_a_worker(url):
    # The stage sampler's seed is derived from the spec seed, the stage and the trials it holds;
    # it used to overflow NumPy's 32-bit seeds for spec seeds from about 2148, killing workers.
    search_id = queue(url, SPEC + "seed: 4294967295\n")
    Worker(url, batch=4).run(until_idle=True)
    with session_scope(url) as session:
        search = session.get_one(Search, search_id)
        assert search.status == "completed", search.error


def test_a_search_that_cannot_be_loaded_fails_alone(url):
    spec = parse_spec(SPEC).model_dump(mode="json", exclude_none=True)
    poisoned = queue_unchecked(url, {**spec, "seed": 2**40}, owner="alice")
    healthy = queue(url, owner="bob")
    Worker(url, batch=4).run(until_idle=True)
    (poison_status, poison_error), (healthy_status, healthy_error) = errors_of(
        url, poisoned, healthy
    )
    assert poison_error is not None
    assert poison_status == "failed" and poison_error.startswith("could not load the dataset")
    assert "seed" in poison_error
    assert healthy_status == "completed", healthy_error


def test_a_search_whose_sampler_this_worker_lacks_fails_alone_and_the_worker_goes_on(url):
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("PyTorch is installed here: the gp sampler runs")
    gp = queue(url, SPEC + "sampler: gp\n", owner="alice")
    healthy = queue(url, owner="bob")
    Worker(url, batch=4).run(until_idle=True)
    (gp_status, gp_error), (healthy_status, healthy_error) = errors_of(url, gp, healthy)
    assert gp_status == "failed"
    assert gp_error == (
        "could not start the search: sampler: the gp sampler needs PyTorch: "
        "pip install 'caviar[gp]'"
    )
    assert healthy_status == "completed", healthy_error


def test_a_search_whose_workers_keep_dying_fails_after_the_attempt_limit(url):
    from datetime import timedelta

    from caviar.db.storage import GRACE_PERIOD_S
    from caviar.db.tables import utcnow

    search_id = queue(url)
    for attempt in range(2):  # two workers died while loading it: their leases went stale
        with session_scope(url) as session:
            stale = utcnow() - timedelta(seconds=GRACE_PERIOD_S + 1)
            session.add(Lease(search_id=search_id, worker=f"dead-{attempt}", phase="load"))
            session.flush()
            session.get_one(Lease, (search_id, f"dead-{attempt}")).heartbeat_at = stale
        worker = Worker(url, max_attempts=2)
        if attempt == 0:  # one death is under the limit: the search goes on
            worker.step()
            with session_scope(url) as session:
                assert session.get_one(Search, search_id).attempts == 1
                assert session.get_one(Search, search_id).status in OPEN_STATUSES
    worker.run(until_idle=True)
    ((status, error),) = errors_of(url, search_id)
    assert status == "failed"
    assert error == "2 worker attempts failed; the last: a worker died while loading its dataset"


def cancel_while(url: str, search_id: str, phase: str, work) -> None:
    """Run `work` on a thread; once a worker holds the search's `phase` lease, cancel the search
    as `POST /cancel` does, which must not wait for the worker's lock."""
    worker = threading.Thread(target=work)
    worker.start()
    leases = select(Lease).where(Lease.search_id == search_id)
    try:
        deadline = time.monotonic() + 120
        while True:
            with session_scope(url) as session:
                if session.scalars(leases.where(Lease.phase == phase)).first() is not None:
                    break
            assert time.monotonic() < deadline, f"no worker ever held a {phase} lease"
            time.sleep(0.02)
        with session_scope(url) as session:
            session.execute(text("SET LOCAL lock_timeout = '2s'"))
            search = lock_search(session, search_id)
            assert search is not None
            search.cancel_requested, search.status = True, "cancelled"
        assert worker.is_alive(), f"the worker should still be in its {phase} phase"
    finally:
        worker.join(180)
    with session_scope(url) as session:
        assert session.get_one(Search, search_id).status == "cancelled"
        assert session.scalars(leases).first() is None


def test_no_lock_is_held_while_a_dataset_loads(postgres_url):
    upgrade(postgres_url)
    slow = queue(postgres_url, with_dataset("{name: mnist1d, samples: 8000}"))  # seconds to make
    cancel_while(postgres_url, slow, "load", Worker(postgres_url).step)


def test_no_lock_is_held_during_the_final_fit_and_a_cancel_then_wins(postgres_url):
    upgrade(postgres_url)
    spec = with_dataset("{name: synthetic, samples: 20000, features: 20, classes: 3}")
    spec = spec.replace("stages: [{trials: 4}, {trials: 3}]", "final_fit: train_dev")
    spec = spec.replace("hidden_units: 8", "hidden_units: 256").replace("trials: 7", "trials: 2")
    search_id = queue(postgres_url, spec)
    worker = Worker(postgres_url, batch=2)
    cancel_while(postgres_url, search_id, "finish", lambda: worker.run(until_idle=True))
    with session_scope(postgres_url) as session:
        assert session.get(StoredModel, search_id) is None
