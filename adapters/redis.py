"""Redis through redis-py."""

from __future__ import annotations

import redis


def answers(host: str, port: int, password: str | None = None) -> bool:
    """True when Redis answers PING."""
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()
