"""A bare Ray Serve hello-world: the reference for what one request through Serve costs.

A deployment whose handler returns a constant, behind the same proxy as the stack's
apps, with the same deployment options (``max_ongoing_requests``, no CPU reserved).
Whatever an endpoint costs above it is the endpoint's own work; what it costs up to
it is Serve's proxy and the hop to a replica. Deployed for the length of a benchmark
and deleted afterwards (``hello_world``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from cluster.deploy import base_url
from cluster.settings import Settings

HELLO_APP = "hello-bench"
HELLO_ROUTE = "/bench-hello"
HELLO_BODY = b'{"hello":"world"}'


@serve.deployment
class Hello:
    """Answers every request with the same small JSON body."""

    async def __call__(self, request: Request) -> Response:
        return Response(HELLO_BODY, media_type="application/json")


@contextmanager
def hello_world(settings: Settings, timeout: float = 120.0) -> Iterator[str]:
    """Deploy :class:`Hello` for the duration; yield its URL. Needs a Ray connection."""
    app = Hello.options(  # type: ignore[attr-defined]
        max_ongoing_requests=settings.serve.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind()
    serve.run(app, name=HELLO_APP, route_prefix=HELLO_ROUTE, blocking=False)
    url = f"{base_url(settings)}{HELLO_ROUTE}"
    try:
        deadline = time.monotonic() + timeout
        while httpx.get(url, timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hello-world deployment did not answer {url}")
            time.sleep(0.5)
        yield url
    finally:
        serve.delete(HELLO_APP)
