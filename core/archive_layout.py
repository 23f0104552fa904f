"""Where the raw archive puts things in S3, and the manifest of each hour directory.

Layout (``<root>`` is ``archive.prefix``)::

    <root>/raw/source=<source>/date=YYYY-MM-DD/hour=HH/<topic>-p<partition>-<first>-<last>.parquet
    <root>/raw/source=<source>/date=YYYY-MM-DD/hour=HH/_manifest.json
    <root>/dlq/source=<source>/date=YYYY-MM-DD/hour=HH/...

Raw events are placed by their event time ``ts``; dead letters by the time they were
dead-lettered (the Kafka timestamp of the dead letter). An event whose source or event
time cannot be read goes to ``source=_unknown``, placed by its Kafka timestamp.

Source names are made key-safe by percent-encoding (UTF-8) every character outside
``[A-Za-z0-9._-]`` and a leading ``_`` (so that no real source can land in
``_unknown``); Hive-partitioning readers (pyarrow, DuckDB, Spark) decode it back.

A file's name depends only on (topic, partition, first offset, last offset), so that
re-archiving the same offsets overwrites the same object. :meth:`Manifest.merge` also
replaces the files that a replay of the same partition makes stale (see its docstring
and docs/archive.md for the exactly-once argument).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from core.envelope import parse_event_time
from core.exceptions import InvalidInputError

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
UNKNOWN_SOURCE = "_unknown"
# Escaped names longer than this keep a readable head and a hash of the whole name:
# S3 keys are at most 1024 bytes, and one hostile source must not make them fail.
MAX_SOURCE_KEY_CHARS = 128
_HASH_CHARS = 16

Kind = Literal["raw", "dlq"]
KINDS: tuple[Kind, ...] = ("raw", "dlq")
_SAFE = frozenset(string.ascii_letters + string.digits + "._-")
_HOUR_MS = 3_600_000


def _escape_char(index: int, char: str) -> str:
    if char in _SAFE and not (index == 0 and char == "_"):
        return char
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def _escape(text: str) -> str:
    return "".join(_escape_char(index, char) for index, char in enumerate(text))


def source_key(source: object) -> str:
    """The key-safe directory value of a source name; ``_unknown`` for a missing one.

    A name that is not a string, or is empty, is unknown. Every other name gets its own
    directory: escaping is one-to-one, and a name too long for a key is cut and
    completed with a hash of the whole name.
    """
    if not isinstance(source, str) or not source:
        return UNKNOWN_SOURCE
    escaped = _escape(source)
    if len(escaped) <= MAX_SOURCE_KEY_CHARS:
        return escaped
    digest = hashlib.sha256(escaped.encode()).hexdigest()[:_HASH_CHARS]
    head, room = "", MAX_SOURCE_KEY_CHARS - _HASH_CHARS - 1
    for index, char in enumerate(source):  # whole characters: never half an escape
        piece = _escape_char(index, char)
        if len(head) + len(piece) > room:
            break
        head += piece
    return f"{head}~{digest}"


def event_time_ms(value: object) -> int | None:
    """Event time of a stored envelope's ``ts`` in epoch ms, or None when unreadable.

    Stored envelopes carry integer epoch milliseconds; an RFC 3339 string (a record
    produced by another tool) is read too.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            parse_event_time(value / 1000)  # the same 2000..2100 range check
        except ValueError:
            return None
        return value
    if isinstance(value, str):
        try:
            return parse_event_time(value)
        except ValueError:
            return None
    return None


def hour_start_ms(time_ms: int) -> int:
    return time_ms - time_ms % _HOUR_MS


@dataclass(frozen=True, order=True, slots=True)
class HourDir:
    """One ``<kind>/source=/date=/hour=`` directory."""

    kind: Kind
    source: str  # already key-safe (see source_key)
    date: str  # YYYY-MM-DD, UTC
    hour: int  # 0..23, UTC

    @classmethod
    def at(cls, kind: Kind, source: object, time_ms: int) -> HourDir:
        """The directory of ``source`` (a raw name, escaped here) at ``time_ms``."""
        moment = datetime.fromtimestamp(max(0, time_ms) / 1000, tz=UTC)
        return cls(kind, source_key(source), moment.strftime("%Y-%m-%d"), moment.hour)

    def prefix(self, root: str) -> str:
        base = f"{root.strip('/')}/" if root.strip("/") else ""
        return f"{base}{self.kind}/source={self.source}/date={self.date}/hour={self.hour:02d}/"

    def manifest_key(self, root: str) -> str:
        return self.prefix(root) + MANIFEST_NAME

    def file_key(self, root: str, name: str) -> str:
        return self.prefix(root) + name


def hours_between(kind: Kind, source: object, from_ms: int, to_ms: int) -> list[HourDir]:
    """Every hour directory that may hold rows of ``source`` in ``[from_ms, to_ms)``."""
    return hours_of_key(kind, source_key(source), from_ms, to_ms)


def hours_of_key(kind: Kind, key: str, from_ms: int, to_ms: int) -> list[HourDir]:
    """As :func:`hours_between`, for a source directory's key-safe name (as listed)."""
    if to_ms <= from_ms:
        return []
    start = datetime.fromtimestamp(hour_start_ms(max(0, from_ms)) / 1000, tz=UTC)
    end = datetime.fromtimestamp(max(0, to_ms - 1) / 1000, tz=UTC)
    dirs = []
    while start <= end:
        dirs.append(HourDir(kind, key, start.strftime("%Y-%m-%d"), start.hour))
        start += timedelta(hours=1)
    return dirs


def source_keys_of(folders: Iterable[str]) -> list[str]:
    """The key-safe source names of listed ``<root>/<kind>/source=<name>/`` folders."""
    found = []
    for folder in folders:
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("source="):
            found.append(name.removeprefix("source="))
    return found


def file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """The object name of the rows of one partition's offset range in one directory."""
    return f"{_escape(topic)}-p{partition}-{first_offset}-{last_offset}.parquet"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One Parquet object of an hour directory, as its manifest lists it."""

    key: str
    rows: int
    bytes: int
    sha256: str
    min_ts: int  # epoch ms of the placing time (event time; Kafka time for DLQ/_unknown)
    max_ts: int
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    schema_version: int = SCHEMA_VERSION

    def overlaps(self, ranges: Mapping[tuple[str, int], tuple[int, int]]) -> bool:
        """True when this file starts inside the replayed range of its partition."""
        span = ranges.get((self.topic, self.partition))
        return span is not None and span[0] <= self.first_offset <= span[1]


_ENTRY_FIELDS: dict[str, str] = dict(FileEntry.__annotations__)


def _entry_from(raw: Any, where: str) -> FileEntry:
    if not isinstance(raw, dict) or set(raw) != set(_ENTRY_FIELDS):
        raise InvalidInputError(
            f"manifest {where}: a file entry must have exactly the fields "
            f"{sorted(_ENTRY_FIELDS)}, got {sorted(raw) if isinstance(raw, dict) else raw!r}"
        )
    for name, kind in _ENTRY_FIELDS.items():
        expected = str if kind == "str" else int
        if not isinstance(raw[name], expected) or isinstance(raw[name], bool):
            raise InvalidInputError(
                f"manifest {where}: file field {name!r} expected {expected.__name__}, "
                f"got {raw[name]!r}"
            )
    return FileEntry(**raw)


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files of one hour directory (``_manifest.json``): the archive's truth."""

    directory: HourDir
    files: tuple[FileEntry, ...] = field(default=())
    schema_version: int = SCHEMA_VERSION

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def merge(
        self,
        written: Iterable[FileEntry],
        replayed: Mapping[tuple[str, int], tuple[int, int]],
    ) -> tuple[Manifest, list[FileEntry]]:
        """The manifest after a batch wrote ``written``; and the entries it drops.

        Args:
            written: the files the batch stored in this directory.
            replayed: per (topic, partition), the batch's first and last offset.

        An entry for the same object is replaced. So is every entry of a partition
        whose first offset lies inside the batch's range of that partition: such a
        file was written by a batch whose offsets were never committed (a committed
        file ends before the committed offset, where every batch starts), so its rows
        are archived again by this batch or by the ones after it. A dropped entry
        whose key is not rewritten must be deleted by the caller after the manifest
        is stored.
        """
        new = {entry.key: entry for entry in written}
        kept: list[FileEntry] = []
        dropped: list[FileEntry] = []
        for entry in self.files:
            if entry.key in new:
                continue
            (dropped if entry.overlaps(replayed) else kept).append(entry)
        files = sorted([*kept, *new.values()], key=lambda e: (e.topic, e.partition, e.first_offset))
        return Manifest(self.directory, tuple(files)), dropped

    def to_json(self) -> bytes:
        d = self.directory
        body = {
            "schema_version": self.schema_version,
            "kind": d.kind,
            "source": d.source,
            "date": d.date,
            "hour": d.hour,
            "rows": self.rows,
            "files": [asdict(entry) for entry in self.files],
        }
        return orjson.dumps(body, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes, directory: HourDir, where: str) -> Manifest:
        """Parse a stored manifest of ``directory``; ``where`` names it in errors.

        Raises:
            InvalidInputError: the manifest is not one this version can read.
        """
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidInputError(
                f"manifest {where} is not valid JSON ({exc}); restore it from the bucket's "
                "object versions, or delete it and re-archive the hour from Kafka"
            ) from None
        version = body.get("schema_version") if isinstance(body, dict) else None
        if version != SCHEMA_VERSION or not isinstance(body.get("files"), list):
            raise InvalidInputError(
                f"manifest {where} has schema_version {version!r} and files "
                f"{type(body.get('files')).__name__ if isinstance(body, dict) else '?'}; "
                f"this version reads schema_version {SCHEMA_VERSION} with a list of files"
            )
        files = tuple(_entry_from(raw, where) for raw in body["files"])
        return cls(directory, files)
