"""Settings from `CAVIAR_*` environment variables, read once per process by `get_settings()`."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from caviar.db.storage import DEFAULT_DATABASE_URL


class Settings(BaseSettings):
    """Caviar's configuration; every field is the environment variable `CAVIAR_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="CAVIAR_", extra="ignore")

    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the database.")
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")
    token: str | None = Field(None, description="API token the CLI sends.")
    local_owner: str = Field(
        "local",
        min_length=1,
        max_length=128,
        description="Owner of the searches caviar run starts.",
    )
    compile_cache: str | None = Field(
        None, description="Directory of JAX's persistent compilation cache (workers, caviar run)."
    )
    matmul_precision: Literal["highest", "high", "default"] = Field(
        "highest", description="Precision of float32 matmuls (workers, caviar run); see README."
    )
    require_accelerator: bool = Field(
        False, description="A worker refuses to start when JAX finds no GPU or TPU."
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port a worker serves Prometheus metrics on; 0: none."
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address a worker's metrics port binds to (0.0.0.0: every one)."
    )
    max_trials: int = Field(2000, ge=1, description="Most trials one search may run.")
    max_epochs: int = Field(1000, ge=1, description="Most epochs a trial may train.")
    max_hidden_layers: int = Field(8, ge=1, description="Most hidden layers of a model.")
    max_hidden_units: int = Field(4096, ge=1, description="Most units of a hidden layer.")
    max_parameters: int = Field(
        50_000_000, ge=1, description="Most weights and biases of the largest model a spec allows."
    )
    max_samples: int = Field(
        1_000_000, ge=1, description="Most examples a generated dataset (mnist1d, synthetic) has."
    )
    max_features: int = Field(10_000, ge=1, description="Most features of a synthetic dataset.")
    max_classes: int = Field(1000, ge=2, description="Most classes of a synthetic dataset.")
    max_dataset_values: int = Field(
        50_000_000, ge=1, description="Most values (samples x features) of a generated dataset."
    )
    data_dir: str | None = Field(
        None,
        description="Directory whose files a submitted spec may name as dataset.path; "
        "None: specs name uploads and built-ins only.",
    )
    max_search_attempts: int = Field(
        5,
        ge=1,
        description="Workers that may fail or die on one search before it is failed.",
    )
    max_concurrent_searches: int = Field(
        4, ge=1, description="Queued or running searches one owner may have at once (429 beyond)."
    )
    max_event_streams: int = Field(
        8, ge=1, description="Event streams one owner may have open at once per API process (429)."
    )
    max_spec_bytes: int = Field(64 * 1024, ge=1, description="Largest search spec body (413).")
    max_upload_bytes: int = Field(64 * 2**20, ge=1, description="Largest dataset upload (413).")
    max_upload_array_bytes: int = Field(
        256 * 2**20,
        ge=1,
        description="Most bytes an uploaded npz's arrays may take uncompressed as float64 (413).",
    )
    max_upload_columns: int = Field(10_000, ge=1, description="Most columns of an upload.")


@functools.lru_cache
def get_settings() -> Settings:
    """The process's settings (cached; tests clear the cache to change them)."""
    return Settings()
