"""A self-contained HTML report of a search: history by stage, scales, coordinates, importances."""

from __future__ import annotations

import html
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState

from search.runner import SearchResult, search_trials
from search.spec import SearchSpec


def write_report(
    path: str, spec: SearchSpec, storage: optuna.storages.BaseStorage, result: SearchResult
) -> None:
    """Write the report of a finished search to `path` (plotly.js embedded, no network needed)."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(render_report(spec, storage, result))


def render_report(
    spec: SearchSpec, storage: optuna.storages.BaseStorage, result: SearchResult
) -> str:
    """The report as one HTML document."""
    rows = _rows(spec, storage, result)
    metric = next(iter(k for k in (result.best or {}) if k.startswith("dev_")), "value")
    figures = [
        _history(rows, metric),
        *[
            _scatter(rows, name, metric)
            for name in ("learning_rate", "momentum", "beta2")
            if any(name in r["params"] for r in rows) and name in spec.space
        ],
        _parallel(rows, spec, metric),
        _importances(storage, result),
    ]
    parts = []
    for i, figure in enumerate(f for f in figures if f is not None):
        parts.append(figure.to_html(full_html=False, include_plotlyjs=i == 0))
    best = result.best or {}
    summary = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in {
            **{k: v for k, v in best.items() if k != "params"},
            **best.get("params", {}),
            **result.counts,
        }.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Caviar report: {html.escape(result.search_id)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 12px;text-align:left}"
        "</style></head><body>"
        f"<h1>Search {html.escape(result.search_id)}</h1>"
        f"<h2>Best trial</h2><table>{summary}</table>" + "".join(parts) + "</body></html>"
    )


def _rows(spec: SearchSpec, storage, result: SearchResult) -> list[dict[str, Any]]:
    complete = [
        t
        for t in search_trials(storage, spec, result.studies)
        if t.trial.state == TrialState.COMPLETE
    ]
    complete.sort(key=lambda t: t.trial.datetime_start)
    return [
        {"number": t.trial.number, "stage": t.stage, "value": t.trial.value, "params": t.params}
        for t in complete
    ]


def _history(rows, metric) -> go.Figure:
    figure = go.Figure()
    for stage in sorted({r["stage"] for r in rows}):
        mine = [(i, r) for i, r in enumerate(rows) if r["stage"] == stage]
        figure.add_scatter(
            x=[i for i, _ in mine],
            y=[r["value"] for _, r in mine],
            mode="markers",
            name=f"stage {stage}",
        )
    return figure.update_layout(
        title="Optimization history by stage",
        xaxis_title="trial (in order of start)",
        yaxis_title=metric,
    )


def _scatter(rows, name, metric) -> go.Figure:
    figure = go.Figure()
    if name == "learning_rate":
        x, title = [r["params"][name] for r in rows], "learning rate α (log axis)"
    else:  # β, shown on a 1-β log axis: equal distances mean equal changes of averaging window
        x, title = [1 - r["params"][name] for r in rows], f"1 - {name} (log axis)"
    figure.add_scatter(
        x=x,
        y=[r["value"] for r in rows],
        mode="markers",
        marker={"color": [r["stage"] for r in rows], "colorscale": "Viridis"},
        text=[f"trial {r['number']}" for r in rows],
    )
    figure.update_xaxes(type="log", title=title)
    return figure.update_layout(title=f"{metric} against {name}", yaxis_title=metric)


def _parallel(rows, spec: SearchSpec, metric) -> go.Figure | None:
    numeric = [n for n, p in spec.space.items() if not hasattr(p, "choices")]
    if not rows or not numeric:
        return None
    dimensions = [{"label": n, "values": [r["params"][n] for r in rows]} for n in numeric]
    dimensions.append({"label": metric, "values": [r["value"] for r in rows]})
    figure = go.Figure(
        go.Parcoords(dimensions=dimensions, line={"color": [r["value"] for r in rows]})
    )
    return figure.update_layout(title="Parallel coordinates")


def _importances(storage, result: SearchResult) -> go.Figure | None:
    # The first stage samples the full ranges at random: the fairest ground for importances.
    study = optuna.load_study(study_name=result.studies[0], storage=storage)
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return None
    if not importances:
        return None
    figure = go.Figure(go.Bar(x=list(importances.values()), y=list(importances), orientation="h"))
    return figure.update_layout(title="Parameter importances (stage 1, fANOVA)")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
