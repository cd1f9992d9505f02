"""A self-contained HTML report of a search, read from its stage studies in the database.

Optuna's own plots (`optuna.visualization`) draw what Optuna knows: history, learning curves,
parallel coordinates, slices, importances, a contour. They are drawn on one in-memory study that
holds every stage's finished trials, in stage order, with the spec's full distributions, so the
stages show together. Caviar adds what Optuna cannot know: β on a 1-β log axis, the ranges each
coarse-to-fine stage sampled, the best trial's curves, and the bias/variance reading. plotly.js is
inlined once; the file opens without network access.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import optuna
import plotly.graph_objects as go
import plotly.offline
from optuna import visualization as ov
from optuna.trial import FrozenTrial, TrialState
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from caviar.search.final import HIGH_BIAS_ERROR
from caviar.search.refine import top_fraction
from caviar.search.runner import SearchResult, SearchTrial, search_trials
from caviar.search.space import distribution, optuna_name
from caviar.search.spec import (
    CategoricalParam,
    Direction,
    FloatParam,
    IntParam,
    Param,
    SearchSpec,
)
from caviar.search.studies import complete_value, stage_space

#: What each bias/variance reading of `search.final.diagnose` suggests doing next.
NEXT_STEP = {
    "high bias": "Underfitting: try a bigger network (more hidden units or layers), train "
    "longer, or tune the learning rate and optimizer.",
    "high variance": "Overfitting: regularise (more L2, dropout), get more data, or stop earlier.",
    "high bias and high variance": "Both: reduce bias first (bigger network, train longer), "
    "then variance (regularise, more data).",
    "low bias and low variance": "The goal: train and dev error are both low, and the test "
    "figure confirms it on data no choice was made with.",
}
_COLORS = qualitative.Plotly
_SHOWN = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class _Stage:
    number: int
    space: dict[str, Param]
    trials: list[SearchTrial]  # complete and pruned

    def complete(self) -> list[SearchTrial]:
        return [t for t in self.trials if t.trial.state == TrialState.COMPLETE]


@dataclass
class _Search:
    """A search's stages, the one study that holds all their trials, and its best trial."""

    spec: SearchSpec
    metric: str
    direction: Direction
    stages: list[_Stage]
    merged: optuna.Study
    stage_of: list[int]  # merged trial number → stage
    best: SearchTrial | None
    final: dict[str, Any]  # the best stage study's user attributes: test figures, diagnosis
    first: optuna.Study  # stage 1's trials alone: the spec's full ranges, sampled at random
    importances: dict[str, float]  # stage 1's, most important first; empty when unknown

    def complete(self) -> list[SearchTrial]:
        return [t for stage in self.stages for t in stage.complete()]


def write_report(
    path: str, spec: SearchSpec, storage: optuna.storages.BaseStorage, result: SearchResult
) -> None:
    """Write the report of a search to `path`."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(render_report(spec, storage, result))


def render_report(
    spec: SearchSpec, storage: optuna.storages.BaseStorage, result: SearchResult
) -> str:
    """The report as one HTML document, from the database alone (a running search too)."""
    search = _load(spec, storage, result)
    panels: list[tuple[str, str, str, go.Figure | None]] = [
        ("bias-variance", "Bias and variance of the best trial", _BIAS_NOTE, _bias(search)),
        ("best-curves", "The best trial's curves", _CURVES_NOTE, _best_curves(search)),
        ("history", "Optimization history by stage", _HISTORY_NOTE, _history(search)),
        ("learning-curves", "Learning curves", _LEARNING_NOTE, _learning_curves(search)),
        ("stages", "Coarse to fine: the ranges each stage sampled", _STAGES_NOTE, _ranges(search)),
        *[
            (f"beta-{name}", f"{name}: β on a 1-β log axis", _BETA_NOTE, _beta(search, name))
            for name, param in spec.space.items()
            if _one_minus(param)
        ],
        ("slices", "Slices", _SLICE_NOTE, _optuna(search, ov.plot_slice)),
        ("parallel", "Parallel coordinates", _PARALLEL_NOTE, _optuna(search, _parallel)),
        ("importances", "Parameter importances", _IMPORTANCE_NOTE, _importances(search)),
        ("contour", "The two most important parameters", _CONTOUR_NOTE, _contour(search)),
    ]
    extra = {"stages": _choices_table(search)}
    sections = [
        f"<section id='panel-{key}'><h2>{html.escape(title)}</h2><p>{note}</p>"
        + figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{key}")
        + extra.get(key, "")
        + "</section>"
        for key, title, note, figure in panels
        if figure is not None
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Caviar report: {html.escape(result.search_id)}</title>"
        f"<style>{_CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>Search {html.escape(result.search_id)}</h1>"
        f"{_summary(search, result)}{''.join(sections)}</body></html>"
    )


def _load(spec: SearchSpec, storage: optuna.storages.BaseStorage, result: SearchResult) -> _Search:
    trials = [t for t in search_trials(storage, spec, result.studies) if t.trial.state in _SHOWN]
    studies = [optuna.load_study(study_name=name, storage=storage) for name in result.studies]
    stages = [
        _Stage(n, stage_space(study), [t for t in trials if t.stage == n])
        for n, study in enumerate(studies, start=1)
    ]
    metric = studies[0].metric_names[0] if studies and studies[0].metric_names else "value"
    maximize = not studies or studies[0].direction == optuna.study.StudyDirection.MAXIMIZE
    direction: Direction = "maximize" if maximize else "minimize"
    merged = optuna.create_study(direction=direction)
    distributions = {optuna_name(n, p): distribution(p) for n, p in spec.space.items()}
    merged.add_trials([_copy(t, distributions) for t in trials])
    best_key = (result.best or {}).get("stage"), (result.best or {}).get("trial")
    best = next((t for t in trials if (t.stage, t.trial.number) == best_key), None)
    final = studies[best.stage - 1].user_attrs if best else {}
    stage_of = [t.stage for t in trials]
    first = optuna.create_study(direction=direction)
    first.add_trials(t for t, s in zip(merged.get_trials(), stage_of, strict=True) if s == 1)
    return _Search(
        spec=spec,
        metric=metric,
        direction=direction,
        stages=stages,
        merged=merged,
        stage_of=stage_of,
        best=best,
        final=final,
        first=first,
        importances=_importance(first),
    )


def _importance(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances of a study's parameters (seeded: the same on every render)."""
    try:
        return optuna.importance.get_param_importances(study, evaluator=_evaluator())
    except (RuntimeError, ValueError):  # fewer than two complete trials, or nothing varies
        return {}


def _evaluator() -> optuna.importance.FanovaImportanceEvaluator:
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def _copy(found: SearchTrial, distributions: dict[str, Any]) -> FrozenTrial:
    """A stage's trial for the merged study: the spec's distributions (a stage's narrowed range
    lies inside them), and its stage and own number among its user attributes."""
    trial = found.trial
    shown = ("best_epoch", "epochs", *(k.removeprefix("one_minus_") for k in trial.params))
    return optuna.trial.create_trial(
        state=trial.state,
        value=trial.value,
        params=trial.params,
        distributions={name: distributions[name] for name in trial.params},
        user_attrs={
            "stage": found.stage,
            "trial": trial.number,
            **{k: trial.user_attrs[k] for k in shown if k in trial.user_attrs},
        },
        intermediate_values=trial.intermediate_values,
    )


def _summary(search: _Search, result: SearchResult) -> str:
    best = result.best or {}
    rows = {
        # (the service's stored best also holds the trial counts, shown beside it)
        **{k: v for k, v in best.items() if k not in ("params", "study", "trials")},
        **best.get("params", {}),
    }
    table = _table(["best trial", ""], [[k, v] for k, v in rows.items()])
    stages = _table(
        ["stage", "complete", "pruned", f"best {search.metric}"],
        [
            [
                s.number,
                len(s.complete()),
                len(s.trials) - len(s.complete()),
                _pick(search, [complete_value(t.trial) for t in s.complete()]),
            ]
            for s in search.stages
        ],
    )
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    return (
        f"<div class='summary'>{table}<div>{stages}<p>Trials: {counts or 'none'}.</p></div></div>"
    )


def _pick(search: _Search, values: Sequence[float]) -> float | str:
    if not values:
        return "-"
    return max(values) if search.direction == "maximize" else min(values)


# --- Optuna's plots, on the merged study -------------------------------------------------------

_SLICE_NOTE = (
    "The dev metric against each parameter on the scale it is sampled on (log axes for log "
    "scales, 1-β for betas, named <code>one_minus_NAME</code> as in Optuna); colour is the order "
    "of the trials, stage by stage."
)
_PARALLEL_NOTE = (
    "Every complete trial as a line through its parameters; log-scale parameters (and 1-β) on "
    "log axes."
)
_HISTORY_NOTE = (
    "The dev metric of every complete trial, in order, coloured by stage, and the best so far."
)
_LEARNING_NOTE = (
    "The dev metric each trial reported per epoch. Dotted lines ending in × were pruned; the star "
    "on a complete trial is its best epoch, whose weights and figures it keeps (early stopping)."
)
_IMPORTANCE_NOTE = (
    "fANOVA importances from stage 1, which samples the spec's full ranges: the fairest ground "
    "(later stages sample only the best region)."
)
_CONTOUR_NOTE = "The dev metric over the two most important parameters, every stage's trials."


def _optuna(search: _Search, plot: Callable[..., go.Figure]) -> go.Figure | None:
    if not search.complete():
        return None
    return plot(search.merged, target_name=search.metric)


def _parallel(study: optuna.Study, target_name: str) -> go.Figure:
    return ov.plot_parallel_coordinate(study, target_name=target_name).update_layout(height=480)


def _history(search: _Search) -> go.Figure | None:
    figure = _optuna(search, ov.plot_optimization_history)
    if figure is None:
        return None
    points = next(t for t in figure.data if t.name == search.metric)
    stage_of = {n: search.stage_of[n] for n in points.x}
    for stage in search.stages:
        mine = [i for i, n in enumerate(points.x) if stage_of[n] == stage.number]
        figure.add_scatter(
            x=[points.x[i] for i in mine],
            y=[points.y[i] for i in mine],
            mode="markers",
            name=f"stage {stage.number}",
            marker={"color": _COLORS[(stage.number - 1) % len(_COLORS)]},
        )
        starts = [n for n, s in enumerate(search.stage_of) if s == stage.number]
        if stage.number > 1 and starts:
            figure.add_vline(
                x=starts[0] - 0.5, line_dash="dot", annotation_text=f"stage {stage.number}"
            )
    figure.data = [t for t in figure.data if t is not points]
    return figure.update_layout(
        title="Optimization history by stage",
        xaxis_title="trial, stage after stage",
        yaxis_title=search.metric,
    )


def _learning_curves(search: _Search) -> go.Figure | None:
    figure = ov.plot_intermediate_values(search.merged)
    if not figure.data:
        return None
    trials = search.merged.get_trials(deepcopy=False)
    shown: set[tuple[int, bool]] = set()
    for curve in figure.data:
        trial = trials[int(curve.name.removeprefix("Trial"))]
        stage, pruned = search.stage_of[trial.number], trial.state == TrialState.PRUNED
        best = trial.user_attrs.get("best_epoch")
        symbols = ["x" if pruned else "star" if e == best else "circle" for e in curve.x]
        if pruned:
            symbols[:-1] = ["circle"] * (len(symbols) - 1)
        curve.update(
            name=f"stage {stage}, {'pruned' if pruned else 'complete'}",
            legendgroup=f"{stage}-{pruned}",
            showlegend=(stage, pruned) not in shown,
            line={
                "color": _COLORS[(stage - 1) % len(_COLORS)],
                "dash": "dot" if pruned else "solid",
            },
            marker={"symbol": symbols, "size": [12 if s != "circle" else 5 for s in symbols]},
            hovertext=f"stage {stage}, trial {trial.user_attrs['trial']}",
        )
        shown.add((stage, pruned))
    return figure.update_layout(
        title="Learning curves: dev metric per epoch",
        showlegend=True,
        xaxis={"title": "epoch", "dtick": 1},
        yaxis_title=search.metric,
    )


def _importances(search: _Search) -> go.Figure | None:
    if not search.importances:
        return None
    figure = ov.plot_param_importances(
        search.first, evaluator=_evaluator(), target_name=search.metric
    )
    return figure.update_layout(title="Parameter importances (stage 1, fANOVA)")


def _contour(search: _Search) -> go.Figure | None:
    ranked = list(search.importances)[:2]
    if len(ranked) < 2:
        return None
    figure = ov.plot_contour(search.merged, params=ranked, target_name=search.metric)
    return figure.update_layout(title=f"{search.metric} over {ranked[0]} and {ranked[1]}")


# --- Caviar's own panels -------------------------------------------------------------------

_BETA_NOTE = (
    "An averaging β spans about 1/(1-β) steps, so it is read on a log axis of 1-β: β rises to "
    "the right, each tick is β and its averaging window. Optuna's plots show the same trials as "
    "<code>one_minus_NAME</code>."
)
_STAGES_NOTE = (
    "Each bar is the range a stage sampled, on the parameter's own scale; dots are that stage's "
    "complete trials, diamonds its top trials (those the next stage zoomed into; for the last "
    "stage, its best)."
)
_CURVES_NOTE = (
    "Each epoch the engine reports the dev metric only, so that is the curve; the train and dev "
    "figures are stored for the best epoch alone (the one kept by early stopping), marked here. "
    "Per-epoch train figures are not stored."
)
_BIAS_NOTE = (
    "Train error against dev error tells bias from variance (classification: 1 - accuracy; "
    "regression: 1 - R², the unexplained variance). Test is measured once, at the end. The dashed "
    f"line is the {HIGH_BIAS_ERROR:.0%} error above which the model underfits."
)


def _one_minus(param: Param) -> TypeGuard[FloatParam]:
    return isinstance(param, FloatParam) and param.scale == "one_minus_log"


def _beta_axis(low: float, high: float) -> dict[str, Any]:
    """A log axis of 1-β over [low, high], ticked with β and ≈1/(1-β) steps, β rising rightward."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [10.0**k for k in decades]
    return {
        "type": "log",
        "range": [math.log10(high), math.log10(low)],  # high first: β rises to the right
        "tickvals": ticks,
        "ticktext": [f"β {1 - v:g}<br>≈{1 / v:g} steps" for v in ticks],
    }


def _axis(name: str, param: Param) -> dict[str, Any]:
    """The x axis a parameter is read on, titled with its name and scale."""
    if _one_minus(param):
        return {**_beta_axis(1 - param.high, 1 - param.low), "title": f"1 - {name} (log axis)"}
    log = isinstance(param, FloatParam | IntParam) and param.scale == "log"
    return {
        "type": "log" if log else "linear",
        "title": f"{name} ({'log' if log else 'linear'} axis)",
    }


def _x(name: str, param: Param, value: float) -> float:
    """Where a parameter's value lies on its axis: 1-β for betas."""
    return 1 - value if _one_minus(param) else value


def _beta(search: _Search, name: str) -> go.Figure | None:
    param = search.spec.space[name]
    figure = go.Figure()
    for stage in search.stages:
        mine = [t for t in stage.complete() if name in t.trial.user_attrs]
        if mine:
            figure.add_scatter(
                x=[1 - t.trial.user_attrs[name] for t in mine],
                y=[t.trial.value for t in mine],
                mode="markers",
                name=f"stage {stage.number}",
                marker={"color": _COLORS[(stage.number - 1) % len(_COLORS)], "size": 9},
                text=[f"trial {t.trial.number}, β {t.trial.user_attrs[name]:.5g}" for t in mine],
            )
    if not figure.data:
        return None
    figure.update_xaxes(**_axis(name, param))
    return figure.update_layout(
        title=f"{search.metric} against {name} β", yaxis_title=search.metric
    )


def _ranges(search: _Search) -> go.Figure | None:
    numeric = [(n, p) for n, p in search.spec.space.items() if not isinstance(p, CategoricalParam)]
    if not numeric or not search.stages:
        return None
    figure = make_subplots(rows=len(numeric), cols=1, vertical_spacing=0.5 / len(numeric))
    labels = [f"stage {s.number}" for s in search.stages]
    for row, (name, param) in enumerate(numeric, start=1):
        for stage, label in zip(search.stages, labels, strict=True):
            sampled = stage.space.get(name)
            color = _COLORS[(stage.number - 1) % len(_COLORS)]
            if isinstance(sampled, FloatParam | IntParam):
                ends = sorted(_x(name, param, v) for v in (sampled.low, sampled.high))
                figure.add_scatter(
                    x=ends,
                    y=[label, label],
                    mode="lines",
                    line={"color": color, "width": 14},
                    opacity=0.35,
                    name="range sampled",
                    legendgroup="range",
                    showlegend=False,
                    hovertemplate=f"{label}: {sampled.low:.4g} to {sampled.high:.4g}"
                    "<extra></extra>",
                    row=row,
                    col=1,
                )
            for marked, values in zip(
                (False, True), _stage_points(search, stage, name), strict=True
            ):
                figure.add_scatter(
                    x=[_x(name, param, v) for v in values],
                    y=[label] * len(values),
                    mode="markers",
                    row=row,
                    col=1,
                    showlegend=False,
                    name="top trials" if marked else "trials",
                    marker={
                        "color": "black" if marked else color,
                        "size": 11 if marked else 6,
                        "symbol": "diamond" if marked else "circle",
                    },
                    hovertemplate=f"{name} %{{customdata:.4g}}<extra></extra>",
                    customdata=values,
                )
        figure.update_xaxes(row=row, col=1, **_axis(name, param))
        figure.update_yaxes(row=row, col=1, categoryorder="array", categoryarray=labels[::-1])
    return figure.update_layout(
        title="Ranges sampled, stage by stage", height=160 * len(numeric) + 120, showlegend=False
    )


def _stage_points(search: _Search, stage: _Stage, name: str) -> tuple[list[float], list[float]]:
    """A stage's values of `name`: those of its complete trials, and those of its top trials."""
    plan = search.spec.stage_plan()
    keep = plan[stage.number].keep_top if stage.number < len(plan) else 0.0
    scored = [(complete_value(t.trial), t.params) for t in stage.complete() if name in t.params]
    top = top_fraction(scored, keep, search.direction) if scored else []
    return [p[name] for _, p in scored], [p[name] for p in top]


def _choices(param: Param) -> str:
    assert isinstance(param, CategoricalParam), "stages narrow ranges, never a choice's kind"
    return ", ".join(map(str, param.choices))


def _choices_table(search: _Search) -> str:
    names = [n for n, p in search.spec.space.items() if isinstance(p, CategoricalParam)]
    if not names:
        return ""
    rows = [[name, *(_choices(s.space[name]) for s in search.stages)] for name in names]
    return _table(["choices", *(f"stage {s.number}" for s in search.stages)], rows)


def _best_curves(search: _Search) -> go.Figure | None:
    if search.best is None:
        return None
    trial, metric = search.best.trial, search.metric
    figure = go.Figure()
    epochs = sorted(trial.intermediate_values)
    figure.add_scatter(
        x=epochs,
        y=[trial.intermediate_values[e] for e in epochs],
        name=f"{metric} per epoch",
        mode="lines+markers",
    )
    best_epoch = trial.user_attrs.get("best_epoch")
    name = metric.removeprefix("dev_")
    for split, symbol in (("train", "square"), ("dev", "diamond")):
        key = f"{split}_{name}"
        if best_epoch and key in trial.user_attrs:
            figure.add_scatter(
                x=[best_epoch],
                y=[trial.user_attrs[key]],
                mode="markers",
                name=f"{key} at the best epoch",
                marker={"symbol": symbol, "size": 13},
            )
    if best_epoch:
        figure.add_vline(x=best_epoch, line_dash="dash", annotation_text=f"best epoch {best_epoch}")
    return figure.update_layout(
        title=f"Stage {search.best.stage}, trial {trial.number}: {metric} per epoch",
        xaxis={"title": "epoch", "dtick": 1},
        yaxis_title=name,
    )


def _bias(search: _Search) -> go.Figure | None:
    figures = search.final.get("final_figures")
    if not figures or search.best is None:
        return None
    measure = "accuracy" if "train_accuracy" in figures else "r2"
    dev = figures.get(f"dev_{measure}")
    dev_label = "dev"
    if dev is None:  # refit on train+dev: dev no longer measures the model; the trial's did
        dev, dev_label = search.best.trial.user_attrs.get(f"dev_{measure}"), "dev (the trial)"
    bars = {
        "train": figures[f"train_{measure}"],
        dev_label: dev,
        "test": figures[f"test_{measure}"],
    }
    bars = {k: 1 - v for k, v in bars.items() if v is not None}
    diagnosis = search.final.get("diagnosis", "")
    figure = go.Figure(
        go.Bar(
            x=list(bars),
            y=list(bars.values()),
            text=[f"{v:.1%}" for v in bars.values()],
            marker={"color": ["#636efa", "#ef553b", "#00cc96"][: len(bars)]},
        )
    )
    figure.add_hline(y=HIGH_BIAS_ERROR, line_dash="dash", annotation_text="underfitting above")
    advice = NEXT_STEP.get(diagnosis.split(":")[0], "")
    return figure.update_layout(
        title=f"{diagnosis}<br><sup>{html.escape(advice)}</sup>",
        yaxis={"title": "error" if measure == "accuracy" else "1 - R²", "tickformat": ".0%"},
        height=420,
        margin={"t": 110},
    )


# --- HTML ------------------------------------------------------------------------------------

_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1300px}td,th{padding:2px 12px;"
    "text-align:left}section{margin-top:2.5em}p{color:#444;max-width:900px}"
    ".summary{display:flex;gap:3em;align-items:flex-start}"
)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
