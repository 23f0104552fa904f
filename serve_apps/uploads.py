"""Uploads Serve app: the deployment of ``POST /v1/uploads`` and ``GET /v1/uploads/{id}``.

What the endpoints do is in ``serve_apps/upload_handler.py`` (no Ray Serve there, so it
also runs under plain uvicorn). Deploy with ``route_prefix=ROUTE_PREFIX``; Serve strips
the prefix, so the app's routes are relative to it.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time.
from fastapi import FastAPI
from ray import serve

from serve_apps.upload_handler import (
    MAX_UPLOAD_BYTES,
    ROUTE_PREFIX,
    UploadsConfig,
    UploadsHandler,
    build_app,
)

__all__ = ["MAX_UPLOAD_BYTES", "ROUTE_PREFIX", "UploadsAPI", "UploadsConfig"]


@serve.deployment
@serve.ingress()
class UploadsAPI:
    """Deploy with ``route_prefix=ROUTE_PREFIX``."""

    def __init__(self, config: UploadsConfig) -> None:
        self._handler = UploadsHandler(config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self._handler, prefix="")
