"""The `caviar` command line."""

import typer

app = typer.Typer(help="Caviar: hyperparameter search that trains many MLPs at once.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Caviar: hyperparameter search that trains many MLPs at once."""
