"""The install's generated secrets: made once (0600), reused, beaten by explicit settings."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from cluster import local_secrets
from cluster.settings import load_settings
from core.exceptions import ConfigurationError


def test_first_ensure_writes_a_private_file_of_fresh_secrets(tmp_path: Path) -> None:
    made = local_secrets.ensure(tmp_path / "state")
    file = tmp_path / "state" / "secrets.json"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert json.loads(file.read_text()) == made
    assert set(made) == {
        "postgres_password",
        "redis_password",
        "s3_access_key_id",
        "s3_secret_access_key",
        "mqtt_bridge_password",
        "ray_auth_token",
    }
    assert all(len(value) >= 16 for value in made.values())
    assert len(set(made.values())) == len(made)
    assert made != local_secrets.ensure(tmp_path / "other")  # per install
    assert not list((tmp_path / "state").glob("*.tmp"))


def test_later_ensures_reuse_the_stored_secrets(tmp_path: Path) -> None:
    first = local_secrets.ensure(tmp_path)
    assert local_secrets.ensure(tmp_path) == first


def test_an_older_file_gains_the_missing_secrets_and_keeps_its_own(tmp_path: Path) -> None:
    (tmp_path / "secrets.json").write_text('{"postgres_password": "kept-password"}')
    made = local_secrets.ensure(tmp_path)
    assert made["postgres_password"] == "kept-password"
    assert made["ray_auth_token"]
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600


def test_settings_of_the_local_stack_carry_the_generated_secrets(tmp_path: Path) -> None:
    before = load_settings(paths={"state_dir": tmp_path})
    assert before.postgres.password is None  # nothing generated before the first `up`
    made = local_secrets.ensure(tmp_path)
    s = load_settings(paths={"state_dir": tmp_path})
    assert s.postgres.dsn() == (
        f"postgresql://postgres:{made['postgres_password']}@127.0.0.1:25432/rayline"
    )
    assert s.redis.url() == f"redis://:{made['redis_password']}@127.0.0.1:26379/0"
    assert s.s3.access_key_id == made["s3_access_key_id"]
    assert s.s3.secret_access_key.get_secret_value() == made["s3_secret_access_key"]
    assert s.mqtt.bridge_password.get_secret_value() == made["mqtt_bridge_password"]
    assert s.ray.auth_token is not None
    assert s.ray.auth_token.get_secret_value() == made["ray_auth_token"]
    assert sorted(local_secrets.values(s)) == sorted(
        v for k, v in made.items() if k != "s3_access_key_id"
    )
    assert made["postgres_password"] not in str(s.redacted())


def test_explicit_settings_win_over_generated_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = local_secrets.ensure(tmp_path)
    monkeypatch.setenv("RAYLINE_REDIS__PASSWORD", "mine-from-env")
    s = load_settings(
        paths={"state_dir": tmp_path},
        postgres={"password": "mine-by-keyword"},
        s3={"access_key_id": "my-key"},
    )
    assert s.postgres.password is not None
    assert s.postgres.password.get_secret_value() == "mine-by-keyword"
    assert s.redis.password is not None
    assert s.redis.password.get_secret_value() == "mine-from-env"
    assert s.s3.access_key_id == "my-key"
    assert s.s3.secret_access_key.get_secret_value() == made["s3_secret_access_key"]


def test_services_not_run_locally_get_no_generated_secret(tmp_path: Path) -> None:
    local_secrets.ensure(tmp_path)
    s = load_settings(paths={"state_dir": tmp_path}, postgres={"managed": False})
    assert s.postgres.password is None
    assert s.redis.password is not None


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"redis_password": 7}'])
def test_a_damaged_secrets_file_is_named_with_the_fix(tmp_path: Path, content: str) -> None:
    (tmp_path / "secrets.json").write_text(content)
    with pytest.raises(ConfigurationError, match=r"secrets.json.*rayline down --purge"):
        load_settings(paths={"state_dir": tmp_path})


def test_ray_drivers_read_the_token_from_a_private_file(tmp_path: Path) -> None:
    made = local_secrets.ensure(tmp_path)
    env = local_secrets.ray_environment(load_settings(paths={"state_dir": tmp_path}))
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert env["RAY_AUTH_MODE"] == "token"
    assert token_file.read_text() == made["ray_auth_token"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert made["ray_auth_token"] not in json.dumps(env)


def test_ray_without_a_token_setting_leaves_the_lookup_to_ray(tmp_path: Path) -> None:
    env = local_secrets.ray_environment(load_settings(paths={"state_dir": tmp_path}))
    assert env == {"RAY_AUTH_MODE": "token"}
    off = load_settings(paths={"state_dir": tmp_path}, ray={"auth_mode": "disabled"})
    assert local_secrets.ray_environment(off) == {"RAY_AUTH_MODE": "disabled"}


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "cannot reach postgresql://postgres:s3cr3t@127.0.0.1:25432/rayline",
            "cannot reach postgresql://postgres:***@127.0.0.1:25432/rayline",
        ),
        ("redis://:pw-1_x@h:6379/0 refused", "redis://:***@h:6379/0 refused"),
        ("http://u:p@ch:8123 and http://ch:8123", "http://u:***@ch:8123 and http://ch:8123"),
        ("token abc123 in output", "token *** in output"),
        ("nothing secret", "nothing secret"),
    ],
)
def test_redact_hides_url_passwords_and_known_secrets(text: str, redacted: str) -> None:
    assert local_secrets.redact(text, ["abc123", ""]) == redacted


def test_the_cdc_connector_names_the_postgres_password_by_reference(tmp_path: Path) -> None:
    from cluster import connect
    from cluster.cli_cdc import connector_config

    made = local_secrets.ensure(tmp_path)
    s = load_settings(paths={"state_dir": tmp_path})
    config = connector_config(s, [("public", "customers")])
    assert config["database.password"] == (
        "${file:" + str(tmp_path / "connect" / "secrets.properties") + ":postgres.password}"
    )
    assert made["postgres_password"] not in str(config)
    connect.write_config(s, tmp_path / "connect")
    secrets_file = connect.secrets_path(s)
    assert secrets_file.read_text() == f"postgres.password={made['postgres_password']}\n"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert "config.providers=file" in (tmp_path / "connect" / "worker.properties").read_text()


def _call(app: Any, path: str, headers: dict[str, str]) -> str:
    statuses: list[str] = []
    environ = {"PATH_INFO": path, "QUERY_STRING": "", **headers}
    body = b"".join(app(environ, lambda status, _headers: statuses.append(status)))
    return statuses[0] + " " + body.decode()


@pytest.mark.parametrize(
    ("path", "headers", "passed"),
    [
        ("/rayline-archive", {}, False),
        ("/rayline-archive?X-Amz-Signature=x", {}, False),
        ("/moto-api/data.json", {"HTTP_AUTHORIZATION": "AWS4-HMAC-SHA256 ..."}, False),
        ("/moto-api/reset", {}, False),
        ("/rayline-archive", {"HTTP_AUTHORIZATION": "AWS4-HMAC-SHA256 ..."}, True),
    ],
)
def test_the_s3_guard_lets_only_signed_requests_reach_moto(
    path: str, headers: dict[str, str], passed: bool
) -> None:
    from cluster.s3_server import guarded

    def moto(_environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"moto"]

    answer = _call(guarded(moto), path, headers)
    if passed:
        assert answer == "200 OK moto"
    else:
        assert answer.startswith("403 Forbidden")
        assert "AccessDenied" in answer


def test_mosquitto_drops_to_its_own_user_when_started_by_root(tmp_path: Path) -> None:
    import os

    from cluster import mosquitto

    text = mosquitto.config_text(load_settings(paths={"state_dir": tmp_path}), "mosquitto")
    if os.geteuid() == 0:
        assert "user mosquitto\n" in text
    assert "allow_anonymous false\n" in text
