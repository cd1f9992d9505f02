"""Shared by the service tests: a tiny spec and the auth header."""

from typing import Any

SPEC: dict[str, Any] = {
    "name": "api-test",
    "dataset": {"name": "synthetic", "samples": 300, "features": 5, "classes": 2},
    "budget": {"trials": 4, "epochs": 2},
    "space": {"learning_rate": {"low": 1e-3, "high": 0.1, "scale": "log"}},
    "fixed": {"optimizer": "adam", "batch_size": 32, "hidden_units": 8, "hidden_layers": 1},
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
