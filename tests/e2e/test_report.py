"""The HTML report of a real two-stage search with pruning, as Chromium draws it."""

import html
import json
import re
from typing import TYPE_CHECKING

import numpy as np

from caviar.db.migrate import upgrade
from caviar.db.storage import optuna_storage
from caviar.search.report import render_report
from caviar.search.runner import SearchResult, run_search, start_search
from caviar.search.spec import parse_spec

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_dashboard import chromium, render
else:
    from test_dashboard import chromium, render

SPEC = """
name: report-tiny
dataset: {name: synthetic, samples: 300, features: 5, classes: 3}
budget: {trials: 12, epochs: 3}
seed: 1
pruner: {name: hyperband, warmup_epochs: 1}
space:
  learning_rate: {low: 1.0e-3, high: 1.0, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
  l2: {low: 1.0e-5, high: 1.0e-2, scale: log}
fixed: {optimizer: momentum, batch_size: 32, hidden_units: 8, hidden_layers: 1}
stages: [{trials: 8}, {trials: 4, keep_top: 0.25}]
"""
PANELS = {
    "bias-variance",
    "best-curves",
    "history",
    "learning-curves",
    "stages",
    "beta-momentum",
    "slices",
    "parallel",
    "importances",
    "contour",
}
#: Axis titles of the log-scale parameters, as Optuna's plots and Caviar's own panels name them.
LOG_AXES = {
    "learning_rate",
    "one_minus_momentum",
    "l2",
    "learning_rate (log axis)",
    "1 - momentum (log axis)",
    "l2 (log axis)",
}

#: Injected first in <head>: records every uncaught error and console.error of the page.
CATCH = """<script>window.__errors = [];
addEventListener('error', e => __errors.push(String(e.message)));
const consoleError = console.error;
console.error = (...a) => { __errors.push(a.map(String).join(' ')); consoleError(...a); };
</script>"""
#: Injected last in <body>: once the page has loaded, writes what each panel's plot drew.
PROBE = """<script>addEventListener('load', () => setTimeout(() => {
  const panels = {};
  for (const section of document.querySelectorAll('section[id^=panel-]')) {
    const gd = section.querySelector('.plotly-graph-div');
    const layout = gd._fullLayout || {};
    const axes = Object.keys(layout).filter(k => /^[xy]axis\\d*$/.test(k)).map(k => ({
      title: (layout[k].title || {}).text || '', type: layout[k].type,
      ticktext: layout[k].ticktext || []}));
    panels[section.id.slice('panel-'.length)] = {
      svg: gd.querySelectorAll('.main-svg').length, title: (layout.title || {}).text || '',
      traces: (gd._fullData || []).map(t => t.name), axes,
      annotations: (layout.annotations || []).map(a => ({x: a.x, y: a.y, text: a.text}))};
  }
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({errors: __errors, panels});
  document.body.append(pre);
}, 1000));</script>"""


def test_report_draws_every_panel_in_chromium_with_log_axes(tmp_path):
    chromium()  # before the search: without a browser the test fails or skips at once
    spec = parse_spec(SPEC)
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    upgrade(url)
    storage = optuna_storage(url)
    done = run_search(url, start_search(url, spec), batch=8)
    assert done.counts["pruned"] > 0 and done.counts["complete"] >= 6, done.counts
    # As `caviar report` and the API render it: from the database, not the process's final fit.
    result = SearchResult(done.search_id, done.studies, done.counts, done.best)
    page = render_report(spec, storage, result)

    assert page.count("* plotly.js v") == 1  # inlined once, not per figure
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing to fetch
    report = tmp_path / "report.html"
    report.write_text(page.replace("<head>", "<head>" + CATCH, 1).replace("</body>", PROBE))
    dom = render(report.as_uri(), tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    probe = json.loads(html.unescape(found.group(1)))

    assert probe["errors"] == []
    panels = probe["panels"]
    assert set(panels) == PANELS
    assert all(panel["svg"] and panel["traces"] for panel in panels.values()), panels
    assert {"stage 1", "stage 2"} <= set(panels["history"]["traces"])
    assert any(name.endswith(", pruned") for name in panels["learning-curves"]["traces"])
    assert done.best is not None
    assert done.best["diagnosis"] in panels["bias-variance"]["title"]

    logged = [
        (key, axis["title"], axis["type"])
        for key, panel in panels.items()
        for axis in panel["axes"]
        if axis["title"] in LOG_AXES
    ]
    assert {key for key, _, _ in logged} >= {"slices", "stages", "beta-momentum"}
    assert all(kind == "log" for _, _, kind in logged), logged
    beta = panels["beta-momentum"]["axes"][0]
    assert "β 0.99" in " ".join(beta["ticktext"])  # read as β, laid out as 1-β

    # Parallel coordinates space a log parameter's ticks by log10 of their values (labels are
    # rounded to 3 digits), not by the values.
    parallel = panels["parallel"]
    dimensions = next(a["ticktext"] for a in parallel["axes"] if a["ticktext"])
    column = dimensions.index("learning_rate")
    ticks = [(float(a["text"]), a["y"]) for a in parallel["annotations"] if a["x"] == column]
    values, heights = np.array(ticks).T
    assert len(ticks) >= 3
    assert _affine_residual(np.log10(values), heights) < 1e-3
    assert _affine_residual(values, heights) > 0.05


def _affine_residual(x: np.ndarray, y: np.ndarray) -> float:
    """The largest distance of the points (x, y) from their least-squares line."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(np.max(np.abs(slope * x + intercept - y)))
