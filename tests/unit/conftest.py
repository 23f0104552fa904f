"""The unit tier never starts Ray or a server: ray.init raises here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come from the test, not from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith("RAYLINE_"):
            monkeypatch.delenv(name)
