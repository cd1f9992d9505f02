"""Searches: the spec, its spaces and stages, the driver, trial training, the worker, reports."""

from typing import TYPE_CHECKING

from caviar.models.namespace import lazy_members

if TYPE_CHECKING:  # what each name is, for type checkers; imported on first use otherwise
    from caviar.search.report import render_report
    from caviar.search.runner import SearchResult, run_search, start_search
    from caviar.search.space import sample_trial
    from caviar.search.spec import SearchSpec, SpecError, load_spec, parse_spec
    from caviar.search.worker import Worker

__all__ = [
    "SearchResult",
    "SearchSpec",
    "SpecError",
    "Worker",
    "load_spec",
    "parse_spec",
    "render_report",
    "run_search",
    "sample_trial",
    "start_search",
]
__getattr__ = lazy_members(__name__, __file__)
