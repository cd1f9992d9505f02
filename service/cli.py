"""The `caviar` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from caviar.search.spec import SearchSpec
    from caviar.service.settings import Settings

app = typer.Typer(
    help="Caviar: hyperparameter search that trains many MLPs at once.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Caviar: hyperparameter search that trains many MLPs at once."""


DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="SQLAlchemy URL (default: $CAVIAR_DATABASE_URL)."),
]


@app.command()
def run(
    spec_path: Annotated[
        Path | None, typer.Argument(metavar="SPEC", help="Search spec, YAML or JSON.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="ID",
            help="Continue a stopped search: its finished trials are kept, the stopped ones "
            "run again.",
        ),
    ] = None,
    database_url: DatabaseOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Make the last line of stdout a JSON summary.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write a self-contained HTML report here.")
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Trials asked and trained at once [default: 32, or one compiled call's worth "
            "where that is more ($CAVIAR_GROUP_SIZE; larger on a GPU or TPU)].",
        ),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Save the refit best model here (.npz).")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also print what the engine decides: each batch's buckets (compiled, cached or "
            "new) and their padding waste.",
        ),
    ] = False,
) -> None:
    """Run a whole search in this process: its id first, progress, best trials, test figures.

    The search is stored in the database like a submitted one (owner $CAVIAR_LOCAL_OWNER), so
    `caviar report`, `caviar export` and the API see it.
    """
    from caviar.db.migrate import upgrade
    from caviar.db.storage import optuna_storage
    from caviar.search.runner import run_search, start_search, stored_spec
    from caviar.search.spec import SpecError, load_spec
    from caviar.service.limits import dataset_size_errors

    console = _console(stderr=json_output)
    settings = _settings()
    if (spec_path is None) == (resume is None):
        _fail(console, "give a SPEC to run, or --resume ID to continue a search")
    try:
        spec = load_spec(spec_path) if spec_path is not None else None
        if spec is not None and (too_big := dataset_size_errors(spec, settings)):
            raise SpecError(too_big)
    except (SpecError, OSError) as error:
        _fail(console, f"{spec_path}: {error}")
    _prepare_jax(console, settings)
    _quiet_optuna()
    if verbose:
        from rich.logging import RichHandler

        _log_caviar(RichHandler(console=console, show_path=False, markup=False))
    url = database_url or settings.database_url
    with _database(url):
        upgrade(url)
        storage = optuna_storage(url)
        try:
            search_id = resume or start_search(url, _given(spec), settings.local_owner)
            spec = stored_spec(url, search_id)
        except SpecError as error:
            _fail(console, str(error))
    typer.echo(search_id)
    interrupted = _interrupt_flag(console, search_id)

    with _SearchProgress(console, spec) as progress, _database(url):
        try:
            result = run_search(
                url,
                search_id,
                batch=batch,
                should_stop=interrupted,
                on_trial=progress.trial_done,
                on_stage=progress.stage_started,
                on_epoch=progress.tick,
            )
        except (SpecError, ValueError) as error:
            _fail(console, str(error))

    if result.status == "running":  # stopped by Ctrl-C
        counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
        console.print(f"search {search_id} stopped ({counts}); {_resume_hint(search_id)}")
        raise typer.Exit(130)
    if result.status == "cancelled":
        console.print(f"search {search_id} was cancelled")
    _print_best_trials(console, spec, storage, result)
    if model is not None and result.model is not None:
        model.write_bytes(result.model)
        console.print(f"model written to {model} (load it with caviar.models.load_model)")
    if report is not None:
        from caviar.search.report import write_report

        write_report(str(report), spec, storage, result)
        console.print(f"report written to {report}")
    if json_output:
        print(json.dumps(result.summary()))


def _resume_hint(search_id: str) -> str:
    return f"continue it with: caviar run --resume {search_id}"


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON instead of a table.")
]

db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseOption = None) -> None:
    """Apply Caviar's migrations (run once per database, not from every worker)."""
    from caviar.db.migrate import upgrade

    url = _database_url(database_url)
    with _database(url):
        upgrade(url)
    typer.echo(f"database at {_safe(url)} is current")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Name of the key, e.g. laptop.")],
    owner: Annotated[
        str | None, typer.Option(help="Owner the key acts for (default: NAME).")
    ] = None,
    database_url: DatabaseOption = None,
) -> None:
    """Create an API key; its token is printed once, last on its line, and stored only hashed."""
    from caviar.db.keys import create_key
    from caviar.db.migrate import upgrade
    from caviar.db.session import session_scope

    url = _database_url(database_url)
    with _database(url):
        upgrade(url)
        with session_scope(url) as session:
            key, token = create_key(session, owner or name, name)
            key_owner = key.owner
    typer.echo(f"key {name!r} for owner {key_owner!r} (shown once): {token}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    database_url: DatabaseOption = None,
) -> None:
    """Serve the API with uvicorn (on a database that `caviar db upgrade` brought current)."""
    import uvicorn

    from caviar.service.app import create_app

    settings = _settings()
    url = database_url or settings.database_url
    _require_upgraded(url)
    # Open event streams would hold SIGTERM off for as long as their searches run: they are
    # closed after a grace period, and their clients resume after the restart.
    uvicorn.run(
        create_app(settings.model_copy(update={"database_url": url})),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )


@app.command()
def worker(
    batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Trials claimed and trained at once [default: 32, or one compiled call's worth "
            "where that is more ($CAVIAR_GROUP_SIZE; larger on a GPU or TPU)].",
        ),
    ] = None,
    database_url: DatabaseOption = None,
    idle_sleep: Annotated[float, typer.Option(help="Seconds to wait when idle.")] = 1.0,
) -> None:
    """Train trials of every open search until stopped (SIGTERM/Ctrl-C: stop within seconds)."""
    import os
    import sys

    from caviar.db.session import claim_sole_sqlite_worker

    url = _database_url(database_url)
    _require_upgraded(url)
    with _database(url):
        claim_sole_sqlite_worker(url)
    # A worker shares its accelerators: allocate on demand, or a configured fraction per process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if fraction := os.environ.get("CAVIAR_GPU_MEMORY_FRACTION"):
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = fraction
    import jax

    from caviar.models.train import default_dispatch_ahead, default_group_size
    from caviar.search.worker import Worker

    settings = _settings()
    _prepare_jax(_console(stderr=True), settings)
    if settings.require_accelerator:
        from caviar.models.runtime import require_accelerator

        try:
            require_accelerator()
        except RuntimeError as error:
            _fail(_console(stderr=True), str(error))
    _quiet_optuna()
    log_lines = logging.StreamHandler(sys.stderr)
    log_lines.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log_caviar(log_lines)
    with _database(url):
        pool_worker = Worker(
            url,
            batch=batch,
            idle_sleep=idle_sleep,
            data_dir=settings.data_dir,
            max_attempts=settings.max_search_attempts,
        )

    def stop(signum, frame) -> None:
        pool_worker.stop_event.set()

    # Before the start-up line: whoever reads it may send SIGTERM at once.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    devices = ", ".join(map(str, jax.devices()))
    metrics = _serve_worker_metrics(settings)
    typer.echo(
        f"worker on {_safe(url)}; devices: {devices}; matmul precision: {settings.matmul_precision}"
        f"; {pool_worker.batch} trials a claim, {default_group_size()} a compiled call"
        f"; rounds {'dispatched ahead' if default_dispatch_ahead() else 'in lockstep'}"
        + (f"; metrics: {metrics}" if metrics else "")
    )
    clean = pool_worker.run_until_stopped()
    typer.echo("worker stopped" if clean else "worker stopped: the work in hand was given back")
    if not clean:  # the worker's thread is still inside a long call (generating data, compiling)
        sys.stdout.flush()
        os._exit(0)


def _serve_worker_metrics(settings: Settings) -> str | None:
    """Serve the worker's Prometheus metrics if `CAVIAR_WORKER_METRICS_PORT` is set; its URL."""
    if not settings.worker_metrics_port:
        return None
    from caviar.search.worker_metrics import serve

    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    try:
        serve(host, port)
    except OSError as error:
        _fail(_console(stderr=True), f"worker metrics on {host}:{port}: {error.strerror or error}")
    return f"http://{host}:{port}/metrics"


def _prepare_jax(console: Console, settings: Settings) -> None:
    """Before JAX starts: one device per CPU core, the matmul precision, and the persistent
    compilation cache if set."""
    from caviar.models.executables import compile_ahead_override
    from caviar.models.runtime import enable_compilation_cache, set_matmul_precision, use_every_core
    from caviar.models.train import dispatch_ahead_override, group_size_override

    try:
        use_every_core()
        group_size_override()
        dispatch_ahead_override()
        compile_ahead_override()
    except ValueError as error:  # a bad CAVIAR_CPU_DEVICES, _GROUP_SIZE, _DISPATCH_AHEAD, ...
        _fail(console, str(error))
    set_matmul_precision(settings.matmul_precision)
    if settings.compile_cache:
        enable_compilation_cache(settings.compile_cache)


@app.command()
def submit(spec_path: Annotated[Path, typer.Argument(metavar="SPEC")]) -> None:
    """Submit a search to the API; prints its id."""
    from caviar.search.spec import SpecError, load_spec

    console = _console()
    try:
        spec = load_spec(spec_path)
    except (SpecError, OSError) as error:
        _fail(console, f"{spec_path}: {error}")
    response = _call(
        console, "POST", "/v1/searches", json=spec.model_dump(mode="json", exclude_none=True)
    )
    typer.echo(response.json()["id"])


@app.command()
def status(search_id: str, as_json: JsonOption = False) -> None:
    """Status, progress and best trial of a search."""
    console = _console()
    data = _call(console, "GET", f"/v1/searches/{_id(search_id)}").json()
    if as_json:
        typer.echo(json.dumps(data))
        return
    p = data["progress"]
    console.print(
        f"{data['id']}: {data['status']}, stage {data['stage']}; {p['complete']} complete, "
        f"{p['pruned']} pruned, {p['failed']} failed, {p['running']} running of {p['total']}"
    )
    if data.get("best"):
        console.print_json(data=data["best"])
    if data.get("error"):
        console.print(f"[red]error:[/red] {data['error']}")


@app.command()
def watch(search_id: str) -> None:
    """Follow a search live (progress bar fed by its event stream) until it ends.

    A restarted API is reconnected to, and the stream carries on where it broke.
    """
    from caviar.service.client import ApiError

    console = _console()
    total = _call(console, "GET", f"/v1/searches/{_id(search_id)}").json()["progress"]["total"]
    bar = _progress_bar(console)
    done, trials = None, 0
    with bar:
        task = bar.add_task(search_id, total=total, status="")
        try:
            stream = _client().events(
                search_id, on_retry=lambda reason: bar.update(task, status=reason)
            )
            for event, data in stream:
                if event == "trial":
                    trials += 1
                    bar.update(
                        task, advance=1, status=f"stage {data['stage']} · last {data['state']}"
                    )
                elif event == "stage":
                    bar.update(task, status=f"stage {data['stage']}")
                elif event == "done":
                    done = data
        except ApiError as error:
            _fail(console, str(error))
    ended = done["status"] if done else "stream ended"
    console.print(f"search {search_id}: {ended} ({trials} trials finished)")
    if done and done.get("best"):
        console.print_json(data=done["best"])


@app.command()
def report(
    search_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = Path(
        "caviar-report.html"
    ),
) -> None:
    """Download a search's HTML report."""
    console = _console()
    _write(console, output, _call(console, "GET", f"/v1/searches/{_id(search_id)}/report").content)
    typer.echo(f"report written to {output}")


@app.command()
def export(search_id: str, path: Annotated[Path, typer.Argument(metavar="PATH")]) -> None:
    """Save the best model of a completed search (load it with caviar.models.load_model)."""
    console = _console()
    _write(console, path, _call(console, "GET", f"/v1/searches/{_id(search_id)}/model").content)
    typer.echo(f"model written to {path}")


@app.command("list")
def list_searches(
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Searches per page.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Your searches, newest first."""
    console = _console()
    page = _call(console, "GET", "/v1/searches", params={"offset": offset, "limit": limit}).json()
    if as_json:
        typer.echo(json.dumps(page))
        return
    rows = [
        [s["id"], s["name"], s["status"], s["stage"], _best_value(s), s["created_at"][:19]]
        for s in page["items"]
    ]
    _print_table(console, ["id", "name", "status", "stage", "best", "created"], rows)
    shown = f"{offset + 1}-{offset + len(rows)}" if rows else "none"
    console.print(f"{shown} of {page['total']}")


@app.command()
def cancel(search_id: str, as_json: JsonOption = False) -> None:
    """Cancel a queued or running search; workers stop its trials within an epoch."""
    console = _console()
    data = _call(console, "POST", f"/v1/searches/{_id(search_id)}/cancel").json()
    typer.echo(json.dumps(data) if as_json else f"{data['id']}: {data['status']}")


@app.command()
def trials(search_id: str, as_json: JsonOption = False) -> None:
    """Every trial of a search: stage, state, value and parameters (β as β)."""
    console = _console()
    items = _call(console, "GET", f"/v1/searches/{_id(search_id)}/trials").json()["items"]
    if as_json:
        typer.echo(json.dumps(items))
        return
    names = sorted({name for trial in items for name in trial["params"]})
    rows = [
        [t["stage"], t["number"], t["state"], _fmt(t["value"]) if t["value"] is not None else ""]
        + [_fmt(t["params"][name]) if name in t["params"] else "" for name in names]
        for t in items
    ]
    _print_table(console, ["stage", "trial", "state", "value", *names], rows)


datasets_app = typer.Typer(help="Datasets uploaded to the API.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="A .npz (x, y) or .csv file.")],
    target: Annotated[str | None, typer.Option(help="Target column of a .csv file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset; prints its id (name it in a spec as `dataset: {id: ...}`)."""
    console = _console()
    try:
        content = path.read_bytes()
    except OSError as error:
        _fail(console, f"{path}: {error.strerror or error}")
    form = {"target": target} if target else {}
    response = _call(
        console, "POST", "/v1/datasets", files={"file": (path.name, content)}, data=form
    )
    data = response.json()
    typer.echo(json.dumps(data) if as_json else data["id"])


@datasets_app.command("list")
def datasets_list(as_json: JsonOption = False) -> None:
    """Your datasets, newest first."""
    console = _console()
    items = _call(console, "GET", "/v1/datasets").json()["items"]
    if as_json:
        typer.echo(json.dumps(items))
        return
    rows = [
        [d["id"], d["name"], d["format"], d["rows"], d["columns"], d["target"] or "", d["size"]]
        for d in items
    ]
    _print_table(console, ["id", "name", "format", "rows", "columns", "target", "bytes"], rows)


@datasets_app.command("delete")
def datasets_delete(dataset_id: str) -> None:
    """Delete a dataset that no queued or running search uses."""
    _call(_console(), "DELETE", f"/v1/datasets/{_id(dataset_id)}")
    typer.echo(f"{dataset_id}: deleted")


def _print_table(console: Console, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def _best_value(search: dict[str, Any]) -> str:
    """The best trial's dev metric, e.g. `dev_accuracy 0.912`; empty until the search ends."""
    best = search.get("best") or {}
    figures = [(k, v) for k, v in best.items() if k.startswith("dev_") and v is not None]
    return " ".join(f"{k} {_fmt(v)}" for k, v in figures[:1])


@app.command()
def dashboard(
    host: Annotated[
        str, typer.Option(help="Address to bind; the dashboard has no login.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    database_url: DatabaseOption = None,
) -> None:
    """Start the Optuna dashboard on Caviar's database."""
    import os
    import shutil
    import sys

    from caviar.db.storage import normalise_url

    url = normalise_url(_database_url(database_url))
    exposure = (
        "only this machine can reach it"
        if host in ("127.0.0.1", "localhost")
        else ("WARNING: it has no authentication and anyone who can reach this address can read it")
    )
    typer.echo(f"Optuna dashboard on http://{host}:{port} ({exposure})")
    beside = Path(sys.executable).with_name("optuna-dashboard")
    program = str(beside) if beside.exists() else shutil.which("optuna-dashboard")
    if program is None:
        _fail(_console(), "optuna-dashboard is not installed")
    sys.stdout.flush()
    # Become the dashboard process, so that signals (Ctrl-C, SIGTERM) reach it directly.
    os.execv(program, [program, url, "--host", host, "--port", str(port)])


def _database_url(option: str | None) -> str:
    return option or _settings().database_url


def _require_upgraded(url: str) -> None:
    """Refuse, in one line, a database that `caviar db upgrade` has not brought current."""
    from caviar.db.migrate import require_current

    with _database(url):
        require_current(url)


@contextlib.contextmanager
def _database(url: str) -> Iterator[None]:
    """Exit with code 2 and one line, not a traceback, where the database at `url` fails inside
    (a wrong URL, unreachable, not upgraded)."""
    from caviar.db.session import DatabaseError, database_errors

    try:
        with database_errors(url):
            yield
    except DatabaseError as error:
        _fail(_console(stderr=True), str(error))


def _safe(url: str) -> str:
    from caviar.db.session import display_url

    return display_url(url)


def _settings() -> Settings:
    """The settings from the environment; a bad `CAVIAR_*` value is a one-line error."""
    from pydantic import ValidationError

    from caviar.service.settings import get_settings

    try:
        return get_settings()
    except ValidationError as error:
        problems = "; ".join(
            f"CAVIAR_{'_'.join(map(str, issue['loc'])).upper()}: {issue['msg']}"
            for issue in error.errors()
        )
        _fail(_console(), problems)


def _id(value: str) -> str:
    """A search or dataset id as one segment of an API path; an empty one is a clear error."""
    from urllib.parse import quote

    if not value:
        _fail(_console(), "the id is empty: give a search or dataset id")
    return quote(value, safe="")


def _write(console: Console, path: Path, content: bytes) -> None:
    """Write a downloaded file; a path that cannot be written is a one-line error."""
    try:
        path.write_bytes(content)
    except OSError as error:
        _fail(console, f"cannot write {path}: {error.strerror or error}")


def _client():
    from caviar.service.client import Client

    settings = _settings()
    return Client(settings.api_url, settings.token)


def _call(console: Console, method: str, path: str, **kwargs):
    from caviar.service.client import ApiError

    try:
        return _client().request(method, path, **kwargs)
    except ApiError as error:
        _fail(console, str(error))


class _SearchProgress:
    """A live bar: trials done of the budget, stage, best so far, trials per minute."""

    def __init__(self, console: Console, spec) -> None:
        self.spec = spec
        self.best: float | None = None
        self.started = time.monotonic()
        self.done = 0
        self.stage = 1
        self.bar = _progress_bar(console)
        #: With a trial-epoch budget the bar counts trial-epochs: the trials are the outcome.
        self.by_epochs = spec.budget.trial_epochs is not None
        total = spec.budget.trial_epochs if self.by_epochs else spec.budget.trials
        self.task = self.bar.add_task(spec.name, total=total, status="")

    def __enter__(self) -> _SearchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def stage_started(self, stage: int, space) -> None:
        self.stage = stage
        self._refresh()

    def trial_done(self, outcome) -> None:
        self.done += 1
        maximize = outcome.direction == "maximize"
        if outcome.value is not None and (
            self.best is None or (outcome.value > self.best) == maximize
        ):
            self.best = outcome.value
        if self.by_epochs:  # the epochs the budget counts: not those of trials run again
            self.bar.update(self.task, advance=outcome.epochs if outcome.counted else 0)
        else:
            self.bar.update(self.task, advance=1)
        self._refresh()

    def tick(self, trials) -> None:
        self._refresh()

    def _refresh(self) -> None:
        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        best = "—" if self.best is None else f"{self.best:.4g}"
        status = f"stage {self.stage} · best {best} · {self.done / minutes:.1f} trials/min"
        self.bar.update(self.task, status=status)


def _print_best_trials(console: Console, spec, storage, result, top: int = 10) -> None:
    from optuna.trial import TrialState

    from caviar.search.runner import search_trials
    from caviar.search.studies import complete_value

    best = result.best
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    console.print(f"search [bold]{result.search_id}[/bold]: {counts}")
    if best is None:
        console.print("[red]no trial completed[/red]")
        return
    objective = result.objective
    assert objective is not None, "a result with a best trial carries its objective"
    metric = objective.metric
    complete = [
        t
        for t in search_trials(storage, spec, result.studies)
        if t.trial.state == TrialState.COMPLETE
    ]
    complete.sort(key=lambda t: complete_value(t.trial), reverse=objective.direction == "maximize")
    table = Table(title=f"Best trials by {metric}")
    names = [name for name in spec.space if name in best["params"]]
    for column in ("stage", "trial", metric, *names):
        table.add_column(column, justify="right", overflow="fold")
    for stage, trial, params in complete[:top]:
        table.add_row(
            str(stage), str(trial.number), f"{trial.value:.4f}", *[_fmt(params[n]) for n in names]
        )
    console.print(table)
    if spec.fixed:
        console.print("fixed: " + ", ".join(f"{k}={_fmt(v)}" for k, v in spec.fixed.items()))
    tests = ", ".join(f"{k} {_fmt(v)}" for k, v in best.items() if k.startswith("test_"))
    console.print(
        f"best: trial {best['trial']} (stage {best['stage']}), {metric} {best[metric]:.4f}; "
        f"refit on {spec.final_fit.replace('_', '+')}, tested once: [bold]{tests}[/bold]"
    )
    console.print(f"diagnosis: {best['diagnosis']}")


def _progress_bar(console: Console) -> Progress:
    """Trials done of the budget, with a status line and the elapsed time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _console(stderr: bool = False) -> Console:
    """A console that keeps tables readable when output goes to a file or a pipe."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    return console


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _interrupt_flag(console: Console, search_id: str):
    """First Ctrl-C stops the search after the current epoch; the second one aborts."""
    state: dict[str, str | None] = {"reason": None}

    def handle(signum, frame) -> None:
        if state["reason"]:
            raise KeyboardInterrupt
        state["reason"] = "interrupted"
        hint = _resume_hint(search_id)
        console.print(f"stopping after this epoch (Ctrl-C again to abort); {hint}")

    signal.signal(signal.SIGINT, handle)
    return lambda: state["reason"]


def _log_caviar(handler: logging.Handler) -> None:
    """Send Caviar's own log records (INFO and up: each batch's buckets, the worker's events)
    to `handler`."""
    logger = logging.getLogger("caviar")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def _given(spec: SearchSpec | None) -> SearchSpec:
    """The spec of a new run (`run` has one whenever it is not resuming)."""
    assert spec is not None, "a run that does not resume has a spec"
    return spec


def _fail(console: Console, message: str) -> NoReturn:
    """Print `message` to stderr as one line (never read as markup, never wrapped); exit 2."""
    errors = console if console.stderr else _console(stderr=True)
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


if __name__ == "__main__":
    app()
