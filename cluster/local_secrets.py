"""The local stack's own secrets: generated once per install, kept in the state folder.

``rayline up`` (and the integration tests, which run ``up`` themselves) call
:func:`ensure` first: it writes ``<state>/secrets.json`` (mode 0600, created atomically
with ``O_CREAT | O_EXCL`` so two processes starting at once agree on one file) holding
a random PostgreSQL password, Redis password, S3 key pair, MQTT bridge password and Ray
auth token. :func:`apply` (called by ``load_settings``) puts them into the settings of
every service the local stack manages, unless the user set that value explicitly
(``RAYLINE_...`` variable, YAML file or keyword), so every entry point (the command
line, tests, benchmarks, and the actors that receive its settings) sees the same
secrets. ``rayline down --purge`` deletes the state folder and them with it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from core.exceptions import ConfigurationError

if TYPE_CHECKING:
    from cluster.settings import Settings

FILE_NAME = "secrets.json"
RAY_TOKEN_FILE = "ray-auth-token"

# (settings part, field) that each generated secret fills, by its key in secrets.json.
_FIELDS: dict[str, tuple[str, str]] = {
    "postgres_password": ("postgres", "password"),
    "redis_password": ("redis", "password"),
    "s3_access_key_id": ("s3", "access_key_id"),
    "s3_secret_access_key": ("s3", "secret_access_key"),
    "mqtt_bridge_password": ("mqtt", "bridge_password"),
    "ray_auth_token": ("ray", "auth_token"),
}


def path(state_dir: Path) -> Path:
    """Where the install's secrets live."""
    return state_dir / FILE_NAME


def generate() -> dict[str, str]:
    """A fresh set of secrets (URL-safe, so they fit DSNs and config files unquoted)."""
    made = {key: secrets.token_urlsafe(24) for key in _FIELDS}
    made["s3_access_key_id"] = "rayline-" + secrets.token_hex(8)
    made["ray_auth_token"] = secrets.token_hex(32)
    return made


def load(state_dir: Path) -> dict[str, str] | None:
    """The install's secrets, or None before the first ``up``.

    Raises:
        ConfigurationError: The file exists but is not a JSON object of strings.
    """
    file = path(state_dir)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read the local stack's secrets {file}: {exc.__class__.__name__}; "
            "restore it, or delete all local state with `rayline down --purge`"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigurationError(
            f"{file} is not a JSON object of strings; restore it, or delete all local "
            "state with `rayline down --purge`"
        )
    return data


def ensure(state_dir: Path) -> dict[str, str]:
    """Return the install's secrets, generating and storing them (mode 0600) if absent.

    Secrets missing from an older file are added; existing ones never change.
    """
    existing = load(state_dir)
    if existing is not None and set(_FIELDS) <= set(existing):
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    wanted = {**generate(), **(existing or {})}
    file = path(state_dir)
    tmp = file.with_name(f"{FILE_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(wanted, out, indent=2)
    if existing is None:
        try:
            os.link(tmp, file)  # fails when another process made one meanwhile: use it
        except FileExistsError:
            tmp.unlink()
            found = load(state_dir)
            assert found is not None
            return found
        tmp.unlink()
    else:
        tmp.replace(file)
    return wanted


def apply(settings: Settings) -> Settings:
    """Fill the managed services' secrets the user did not set from ``secrets.json``.

    Without the file (before the first ``up``) the settings come back unchanged.
    """
    stored = load(settings.paths.state_dir)
    if stored is None:
        return settings
    updates: dict[str, dict[str, Any]] = {}
    for key, (part_name, field) in _FIELDS.items():
        part = getattr(settings, part_name)
        if key not in stored or not part.managed or field in part.model_fields_set:
            continue
        value = stored[key] if field == "access_key_id" else SecretStr(stored[key])
        updates.setdefault(part_name, {})[field] = value
    if not updates:
        return settings
    return settings.model_copy(
        update={
            name: getattr(settings, name).model_copy(update=fields)
            for name, fields in updates.items()
        }
    )


def ray_environment(settings: Settings) -> dict[str, str]:
    """The environment a Ray driver or the local head needs for the settings' auth mode.

    With token auth and a token in the settings, the token goes into a file of its own
    (mode 0600) named by ``RAY_AUTH_TOKEN_PATH``, so it never sits in a command line or
    in an environment that Ray copies to its logs. Without a token Ray looks it up
    itself (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``).
    """
    r = settings.ray
    env: dict[str, str] = {"RAY_AUTH_MODE": r.auth_mode}
    if r.auth_mode == "token" and r.auth_token is not None:
        file = settings.paths.state_dir / RAY_TOKEN_FILE
        token = r.auth_token.get_secret_value()
        if not file.exists() or file.read_text() != token:
            _write_private(file, token)
        env["RAY_AUTH_TOKEN_PATH"] = str(file)
    return env


def export_ray_environment(settings: Settings) -> None:
    """Put :func:`ray_environment` into this process's environment (and its children's).

    Ray reads its auth mode when ``ray`` is first imported, so an entry point calls this
    before that import: the command line in its callback, the integration tests in their
    conftest, the benchmarks in their package.
    """
    os.environ.update(ray_environment(settings))


def _write_private(file: Path, text: str) -> None:
    """Replace ``file`` atomically with ``text``, readable by its owner only."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(file)


_DSN_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.I)


def redact(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with the password of every URL (``scheme://user:***@host``) and every
    ``known`` secret replaced by ``***``: for error messages that quote a DSN or output."""
    text = _DSN_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    for secret in known:
        if secret:
            text = text.replace(secret, "***")
    return text


def values(settings: Settings) -> list[str]:
    """Every secret the local stack's settings hold (for redaction and the log check)."""
    found = []
    for part_name, field in _FIELDS.values():
        value = getattr(getattr(settings, part_name), field)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
    return [v for v in found if v]
