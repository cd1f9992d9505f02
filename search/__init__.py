"""Searches: the spec, its spaces and stages, the driver, trial training, the worker, reports."""

from caviar.models.namespace import lazy_members

_MEMBERS = {
    "render_report": "report",
    "SearchResult": "runner",
    "run_search": "runner",
    "start_search": "runner",
    "sample_trial": "space",
    "SearchSpec": "spec",
    "SpecError": "spec",
    "load_spec": "spec",
    "parse_spec": "spec",
    "Worker": "worker",
}
__all__ = sorted(_MEMBERS)
__getattr__ = lazy_members(__name__, _MEMBERS)
