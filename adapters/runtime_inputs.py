"""What a worker reloads while it runs: CEP rules, registered schemas, dimension tables.

:class:`RuntimeInputs` keeps a :class:`core.batch.Runtime` current from PostgreSQL.
Rules and schemas are re-read when their version changes (checked every
``rules_refresh_ms``); each enrichment dimension is checked for changes once per TTL
and loaded again only when it changed. All of it happens between micro-batches, so a
batch always sees one consistent set of inputs; a change applies from the next batch
on, without a restart.

A dimension table captured by CDC is checked sooner: the CDC applier publishes the
last LSN it applied of each captured table in Redis (``rayline:cdc:lsn:<schema>.<table>``),
and when that position moves (read at most every ``CDC_CHECK_MS``, one MGET for all
tables), the dimension of the same name (``public`` when it names no schema) is
checked before the next batch, whatever its TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import pyarrow as pa

from adapters.exceptions import StoreUnavailable
from adapters.postgres import MetadataStore
from core.avro import AvroError, SchemaCache, decode, parse_schema_text, validate
from core.batch import Runtime, Validator
from core.cep import load_rules
from core.partition_state import ProcessingConfig
from core.transforms import DimensionCache, TransformError


class InputsConfig(Protocol):
    """What the inputs read of a worker's (or the history job's) configuration."""

    @property
    def processing(self) -> ProcessingConfig: ...
    @property
    def rules_refresh_ms(self) -> int: ...
    @property
    def enrichment_ttl_ms(self) -> int: ...
    @property
    def redis_url(self) -> str | None: ...


log = logging.getLogger(__name__)

CDC_CHECK_MS = 200

CdcPositionReader = Callable[[Sequence[str]], Sequence[str | None]]


class RuntimeInputs:
    """Keeps a worker's :class:`Runtime` current; see the module docstring."""

    def __init__(
        self,
        config: InputsConfig,
        meta: MetadataStore,
        cdc_positions: CdcPositionReader | None = None,
    ) -> None:
        self._meta = meta
        self._refresh_ms = config.rules_refresh_ms
        self._caches = {
            spec.table: DimensionCache(spec, config.enrichment_ttl_ms)
            for spec in config.processing.enrichment
        }
        self._schemas = SchemaCache(meta.schema_text)
        self._rules_version: str | None = None
        self._subjects: dict[str, int] = {}
        self._next_check_ms = 0
        self._closers: list[Callable[[], None]] = []
        if cdc_positions is None and config.redis_url and self._caches:
            from adapters.redis import CdcPositions

            positions = CdcPositions(config.redis_url)
            cdc_positions = positions.read
            self._closers.append(positions.close)
        self._cdc_positions = cdc_positions
        self._cdc_names = {table: _captured_name(table) for table in self._caches}
        self._cdc_seen: dict[str, str | None] | None = None
        self._next_cdc_check_ms = 0

    def refresh(
        self, runtime: Runtime, now_ms: int, force: bool = False
    ) -> tuple[Runtime, list[str] | None]:
        """The runtime with whatever changed; and the rule errors when rules were reloaded."""
        errors = None
        if runtime.avro is None:
            runtime = replace(runtime, avro=self._decode_avro)
        if force or now_ms >= self._next_check_ms:
            runtime, errors = self._refresh_rules(runtime)
            runtime = self._refresh_schemas(runtime)
            self._next_check_ms = now_ms + self._refresh_ms
        dimensions = dict(runtime.dimensions)
        changed = False
        captured = self._captured_changes(now_ms)
        for table, cache in self._caches.items():
            if not (force or table in captured or cache.needs_refresh(now_ms)):
                continue
            try:
                reloaded = cache.update(
                    now_ms, self._meta.dimension_version(table), self._loader(cache)
                )
            except (StoreUnavailable, TransformError) as exc:
                # Enrich with what we had (or nothing) and try again next time.
                problem = f"dimension table {table!r} not refreshed: {exc}"
                log.warning(problem)
                errors = [*(errors or []), problem]
                reloaded = False
            if reloaded or table not in dimensions:
                dimensions[table] = cache.table if cache.version() is not None else _empty(cache)
                changed = True
        if changed:
            runtime = replace(runtime, dimensions=dimensions)
        return runtime, errors

    def _captured_changes(self, now_ms: int) -> set[str]:
        """Dimension tables whose CDC position moved since the last look."""
        if self._cdc_positions is None or now_ms < self._next_cdc_check_ms:
            return set()
        self._next_cdc_check_ms = now_ms + CDC_CHECK_MS
        tables = list(self._cdc_names)
        try:
            marks = self._cdc_positions([self._cdc_names[t] for t in tables])
        except StoreUnavailable as exc:
            log.warning("CDC positions not read, dimensions follow their TTL: %s", exc)
            return set()
        current = dict(zip(tables, marks, strict=True))
        previous, self._cdc_seen = self._cdc_seen, current
        if previous is None:
            return set()
        return {t for t, mark in current.items() if mark != previous.get(t)}

    def _loader(self, cache: DimensionCache) -> Callable[[], pa.Table]:
        spec = cache.spec

        def load() -> pa.Table:
            columns = self._meta.dimension_rows(spec.table, spec.key, spec.columns)
            return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})

        return load

    def _refresh_rules(self, runtime: Runtime) -> tuple[Runtime, list[str] | None]:
        version = self._meta.rules_version()
        if version == self._rules_version:
            return runtime, None
        specs = [spec for spec, enabled in self._meta.rules() if enabled]
        rules, problems = load_rules(specs)
        self._rules_version = version
        for problem in problems:
            log.warning("CEP rule not loaded: %s", problem)
        runtime = replace(runtime, rules=tuple(rules), rules_version=runtime.rules_version + 1)
        return runtime, [str(p) for p in problems]

    def _refresh_schemas(self, runtime: Runtime) -> Runtime:
        subjects = self._meta.subjects()
        ids = {subject: entry[0] for subject, entry in subjects.items()}
        if ids == self._subjects:
            return runtime
        self._subjects = ids
        validators: dict[str, Validator] = {}
        for subject, (_id, _version, text) in subjects.items():
            try:
                validators[subject] = _validator(parse_schema_text(text))
            except AvroError as exc:
                log.warning("schema of subject %s not usable: %s", subject, exc)
        return replace(runtime, validator=_lookup(validators))

    def _decode_avro(self, data: bytes) -> dict[str, Any]:
        return decode(data, self._schemas)[0]

    def close(self) -> None:
        for close in self._closers:
            close()
        self._meta.close()


def _captured_name(table: str) -> str:
    """``schema.table`` of a dimension table as CDC names it."""
    return table if "." in table else f"public.{table}"


def _empty(cache: DimensionCache) -> pa.Table:
    names = [cache.spec.key, *cache.spec.columns]
    return pa.table({name: pa.array([], pa.string()) for name in names})


def _validator(parsed: Any) -> Validator:
    return lambda record: validate(record, parsed)


def _lookup(validators: Mapping[str, Validator]) -> Any:
    return lambda subject: validators.get(subject)
