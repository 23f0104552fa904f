"""The local S3-compatible server: moto's, with every request's signature checked.

Run by ``rayline up`` as ``python -m cluster.s3_server <credentials.json>``; the file
(mode 0600) names the host, port and the install's key pair, so no secret sits on the
command line. Moto answers unauthenticated by default; here IAM checks are on from the
first request (``INITIAL_NO_AUTH_ACTION_COUNT=0``) and the one user it knows holds the
install's key pair with an allow-all policy: an unsigned or wrongly signed request
gets 403. A guard in front answers 403 itself to requests with no signature header
(moto answers those with a 500; presigned URLs included) and to moto's own
unauthenticated control API (``/moto-api/``: reset, and a dump of every backend, IAM
keys included).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

USER = "rayline"
ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def _install_key(access_key_id: str, secret_access_key: str) -> None:
    """Make moto's IAM know one user holding exactly this key pair."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_user(region_name="us-east-1", user_name=USER)
    backend.put_user_policy(USER, "rayline-all", ALLOW_ALL)
    key = backend.create_access_key(USER)
    # moto makes up a random pair; the install's own pair replaces it.
    del backend.access_keys[key.physical_resource_id]
    key.access_key_id = access_key_id
    key.secret_access_key = secret_access_key
    backend.access_keys[key.physical_resource_id] = key


_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied: sign the request with the install's S3 key pair</Message>"
    b"</Error>"
)


def guarded(app: WSGIApp) -> WSGIApp:
    """``app`` behind a 403 for unsigned requests and for ``/moto-api/``."""

    def guard(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # Moto's checks read the Authorization header only (a presigned URL is a 500
        # there), so only header-signed requests pass.
        signed = "HTTP_AUTHORIZATION" in environ
        if environ.get("PATH_INFO", "").startswith("/moto-api") or not signed:
            headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(_DENIED)))]
            start_response("403 Forbidden", headers)
            return [_DENIED]
        return app(environ, start_response)

    return guard


def main(argv: list[str]) -> None:
    """Start the server described by the credentials file ``argv[0]``."""
    config = json.loads(Path(argv[0]).read_text())
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read when moto is first imported
    os.environ["MOTO_PORT"] = str(config["port"])
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import MotoRequestHandler
    from werkzeug.serving import run_simple

    _install_key(config["access_key_id"], config["secret_access_key"])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        config["host"],
        int(config["port"]),
        guarded(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
