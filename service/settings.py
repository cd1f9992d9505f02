"""Settings from `CAVIAR_*` environment variables, read once per process by `get_settings()`."""

from __future__ import annotations

import functools

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from db.storage import DEFAULT_DATABASE_URL


class Settings(BaseSettings):
    """Caviar's configuration; every field is the environment variable `CAVIAR_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="CAVIAR_", extra="ignore")

    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the database.")
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")
    token: str | None = Field(None, description="API token the CLI sends.")
    compile_cache: str | None = Field(
        None, description="Directory of JAX's persistent compilation cache (workers)."
    )


@functools.lru_cache
def get_settings() -> Settings:
    """The process's settings (cached; tests clear the cache to change them)."""
    return Settings()
