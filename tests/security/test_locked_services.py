"""Attacks on the local stack's services from the same machine: every door needs the
install's secret, no service that can drop root keeps it, and no secret leaks into a
command line or a log."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import httpx
import paho.mqtt.client as paho
import pytest
import redis

from adapters.mqtt import connect_result
from cluster import local_secrets
from cluster.settings import Settings
from cluster.stack import LocalStack


def _secrets(settings: Settings) -> dict[str, str]:
    stored = local_secrets.load(settings.paths.state_dir)
    assert stored is not None, "rayline up made no secrets.json"
    return stored


def test_secrets_file_is_private(stack: Settings) -> None:
    state = stack.paths.state_dir
    for name in ("secrets.json", "ray-auth-token", "redis/redis.conf", "s3/credentials.json"):
        mode = stat.S_IMODE((state / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"


def _pg_connect(dsn: str) -> None:
    async def attempt() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    asyncio.run(attempt())


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_postgres_refuses_a_missing_or_wrong_password(
    stack: Settings, password: str | None
) -> None:
    p = stack.postgres
    auth = p.user if password is None else f"{p.user}:{password}"
    with pytest.raises(asyncpg.InvalidPasswordError):
        _pg_connect(f"postgresql://{auth}@{p.host}:{p.port}/{p.database}")
    _pg_connect(p.dsn())  # and the install's password opens it


def test_postgres_authenticates_with_scram(stack: Settings) -> None:
    async def read() -> list[str]:
        conn = await asyncpg.connect(stack.postgres.dsn(), timeout=5)
        try:
            rows = await conn.fetch("SELECT auth_method FROM pg_hba_file_rules")
            return [r["auth_method"] for r in rows]
        finally:
            await conn.close()

    methods = asyncio.run(read())
    assert methods
    assert set(methods) == {"scram-sha-256"}, methods


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_redis_refuses_commands_without_the_password(stack: Settings, password: str | None) -> None:
    r = stack.redis
    client = redis.Redis(host=r.host, port=r.port, password=password, socket_timeout=3)
    try:
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            client.set("rayline:attack", "1")
    finally:
        client.close()
    assert redis.Redis.from_url(r.url(), socket_timeout=3).ping()


def _s3_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_s3_refuses_unsigned_and_wrongly_signed_requests(stack: Settings) -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = stack.s3
    endpoint = s3.endpoint()
    assert endpoint is not None
    bucket_url = f"{endpoint}/{s3.bucket}"
    assert _s3_status(bucket_url) == 403
    assert _s3_status(bucket_url + "?list-type=2") == 403
    assert _s3_status(f"{endpoint}/moto-api/data.json") == 403  # moto's dump of all state
    assert _s3_status(f"{endpoint}/moto-api/reset") == 403
    for key_id, secret in [
        (s3.access_key_id, "wrong-secret"),
        ("rayline", "rayline-local-secret"),  # the fixed default of earlier versions
    ]:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=s3.region,
        )
        with pytest.raises(ClientError) as refused:
            client.list_objects_v2(Bucket=s3.bucket)
        assert refused.value.response["Error"]["Code"] in {
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        }
    good = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key.get_secret_value(),
        region_name=s3.region,
    )
    assert good.list_objects_v2(Bucket=s3.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_mqtt_refuses_anonymous_and_wrong_password_connects(stack: Settings) -> None:
    m = stack.mqtt
    anonymous = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    answers: list[object] = []
    anonymous.on_connect = lambda _c, _u, _f, code, _p: answers.append(code)
    anonymous.connect(m.host, m.port, keepalive=10)
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        if anonymous.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
            break
    anonymous.disconnect()
    assert not answers or answers[0].is_failure  # type: ignore[attr-defined]
    wrong = connect_result(m.host, m.port, m.bridge_username, "wrong-password")
    assert wrong is not None
    assert wrong.is_failure
    old_default = connect_result(m.host, m.port, m.bridge_username, "rayline-bridge-local")
    assert old_default is not None
    assert old_default.is_failure
    right = connect_result(m.host, m.port, m.bridge_username, m.bridge_password.get_secret_value())
    assert right is not None
    assert not right.is_failure


def test_ray_job_api_refuses_requests_without_the_token(stack: Settings) -> None:
    base = f"http://{stack.ray.host}:{stack.ray.dashboard_port}"
    token = _secrets(stack)["ray_auth_token"]
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/api/jobs/").status_code in (401, 403)
        submitted = client.post("/api/jobs/", json={"entrypoint": "touch /tmp/rayline-pwned"})
        assert submitted.status_code in (401, 403)
        wrong = {"authorization": "Bearer " + "0" * 64}
        assert client.get("/api/jobs/", headers=wrong).status_code in (401, 403)
        allowed = client.get("/api/jobs/", headers={"authorization": f"Bearer {token}"})
        assert allowed.status_code == 200
    assert not Path("/tmp/rayline-pwned").exists()


_DRIVER = """
import ray, sys
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except Exception as exc:
    print("REFUSED", type(exc).__name__)
    sys.exit(3)
print("CONNECTED")
"""


def _driver(address: str, **auth: str) -> str:
    """Try to join the cluster from a fresh process with only ``auth`` for Ray's auth
    variables; return what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token to fall back on
    env.update(auth)
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return result.stdout + result.stderr[-2000:]


def test_ray_refuses_a_driver_without_the_token(stack: Settings) -> None:
    address = stack.ray.address
    without = _driver(address, RAY_AUTH_MODE="disabled")
    assert "CONNECTED" not in without
    assert "REFUSED" in without
    wrong = _driver(address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert "CONNECTED" not in wrong
    assert "REFUSED" in wrong
    # the same driver with the install's token file gets in: the refusals were the token's
    token_file = str(stack.paths.state_dir / local_secrets.RAY_TOKEN_FILE)
    right = _driver(address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file)
    assert "CONNECTED" in right, right


def _processes() -> list[tuple[str, str]]:
    out = subprocess.run(
        ["ps", "-ww", "-eo", "user:32,args", "--no-headers"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        user, _, args = line.strip().partition(" ")
        rows.append((user, args.strip()))
    return rows


def test_services_drop_root_and_no_command_line_holds_a_secret(stack: Settings) -> None:
    rows = _processes()
    state = str(stack.paths.state_dir)
    redis_rows = [u for u, a in rows if a.startswith(("redis-server", "/usr/bin/redis-server"))]
    mosquitto_rows = [u for u, a in rows if "mosquitto" in a and state in a]
    postgres_rows = [u for u, a in rows if "postgres" in a and f"-p {stack.postgres.port}" in a]
    assert redis_rows, "no redis-server runs"
    assert mosquitto_rows, "no mosquitto runs"
    assert postgres_rows, "no postgres runs"
    if os.geteuid() == 0:
        assert set(redis_rows) == {"redis"}, redis_rows
        assert set(mosquitto_rows) == {"mosquitto"}, mosquitto_rows
        assert set(postgres_rows) == {"postgres"}, postgres_rows
    secrets = [v for v in _secrets(stack).values() if len(v) >= 8]
    leaks = [(u, a[:80]) for u, a in rows for s in secrets if s in a]
    assert not leaks, leaks


def _log_files(settings: Settings) -> list[Path]:
    """Every log of the stack: the services' (``logs/``: Kafka, Connect, PostgreSQL,
    Redis, S3, Mosquitto, Ray's head) and Ray's session logs (every worker, actor,
    replica, dashboard and GCS)."""
    stack = LocalStack(settings)
    roots = [settings.paths.state_dir / "logs", stack._ray_temp()]
    found: list[Path] = []
    for root in roots:
        found += [p for p in root.rglob("*") if p.is_file() and _is_log(p)]
    return found


def _is_log(path: Path) -> bool:
    return "logs" in path.parts or path.suffix in {".log", ".out", ".err"}


@pytest.mark.after_others
def test_no_secret_appears_in_any_log(stack: Settings, http: httpx.Client) -> None:
    # Traffic first: a key is made and used, so the ingest and query paths have logged.
    assert http.get("/v1/query/health").status_code < 500
    secrets = [v for v in _secrets(stack).values() if len(v) >= 8]
    platform_key = http.headers["authorization"].removeprefix("Bearer ")
    needles = [*secrets, platform_key]
    files = _log_files(stack)
    assert any(p.name == "postgres.log" for p in files), files[:20]
    assert any("ray" in str(p) for p in files)
    leaks = []
    for file in files:
        data = file.read_bytes()
        leaks += [f"{file}" for needle in needles if needle.encode() in data]
    assert not leaks, f"secrets found in {leaks}"
