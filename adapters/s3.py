"""S3 (or any S3-compatible server: MinIO, the local moto server).

:class:`S3Store` is one bucket. Objects are read and written through
``pyarrow.fs.S3FileSystem`` (Arrow's S3 client, the one Ray Data and ``pyarrow.dataset``
read the archive with): :meth:`S3Store.open` gives a buffered, seekable stream whose
every buffer fill is one ranged GET, so a reader holds one buffer of the object however
large it is, and Parquet can read its footer first; :meth:`S3Store.writer` gives a
:class:`MultipartWriter` that holds at most a part in memory and uploads as it goes.
The bucket's administration (create it, list keys and folders, ``head``, ``delete``,
unfinished multipart uploads) goes through boto3, which Arrow's filesystem API does not
cover. Every driver error, also one raised in the middle of a streamed read, is
translated into :class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import boto3
import pyarrow.fs as pafs
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as Urllib3Error

from adapters.exceptions import StoreUnavailable

PART_BYTES = 8 * 1024 * 1024
_DRIVER_ERRORS = (BotoCoreError, ClientError, Urllib3Error, OSError)


def answers(endpoint: str, timeout: float = 2.0) -> bool:
    """True when something answers HTTP at ``endpoint`` (any status: S3 says 403 to a
    request without a signature)."""
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


class S3SettingsLike(Protocol):
    """What :meth:`S3Config.of` reads: ``cluster.settings.S3Settings`` has it."""

    @property
    def region(self) -> str: ...

    @property
    def bucket(self) -> str: ...

    @property
    def access_key_id(self) -> str: ...

    @property
    def secret_access_key(self) -> _Secret: ...

    def endpoint(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where the bucket is and how to sign requests (plain data: it travels to Ray)."""

    endpoint: str | None
    region: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    @classmethod
    def of(cls, s3: S3SettingsLike) -> S3Config:
        return cls(
            endpoint=s3.endpoint(),
            region=s3.region,
            bucket=s3.bucket,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key.get_secret_value(),
        )

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"S3Config(endpoint={self.endpoint!r}, bucket={self.bucket!r})"


def _client(config: S3Config) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=config.endpoint,
        region_name=config.region,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


def filesystem(config: S3Config, *, background_writes: bool = True) -> pafs.S3FileSystem:
    """The bucket's server as a ``pyarrow.fs`` filesystem (paths are ``bucket/key``):
    what Ray Data and ``pyarrow.dataset`` read Parquet through, row group by row group
    with ranged reads. Without ``background_writes`` a write returns once its part is
    uploaded (memory stays at one part)."""
    scheme, endpoint = "https", None
    if config.endpoint:
        parsed = urllib.parse.urlsplit(config.endpoint)
        scheme, endpoint = parsed.scheme or "https", parsed.netloc or parsed.path
    return pafs.S3FileSystem(
        access_key=config.access_key_id,
        secret_key=config.secret_access_key,
        region=config.region,
        endpoint_override=endpoint,
        scheme=scheme,
        connect_timeout=5,
        request_timeout=60,
        background_writes=background_writes,
    )


class S3Store:
    """One bucket. Thread-safe (boto3 clients are); build one per process."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        self._s3 = _client(config)
        self._fs = filesystem(config, background_writes=False)

    def _fail(self, what: str, exc: BaseException) -> StoreUnavailable:
        where = self.config.endpoint or "AWS S3"
        return StoreUnavailable(f"S3 ({where}) failed to {what} in bucket {self.bucket!r}: {exc}")

    def ensure_bucket(self) -> bool:
        """Create the bucket when missing; True when it was created now."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise self._fail("check the bucket", exc) from exc
        except _DRIVER_ERRORS as exc:
            raise self._fail("check the bucket", exc) from exc
        try:
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.config.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
            self._s3.create_bucket(**kwargs)
        except _DRIVER_ERRORS as exc:
            raise self._fail("create the bucket", exc) from exc
        return True

    def writer(self, key: str, content_type: str = "application/octet-stream") -> MultipartWriter:
        return MultipartWriter(self, key, content_type)

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata (``ContentLength``, ``ETag``, ...), or None when missing."""
        try:
            return dict(self._s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(f"read the metadata of {key!r}", exc) from exc
        except _DRIVER_ERRORS as exc:
            raise self._fail(f"read the metadata of {key!r}", exc) from exc

    def open(self, key: str, *, buffer_bytes: int = 1 << 20) -> BinaryIO:
        """The object as a buffered, seekable binary stream read from S3 as it is
        consumed: each buffer fill is one ranged GET of ``buffer_bytes``."""
        try:
            native = self._fs.open_input_file(f"{self.bucket}/{key}")
        except FileNotFoundError as exc:
            raise StoreUnavailable(f"S3 object {key!r} is not in bucket {self.bucket!r}") from exc
        except OSError as exc:
            raise self._fail(f"open {key!r}", exc) from exc
        raw = _ArrowReader(native, lambda exc: self._fail(f"read {key!r}", exc))
        return io.BufferedReader(raw, buffer_size=buffer_bytes)

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=key)
        except _DRIVER_ERRORS as exc:
            raise self._fail(f"delete {key!r}", exc) from exc

    def keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (first 1000; for checks and tests, not for listings)."""
        try:
            answer = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        except _DRIVER_ERRORS as exc:
            raise self._fail(f"list {prefix!r}", exc) from exc
        return [item["Key"] for item in answer.get("Contents", [])]

    def all_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order (pages of 1000 followed)."""
        return self._list(prefix, "Contents", "Key")

    def folders(self, prefix: str) -> list[str]:
        """The "folders" right under ``prefix`` (keys up to the next ``/``, with it)."""
        return self._list(prefix, "CommonPrefixes", "Prefix", Delimiter="/")

    def _list(self, prefix: str, part: str, name: str, **options: str) -> list[str]:
        found: list[str] = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, **options
            )
            for page in pages:
                found.extend(item[name] for item in page.get(part, []))
        except _DRIVER_ERRORS as exc:
            raise self._fail(f"list {prefix!r}", exc) from exc
        return found

    def multipart_uploads(self, prefix: str) -> list[str]:
        """Keys of unfinished multipart uploads under ``prefix``."""
        try:
            answer = self._s3.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        except _DRIVER_ERRORS as exc:
            raise self._fail(f"list multipart uploads under {prefix!r}", exc) from exc
        return [item["Key"] for item in answer.get("Uploads", [])]


class _ArrowReader(io.RawIOBase):
    """A seekable raw stream over an Arrow S3 file that turns its errors into
    StoreUnavailable."""

    def __init__(self, native: Any, fail: Callable[[BaseException], StoreUnavailable]) -> None:
        self._native = native
        self._fail = fail

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return int(self._native.tell())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._native.seek(offset, whence))

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self._native.readinto(buffer))
        except OSError as exc:
            raise self._fail(exc) from exc

    def close(self) -> None:
        self._native.close()
        super().close()


class MultipartWriter:
    """Writes one object from chunks of any size, holding at most one part in memory.

    Chunks are buffered until a part of ``part_bytes`` is full; each full part goes to
    Arrow's S3 output stream, which uploads it as part of a multipart upload before the
    write returns (no background writes: memory stays bounded). Nothing is visible under
    ``key`` until :meth:`complete` returns. :meth:`abort` (also on an exception inside
    ``with``) drops what was written: Arrow's stream has no abort, so an upload already
    begun is closed and its object deleted at once (a crash in between leaves an
    unfinished multipart upload, which the bucket's lifecycle rule removes).

    An async caller keeps its event loop free by calling :meth:`feed` (memory only) and
    running :meth:`upload_ready` in a thread when :attr:`ready` says a part is full.
    """

    def __init__(
        self, store: S3Store, key: str, content_type: str, part_bytes: int = PART_BYTES
    ) -> None:
        self.key = key
        self.size = 0
        self._store = store
        self._content_type = content_type
        self._part_bytes = part_bytes
        self._buffer = bytearray()
        self._stream: Any = None
        self._parts = 0
        self._finished = False

    def __enter__(self) -> MultipartWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or not self._finished:
            self.abort()

    @property
    def ready(self) -> bool:
        """True when at least one full part waits for :meth:`upload_ready`."""
        return len(self._buffer) >= self._part_bytes

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        self.size += len(chunk)

    def write(self, chunk: bytes) -> None:
        self.feed(chunk)
        if self.ready:
            self.upload_ready()

    def upload_ready(self) -> None:
        while len(self._buffer) >= self._part_bytes:
            part = bytes(self._buffer[: self._part_bytes])
            del self._buffer[: self._part_bytes]
            self._send(part, f"upload part {self._parts + 1} of {self.key!r}")

    def _send(self, data: bytes, what: str) -> None:
        try:
            if self._stream is None:
                self._stream = self._store._fs.open_output_stream(
                    f"{self._store.bucket}/{self.key}",
                    metadata={"Content-Type": self._content_type},
                )
            self._stream.write(data)
        except OSError as exc:
            self.abort()
            raise self._store._fail(what, exc) from exc
        self._parts += 1

    def complete(self) -> int:
        """Upload what is left and make the object visible; return its size in bytes."""
        self._send(bytes(self._buffer), f"write {self.key!r}")
        self._buffer.clear()
        stream, self._stream = self._stream, None
        try:
            stream.close()
        except OSError as exc:
            self._finished = True
            raise self._store._fail(f"complete {self.key!r}", exc) from exc
        self._finished = True
        return self.size

    def abort(self) -> None:
        """Drop what was written. Never raises: it runs while another error unwinds."""
        self._buffer.clear()
        self._finished = True
        stream, self._stream = self._stream, None
        if stream is None:
            return
        with contextlib.suppress(OSError, StoreUnavailable):
            stream.close()
            self._store.delete(self.key)
