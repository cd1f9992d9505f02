"""Searches: the spec, its spaces and stages, the driver, trial training, the worker, reports."""

from caviar.models.namespace import lazy_members

__getattr__, __all__ = lazy_members(
    __name__,
    report="render_report",
    runner="SearchResult run_search start_search",
    space="sample_trial",
    spec="SearchSpec SpecError load_spec parse_spec",
    worker="Worker",
)
