"""The `caviar` command line."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Search spec, YAML or JSON.")],
    database_url: DatabaseOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Make the last line of stdout a JSON summary.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write a self-contained HTML report here.")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Trials asked and trained at once.")] = 32,
) -> None:
    """Run a whole search in this process: progress, best trials, then the test figures."""
    from db.storage import optuna_storage
    from search.runner import run_search
    from search.spec import SpecError, load_spec
    from service.settings import get_settings

    console = Console(stderr=json_output)
    try:
        spec = load_spec(spec_path)
    except (SpecError, OSError) as error:
        _fail(console, f"{spec_path}: {error}")
    _quiet_optuna()
    storage = optuna_storage(database_url or get_settings().database_url)
    interrupted = _interrupt_flag(console)

    with _SearchProgress(console, spec) as progress:
        try:
            result = run_search(
                spec,
                storage,
                batch=batch,
                should_stop=interrupted,
                on_trial=progress.trial_done,
                on_stage=progress.stage_started,
                on_epoch=progress.tick,
            )
        except (SpecError, ValueError) as error:
            _fail(console, str(error))

    _print_best_trials(console, spec, storage, result)
    if report is not None:
        from search.report import write_report

        write_report(str(report), spec, storage, result)
        console.print(f"report written to {report}")
    if json_output:
        print(json.dumps(result.summary()))


class _SearchProgress:
    """A live bar: trials done of the budget, stage, best so far, trials per minute."""

    def __init__(self, console: Console, spec) -> None:
        self.spec = spec
        self.best: float | None = None
        self.maximize = spec.objective is None or spec.objective.direction == "maximize"
        self.started = time.monotonic()
        self.done = 0
        self.stage = 1
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task(spec.name, total=spec.budget.trials, status="")

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
        if outcome.value is not None and (
            self.best is None or (outcome.value > self.best) == self.maximize
        ):
            self.best = outcome.value
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

    from search.report import trials_of
    from search.runner import shown_params
    from search.space import engine_params
    from search.studies import stage_space

    best = result.best
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    console.print(f"search [bold]{result.search_id}[/bold]: {counts}")
    if best is None:
        console.print("[red]no trial completed[/red]")
        return
    metric = next(k for k in best if k.startswith("dev_"))
    complete = [t for t in trials_of(storage, result) if t.state == TrialState.COMPLETE]
    complete.sort(key=lambda t: t.value, reverse=metric not in ("dev_mse", "dev_loss"))
    spaces: dict[int, Any] = {}
    table = Table(title=f"Best trials by {metric}")
    names = list(best["params"])
    for column in ("trial", "stage", metric, *names):
        table.add_column(column, justify="right")
    for trial in complete[:top]:
        stage = int(trial.user_attrs.get("stage", 1))
        if stage not in spaces:
            import optuna

            from search.studies import study_name

            study = optuna.load_study(
                study_name=study_name(result.search_id, stage), storage=storage
            )
            spaces[stage] = stage_space(study)
        params = shown_params(engine_params(trial, spaces[stage], spec.fixed), spec)
        table.add_row(
            str(trial.number),
            str(stage),
            f"{trial.value:.4f}",
            *[_fmt(params.get(n, "")) for n in names],
        )
    console.print(table)
    tests = ", ".join(f"{k} {_fmt(v)}" for k, v in best.items() if k.startswith("test_"))
    console.print(
        f"best: trial {best['trial']} (stage {best['stage']}), {metric} {best[metric]:.4f}; "
        f"refit on {spec.final_fit.replace('_', '+')}, tested once: [bold]{tests}[/bold]"
    )
    console.print(f"diagnosis: {best['diagnosis']}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _interrupt_flag(console: Console):
    """First Ctrl-C stops the search after the current epoch; the second one aborts."""
    state: dict[str, str | None] = {"reason": None}

    def handle(signum, frame) -> None:
        if state["reason"]:
            raise KeyboardInterrupt
        state["reason"] = "interrupted"
        console.print("stopping after this epoch (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, handle)
    return lambda: state["reason"]


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def _fail(console: Console, message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


if __name__ == "__main__":
    app()
