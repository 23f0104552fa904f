"""S3 (or any S3-compatible server: MinIO, the local moto server) through boto3.

:class:`S3Store` is one bucket: a streaming :class:`MultipartWriter` for objects of any
size, streaming reads, ``head`` and ``delete``. Every driver error, also one raised in
the middle of a streamed read, is translated into :class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
import urllib.parse
import urllib.request
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


def filesystem(config: S3Config) -> pafs.S3FileSystem:
    """The bucket's server as a ``pyarrow.fs`` filesystem (paths are ``bucket/key``):
    what Ray Data and ``pyarrow.dataset`` read Parquet through, row group by row group
    with ranged reads."""
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
    )


class S3Store:
    """One bucket. Thread-safe (boto3 clients are); build one per process."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        self._s3 = _client(config)

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

    def open(self, key: str, *, seekable: bool = False, buffer_bytes: int = 1 << 20) -> BinaryIO:
        """The object as a buffered binary stream, read from S3 as it is consumed.

        ``seekable`` gives a stream that reads each buffer with a ranged GET, for
        formats that read their end first (Parquet); else one GET streams it all.
        """
        raw: io.RawIOBase
        if seekable:
            head = self.head(key)
            if head is None:
                raise StoreUnavailable(f"S3 object {key!r} is not in bucket {self.bucket!r}")
            raw = _RangeReader(self, key, int(head["ContentLength"]))
        else:
            try:
                body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]
            except _DRIVER_ERRORS as exc:
                raise self._fail(f"open {key!r}", exc) from exc
            raw = _TranslatingReader(body, lambda exc: self._fail(f"read {key!r}", exc))
        return io.BufferedReader(raw, buffer_size=buffer_bytes)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from ``start`` (fewer at its end)."""
        if length <= 0:
            return b""
        try:
            answer = self._s3.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
            )
            return bytes(answer["Body"].read())
        except _DRIVER_ERRORS as exc:
            raise self._fail(f"read bytes {start}+{length} of {key!r}", exc) from exc

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


class _TranslatingReader(io.RawIOBase):
    """A raw stream over botocore's body that turns driver errors into StoreUnavailable."""

    def __init__(self, body: Any, fail: Any) -> None:
        self._body = body
        self._fail = fail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except _DRIVER_ERRORS as exc:
            raise self._fail(exc) from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


class _RangeReader(io.RawIOBase):
    """A seekable raw stream over one object: every read is a ranged GET."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        length = min(len(buffer), self._size - self._position)
        data = self._store.read_range(self._key, self._position, length)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class MultipartWriter:
    """Writes one object from chunks of any size, holding at most one part in memory.

    Chunks are buffered until a part of ``part_bytes`` is full; each full part is
    uploaded as one part of an S3 multipart upload. An object smaller than one part
    is written with one ``PutObject`` on :meth:`complete`. Nothing is visible under
    ``key`` until :meth:`complete` returns; :meth:`abort` (also on an exception inside
    ``with``) discards every part uploaded so far.

    An async caller keeps its event loop free by calling :meth:`feed` (memory only) and
    running :meth:`upload_ready` in a thread when :attr:`ready` says a part is full.
    """

    def __init__(
        self, store: S3Store, key: str, content_type: str, part_bytes: int = PART_BYTES
    ) -> None:
        self.key = key
        self.size = 0
        self._store = store
        self._s3 = store._s3
        self._content_type = content_type
        self._part_bytes = part_bytes
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
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
            self._upload_part(part)

    def _upload_part(self, data: bytes) -> None:
        bucket = self._store.bucket
        try:
            if self._upload_id is None:
                created = self._s3.create_multipart_upload(
                    Bucket=bucket, Key=self.key, ContentType=self._content_type
                )
                self._upload_id = str(created["UploadId"])
            number = len(self._parts) + 1
            answer = self._s3.upload_part(
                Bucket=bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=data
            )
        except _DRIVER_ERRORS as exc:
            self.abort()
            raise self._store._fail(
                f"upload part {len(self._parts) + 1} of {self.key!r}", exc
            ) from exc
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def complete(self) -> int:
        """Upload what is left and make the object visible; return its size in bytes."""
        bucket = self._store.bucket
        if self._upload_id is None:
            try:
                self._s3.put_object(
                    Bucket=bucket,
                    Key=self.key,
                    Body=bytes(self._buffer),
                    ContentType=self._content_type,
                )
            except _DRIVER_ERRORS as exc:
                raise self._store._fail(f"write {self.key!r}", exc) from exc
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            try:
                self._s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            except _DRIVER_ERRORS as exc:
                self.abort()
                raise self._store._fail(f"complete {self.key!r}", exc) from exc
        self._buffer.clear()
        self._finished = True
        return self.size

    def abort(self) -> None:
        """Discard every uploaded part. Never raises: it runs while another error unwinds."""
        self._buffer.clear()
        self._finished = True
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        # An unfinished upload that cannot be aborted now never becomes a visible
        # object; the bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes it.
        with contextlib.suppress(*_DRIVER_ERRORS):
            self._s3.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self.key, UploadId=upload_id
            )
