"""Kafka Connect's REST API through httpx: is the worker up, create or update connectors.

Errors say what Connect answered: a refused configuration becomes
:class:`~core.exceptions.ConfigurationError` with Connect's message, an unreachable or
failing worker :class:`~adapters.exceptions.StoreUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx

from adapters.exceptions import StoreUnavailable
from core.exceptions import ConfigurationError


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when a Connect worker answers ``GET /`` at ``url``."""
    try:
        return httpx.get(url + "/", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class KafkaConnect:
    """A client of one Connect cluster's REST API."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self._url = url
        self._client = httpx.Client(base_url=url, timeout=timeout)

    def put_config(self, name: str, config: Mapping[str, str]) -> dict[str, Any]:
        """Create connector ``name`` with ``config``, or replace its configuration."""
        return self._call("PUT", f"/connectors/{name}/config", json=dict(config))

    def status(self, name: str) -> dict[str, Any] | None:
        """The connector's and its tasks' states; None when there is no such connector."""
        try:
            return self._call("GET", f"/connectors/{name}/status")
        except ConfigurationError:
            return None

    def wait_running(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the connector and all its tasks run; return the last status.

        Raises:
            StoreUnavailable: a task failed (with its trace), or it did not run in time.
        """
        deadline = time.monotonic() + timeout
        status: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            status = self.status(name)
            if status is not None:
                tasks = status.get("tasks") or []
                failed = [t for t in tasks if t.get("state") == "FAILED"]
                if failed:
                    trace = str(failed[0].get("trace", ""))[:2000]
                    raise StoreUnavailable(f"connector {name} task failed in Connect:\n{trace}")
                states = [status.get("connector", {}).get("state")]
                states += [t.get("state") for t in tasks]
                if tasks and all(s == "RUNNING" for s in states):
                    return status
            time.sleep(0.5)
        raise StoreUnavailable(
            f"connector {name} did not reach RUNNING within {timeout:.0f} s; "
            f"last status from Connect at {self._url}: {status}"
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(
                f"Kafka Connect at {self._url} did not answer {method} {path}: {exc}; "
                "is it running (`rayline status`)?"
            ) from exc
        if response.status_code >= 500 or response.status_code == 409:
            # 409: the worker group is rebalancing; the caller may retry.
            raise StoreUnavailable(
                f"Kafka Connect answered {method} {path} with "
                f"{response.status_code}: {response.text[:2000]}"
            )
        if response.status_code >= 400:
            raise ConfigurationError(
                f"Kafka Connect refused {method} {path} ({response.status_code}): "
                f"{response.text[:2000]}"
            )
        body = response.json() if response.content else {}
        return body if isinstance(body, dict) else {"result": body}

    def close(self) -> None:
        self._client.close()
