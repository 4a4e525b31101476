"""OTLP/HTTP profiles exporter: protobuf over HTTP POST, gzip, retries, batch splitting.

Wire rules (OTLP specification, protocol/exporter.md and protocol/otlp.md; REFERENCE.md):

- ``POST {endpoint}`` with ``Content-Type: application/x-protobuf`` exactly (Grafana Pyroscope
  compares the string), the body gzip-compressed with ``Content-Encoding: gzip`` by default.
- 2xx is success. A ``partial_success`` in the response is logged and counted as rejected,
  never retried.
- 429, 502, 503, 504 and connection failures (including timeouts) are retried with
  exponential backoff and jitter, honouring ``Retry-After`` (seconds or an HTTP date), until
  ``max_retries`` or the overall ``max_elapsed_secs`` deadline runs out. Any other status is
  final.
- A batch whose encoded request exceeds ``max_request_bytes`` is split in halves (the
  Collector refuses bodies over 20 MiB by default); a single profile that is still too large
  is dropped and counted.

Settings resolve, first found wins: explicit ``ProfileExporterConfig`` field, then
``OTEL_EXPORTER_OTLP_PROFILES_*``, then ``OTEL_EXPORTER_OTLP_*``, then the default. The
profiles-specific endpoint is used as given; ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL that
gets ``/v1development/profiles`` appended. ``OTEL_EXPORTER_OTLP_TIMEOUT`` is in milliseconds,
as the specification says. Invalid explicit values raise ``ConfigurationError``; invalid
environment values log a warning and fall back.

The api key and headers are secrets: they never appear in a repr, an exception or a log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import math
import os
import random as _random
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import TYPE_CHECKING

import httpx
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)

from ..errors import ConfigurationError
from ..otlp._attributes import AttributeValue, PlainValue
from ..otlp._encode import (
    DEFAULT_SAMPLE_ATTRIBUTE_KEYS,
    Exportable,
    RecordWindow,
    count_profiles,
    encode_profiles,
)
from ..otlp._resource import ResourceConfig, library_version
from ..profiling._heap import outside_private_heap
from ..types import ProfileRecord
from ._base import ExportResult

if TYPE_CHECKING:
    from ..config import Settings

logger = logging.getLogger(__name__)

PROFILES_PATH = "/v1development/profiles"
DEFAULT_ENDPOINT = "http://localhost:4318" + PROFILES_PATH
DEFAULT_TIMEOUT_SECS = 10.0
DEFAULT_COMPRESSION = "gzip"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Well under the Collector's 20 MiB default limit, so one retry-free split is rare."""
CONTENT_TYPE = "application/x-protobuf"
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
COMPRESSIONS = ("gzip", "none")

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_PROFILES_ENDPOINT = "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT"
ENV_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
ENV_PROFILES_HEADERS = "OTEL_EXPORTER_OTLP_PROFILES_HEADERS"
ENV_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
ENV_PROFILES_TIMEOUT = "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT"
ENV_COMPRESSION = "OTEL_EXPORTER_OTLP_COMPRESSION"
ENV_PROFILES_COMPRESSION = "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION"

_WARN_INTERVAL_SECS = 60.0
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


# -- configuration ---------------------------------------------------------------------------


def _endpoint_problem(url: str) -> str | None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parsed.hostname:
        return "must name a host"
    try:
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "has an invalid port"
    return None


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to log (those may hold secrets)."""
    parsed = urllib.parse.urlsplit(url)
    netloc = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def _header_problem(name: object, value: object) -> str | None:
    if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARS:
        return "header names must be non-empty HTTP tokens"
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        return "header values must be strings without CR, LF or NUL"
    return None


@dataclass(frozen=True)
class ProfileExporterConfig:
    """Settings of ``ProfileExporter``; None means "from the environment, else the default".

    Parameters:
        endpoint: full URL of the profiles endpoint, e.g.
            ``http://collector:4318/v1development/profiles`` (default: environment, else
            ``http://localhost:4318/v1development/profiles``).
        api_key: sent as ``Authorization: Bearer <key>`` unless ``headers`` set Authorization.
        headers: extra HTTP headers (merged over the OTEL_* ones).
        timeout_secs: per-attempt timeout in seconds (default 10).
        compression: "gzip" (default) or "none".
        max_retries: retries after the first attempt (0 disables retrying).
        backoff_initial_secs, backoff_max_secs: the exponential backoff range.
        max_elapsed_secs: overall deadline of one export, retries and waits included.
        max_request_bytes: encoded size above which a batch is split in halves.
        merge: merge a batch's ProfileRecords per sample type (True) or send one OTLP
            Profile per record (False, the "per request" mode).
        include_original_payload: attach a BuiltProfile's pprof bytes (off by default).
        service_name, resource_attributes: the Resource; see ``otlp_middleware.otlp``.
        sample_attribute_keys: request attributes copied onto each sample.

    Example::

        config = ProfileExporterConfig(endpoint="https://pyroscope:4040/v1development/profiles",
                                       api_key=os.environ["PYROSCOPE_TOKEN"])
        exporter = ProfileExporter(config)
    """

    endpoint: str | None = None
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] | None = field(default=None, repr=False)
    timeout_secs: float | None = None
    compression: str | None = None
    max_retries: int = 5
    backoff_initial_secs: float = 1.0
    backoff_max_secs: float = 30.0
    max_elapsed_secs: float = 60.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    merge: bool = True
    include_original_payload: bool = False
    service_name: str | None = None
    resource_attributes: Mapping[str, AttributeValue | PlainValue] | None = None
    sample_attribute_keys: tuple[str, ...] = DEFAULT_SAMPLE_ATTRIBUTE_KEYS

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            problem = (
                _endpoint_problem(self.endpoint) if isinstance(self.endpoint, str) else "a URL"
            )
            if problem:
                raise ConfigurationError("endpoint", redact_url(str(self.endpoint)), problem)
        if self.api_key is not None and (
            not isinstance(self.api_key, str)
            or not self.api_key
            or any(c in self.api_key for c in "\r\n\0")
        ):
            raise ConfigurationError("api_key", "<redacted>", "a non-empty string without CR/LF")
        for name, value in (self.headers or {}).items():
            problem = _header_problem(name, value)
            if problem:
                raise ConfigurationError("headers", f"<value of {name!r} redacted>", problem)
        _check_positive("timeout_secs", self.timeout_secs, allow_none=True)
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ConfigurationError("compression", self.compression, "'gzip' or 'none'")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigurationError("max_retries", self.max_retries, "an int >= 0")
        _check_positive("backoff_initial_secs", self.backoff_initial_secs)
        _check_positive("backoff_max_secs", self.backoff_max_secs)
        _check_positive("max_elapsed_secs", self.max_elapsed_secs)
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1024:
            raise ConfigurationError("max_request_bytes", self.max_request_bytes, "an int >= 1024")

    def __repr__(self) -> str:
        parts = [f"endpoint={redact_url(self.endpoint) if self.endpoint else None!r}"]
        if self.api_key:
            parts.append("api_key='<redacted>'")
        if self.headers:
            parts.append(f"headers=<{len(self.headers)} redacted>")
        parts += [
            f"timeout_secs={self.timeout_secs!r}",
            f"compression={self.compression!r}",
            f"max_retries={self.max_retries!r}",
            f"merge={self.merge!r}",
        ]
        return f"ProfileExporterConfig({', '.join(parts)})"


def _check_positive(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(name, value, "a finite number of seconds > 0")


def parse_headers_env(raw: str, variable: str) -> dict[str, str]:
    """Parse ``key1=value1,key2=value2`` (values percent-decoded); skip bad entries, warn.

    The warning names the variable and the entry's position, never its content.
    """
    result: dict[str, str] = {}
    for position, item in enumerate(raw.split(","), start=1):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = urllib.parse.unquote(name.strip())
        value = urllib.parse.unquote(value.strip())
        if not sep or _header_problem(name, value):
            logger.warning("ignoring malformed entry #%d of %s", position, variable)
            continue
        result[name] = value
    return result


@dataclass(frozen=True)
class _Settings:
    endpoint: str
    headers: dict[str, str] = field(repr=False)
    timeout_secs: float
    compression: str


def _resolve(config: ProfileExporterConfig, env: Mapping[str, str]) -> _Settings:
    endpoint = config.endpoint
    if endpoint is None:
        for variable, suffix in ((ENV_PROFILES_ENDPOINT, ""), (ENV_ENDPOINT, PROFILES_PATH)):
            raw = env.get(variable, "").strip()
            if not raw:
                continue
            candidate = raw.rstrip("/") + suffix if suffix else raw
            if _endpoint_problem(candidate) is None:
                endpoint = candidate
                break
            logger.warning(
                "ignoring %s=%r: %s", variable, redact_url(raw), _endpoint_problem(candidate)
            )
    headers = parse_headers_env(env.get(ENV_HEADERS, ""), ENV_HEADERS)
    headers.update(parse_headers_env(env.get(ENV_PROFILES_HEADERS, ""), ENV_PROFILES_HEADERS))
    headers.update(config.headers or {})
    if config.api_key and not any(k.lower() == "authorization" for k in headers):
        headers["Authorization"] = f"Bearer {config.api_key}"

    timeout = config.timeout_secs
    if timeout is None:
        for variable in (ENV_PROFILES_TIMEOUT, ENV_TIMEOUT):
            raw = env.get(variable, "").strip()
            if not raw:
                continue
            try:
                millis = float(raw)
            except ValueError:
                millis = -1.0
            if math.isfinite(millis) and millis > 0:
                timeout = millis / 1000.0
                break
            logger.warning(
                "ignoring %s=%r: must be a positive number of milliseconds", variable, raw
            )
    compression = config.compression
    if compression is None:
        for variable in (ENV_PROFILES_COMPRESSION, ENV_COMPRESSION):
            raw = env.get(variable, "").strip().lower()
            if not raw:
                continue
            if raw in COMPRESSIONS:
                compression = raw
                break
            logger.warning("ignoring %s=%r: must be 'gzip' or 'none'", variable, raw)
    return _Settings(
        endpoint=endpoint or DEFAULT_ENDPOINT,
        headers=headers,
        timeout_secs=timeout if timeout is not None else DEFAULT_TIMEOUT_SECS,
        compression=compression or DEFAULT_COMPRESSION,
    )


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now())


# -- the exporter ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExporterStats:
    """Counters since the exporter was made. Counts are OTLP Profile messages except
    ``dropped``, which counts inputs (records / built profiles) never sent: offered after
    shutdown, or too large even alone. ``retried`` counts extra attempts."""

    exported: int = 0
    failed: int = 0
    retried: int = 0
    rejected: int = 0
    dropped: int = 0


class _WarnLimiter:
    """At most one warning per key per interval; the rest go to debug (background loops)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            loud = last is None or now - last >= _WARN_INTERVAL_SECS
            if loud:
                self._last[key] = now
        logger.log(logging.WARNING if loud else logging.DEBUG, msg, *args)


class ProfileExporter:
    """Sends profiles to an OTLP/HTTP endpoint; the sink behind the background batch queue.

    Parameters:
        config: a ``ProfileExporterConfig`` (default: everything from the environment).
        transport: an ``httpx.BaseTransport`` to use instead of the network (tests, proxies).
        clock: monotonic seconds, for the retry deadline (default ``time.monotonic``).
        sleep: called with the seconds to wait between attempts (default: a wait that
            ``shutdown`` cuts short).
        random: returns a float in [0, 1) for backoff jitter (default ``random.random``).
        environ: the environment to read OTEL_* variables from (default ``os.environ``).

    ``export``/``shutdown`` make it an ``Exporter`` for the batch processor; the methods are
    thread-safe and block (call them off the request path). Example::

        exporter = ProfileExporter(ProfileExporterConfig(endpoint=url))
        result = exporter.export_profile(profile)     # a BuiltProfile or a ProfileRecord
        exporter.shutdown()
    """

    def __init__(
        self,
        config: ProfileExporterConfig | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        random: Callable[[], float] = _random.random,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config if config is not None else ProfileExporterConfig()
        env = os.environ if environ is None else environ
        self._settings = _resolve(self._config, env)
        self._resource = ResourceConfig.resolve(
            self._config.service_name, self._config.resource_attributes, env
        )
        self._transport = transport
        self._clock = clock
        self._random = random
        self._closed = threading.Event()
        self._sleep = sleep if sleep is not None else self._interruptible_sleep
        self._warn = _WarnLimiter(clock)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._counts = {k: 0 for k in ("exported", "failed", "retried", "rejected", "dropped")}
        self._client = self._make_client()
        # Streaming (merge mode, behind the BatchProcessor): the records absorbed so far.
        self._window_lock = threading.Lock()
        self._window = RecordWindow(self._config.sample_attribute_keys)
        if hasattr(os, "register_at_fork"):
            # A forked worker must not share the parent's pooled sockets.
            ref = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: _call_if_alive(ref))

    def _make_client(self) -> httpx.Client:
        headers = {
            "Content-Type": CONTENT_TYPE,
            "User-Agent": f"otlp-middleware/{library_version()}",
        }
        if self._settings.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        headers.update(self._settings.headers)
        return httpx.Client(
            transport=self._transport,
            headers=headers,
            timeout=self._settings.timeout_secs,
            verify=True,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )

    def _after_fork_in_child(self) -> None:
        self.drop_pending()  # the parent's, to send
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._client = self._make_client()  # the parent's client is left alone, not closed

    def _interruptible_sleep(self, seconds: float) -> None:
        with outside_private_heap():  # a back-off: the app's threads allocate unwrapped
            self._closed.wait(seconds)

    # -- public surface --------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The resolved endpoint URL (with any user info or query string removed)."""
        return redact_url(self._settings.endpoint)

    @property
    def timeout_secs(self) -> float:
        """The resolved per-attempt timeout, in seconds."""
        return self._settings.timeout_secs

    @property
    def compression(self) -> str:
        """The resolved compression: "gzip" or "none"."""
        return self._settings.compression

    def __repr__(self) -> str:
        return f"ProfileExporter(endpoint={self.endpoint!r}, compression={self.compression!r})"

    def stats(self) -> ExporterStats:
        """A snapshot of the counters."""
        with self._lock:
            return ExporterStats(**self._counts)

    def export(self, records: Sequence[ProfileRecord]) -> ExportResult:
        """The ``Exporter`` protocol: send a batch of records (as ``export_profiles``).

        After ``absorb`` (the ``BatchProcessor`` in merge mode), the batch is sent with
        the records absorbed since the last export, merged as they came.
        """
        if not self._window.records or not all(isinstance(r, ProfileRecord) for r in records):
            return self.export_profiles(records)  # (the window waits for the next export)
        self.absorb(records)
        with self._window_lock:
            window, self._window = self._window, RecordWindow(self._config.sample_attribute_keys)
        if not window.records:
            return ExportResult(success=True)
        return self._export_requests(window.records, lambda: self._window_request(window))

    # -- streaming: the BatchProcessor hands records over as they come (see export._batch)

    @property
    def streaming(self) -> bool:
        """Whether records are merged as they are handed over (``merge``, the default)."""
        return self._config.merge

    @property
    def pending(self) -> int:
        """Records absorbed and not sent yet."""
        return self._window.records

    @property
    def window_full(self) -> bool:
        """Whether the absorbed records may make a request near ``max_request_bytes``."""
        return self._window.estimated_bytes() > self._config.max_request_bytes // 2

    def absorb(self, records: Sequence[ProfileRecord]) -> None:
        """Merge ``records`` into the request the next ``export`` sends (merge mode)."""
        if not self.streaming:
            raise ValueError("absorb() needs merge=True")
        with self._window_lock:
            window = self._window
            for r in records:
                try:
                    window.add(r)
                except Exception:  # a bug while encoding: this record is lost, not the rest
                    self._count(dropped=1)
                    logger.warning("could not encode a profile; dropped", exc_info=True)

    def drop_pending(self) -> None:
        """Forget the absorbed records: a forked child's (they are its parent's to send).

        Takes no lock: the parent's thread that may have held it does not exist in the
        child; the lock is made anew.
        """
        self._window_lock = threading.Lock()
        self._window = RecordWindow(self._config.sample_attribute_keys)

    def _window_request(
        self, window: RecordWindow
    ) -> Iterator[tuple[ExportProfilesServiceRequest | None, ExportResult]]:
        """The window's one request; over ``max_request_bytes`` it is dropped, as there are
        no records left to split (``window_full`` has the window sent well before)."""
        request = window.request(self._resource)
        size = request.ByteSize()
        if size <= self._config.max_request_bytes:
            if count_profiles(request):
                yield request, ExportResult(success=True)
            return
        with self._lock:
            self._counts["dropped"] += window.records
        self._warn.warning(
            "too-large",
            "dropping %d merged profiles of %d encoded bytes: over max_request_bytes=%d",
            window.records,
            size,
            self._config.max_request_bytes,
        )
        yield None, ExportResult(success=False, error_message="profiles too large")

    def export_profile(self, profile: Exportable) -> ExportResult:
        """Send one ``BuiltProfile`` or ``ProfileRecord``."""
        return self.export_profiles([profile])

    def export_profiles(self, profiles: Sequence[Exportable]) -> ExportResult:
        """Send a batch as one request (or several, when it is over the size limit).

        Returns an ``ExportResult``: ``success`` is False if any part was lost; ``exported``
        and ``rejected`` count OTLP Profile messages. Never raises for network problems.
        """
        items = [p for p in profiles if not (isinstance(p, ProfileRecord) and p.is_empty)]
        if not items:
            return ExportResult(success=True)
        return self._export_requests(len(items), lambda: self._requests(items))

    def _export_requests(
        self,
        n: int,
        requests: Callable[[], Iterator[tuple[ExportProfilesServiceRequest | None, ExportResult]]],
    ) -> ExportResult:
        """Send the ``requests()`` of ``n`` profiles; one result for them all."""
        with self._lock:
            if self._closed.is_set():
                self._counts["dropped"] += n
                return ExportResult(success=False, error_message="exporter is shut down")
            self._inflight += 1
        results: list[ExportResult] = []
        try:
            for request, dropped in requests():
                results.append(self._send(request) if request is not None else dropped)
        except Exception as exc:  # a bug while encoding must not kill the export thread
            self._count(dropped=n)
            logger.warning("could not encode %d profiles; dropped", n, exc_info=True)
            results.append(ExportResult(False, error_message=f"encoding failed: {exc!r}"))
        finally:
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()
        return ExportResult(
            success=all(r.success for r in results),
            exported=sum(r.exported for r in results),
            rejected=sum(r.rejected for r in results),
            retries=sum(r.retries for r in results),
            error_message="; ".join(r.error_message for r in results if r.error_message),
        )

    async def aexport_profile(self, profile: Exportable) -> ExportResult:
        """Awaitable ``export_profile``: runs in a worker thread, the event loop stays free."""
        return await asyncio.to_thread(self.export_profiles, [profile])

    async def aexport_profiles(self, profiles: Sequence[Exportable]) -> ExportResult:
        """Awaitable ``export_profiles``: runs in a worker thread, the event loop stays free."""
        return await asyncio.to_thread(self.export_profiles, list(profiles))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting exports, cut retry waits short, wait up to ``timeout`` seconds for
        exports in flight, then close the connection pool. Safe to call twice."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            first = not self._closed.is_set()
            self._closed.set()
            while self._inflight and (remaining := deadline - time.monotonic()) > 0:
                self._idle.wait(remaining)
            counts = dict(self._counts)
        if first:
            self._client.close()
            logger.info(
                "OTLP profiles exporter to %s shut down: exported=%d rejected=%d failed=%d "
                "retried=%d dropped=%d",
                self.endpoint,
                counts["exported"],
                counts["rejected"],
                counts["failed"],
                counts["retried"],
                counts["dropped"],
            )

    def __enter__(self) -> ProfileExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals -------------------------------------------------------------------------

    def _encode(self, items: Sequence[Exportable]) -> ExportProfilesServiceRequest:
        c = self._config
        return encode_profiles(
            items,
            resource=self._resource,
            merge=c.merge,
            include_original_payload=c.include_original_payload,
            sample_attribute_keys=c.sample_attribute_keys,
        )

    def _requests(
        self, items: Sequence[Exportable]
    ) -> Iterator[tuple[ExportProfilesServiceRequest | None, ExportResult]]:
        """Requests within the size limit: halve the batch until each part fits."""
        request = self._encode(items)
        size = request.ByteSize()
        if size <= self._config.max_request_bytes:
            if count_profiles(request):
                yield request, ExportResult(success=True)
            return
        if len(items) == 1:
            with self._lock:
                self._counts["dropped"] += 1
            self._warn.warning(
                "too-large",
                "dropping a profile of %d encoded bytes: over max_request_bytes=%d",
                size,
                self._config.max_request_bytes,
            )
            yield None, ExportResult(success=False, error_message="profile too large")
            return
        logger.debug("splitting a batch of %d (%d bytes) in two", len(items), size)
        half = len(items) // 2
        yield from self._requests(items[:half])
        yield from self._requests(items[half:])

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def _backoff(self, attempt: int) -> float:
        # Exponential, capped, with "equal jitter": [base/2, base).
        base = min(self._config.backoff_max_secs, self._config.backoff_initial_secs * 2.0**attempt)
        return base / 2 + self._random() * base / 2

    def _send(self, request: ExportProfilesServiceRequest) -> ExportResult:
        n = count_profiles(request)
        body = request.SerializeToString()
        if self._settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=6, mtime=0)
        endpoint = self._settings.endpoint
        deadline = self._clock() + self._config.max_elapsed_secs
        retries = 0
        while True:
            remaining = deadline - self._clock()
            retry_after: float | None = None
            try:
                # In the private heap still (the BatchProcessor's thread): the client's
                # objects kept from one request to the next stay out of the app's pools.
                response = self._client.post(
                    endpoint,
                    content=body,
                    timeout=min(self._settings.timeout_secs, max(remaining, 0.001)),
                )
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._accepted(response, n, retries)
                reason = f"HTTP {status}"
                if status not in RETRYABLE_STATUS:
                    self._count(failed=n)
                    self._warn.warning(
                        f"status-{status}",
                        "OTLP profiles export to %s failed with HTTP %d (not retried): %d "
                        "profiles lost",
                        self.endpoint,
                        status,
                        n,
                    )
                    return ExportResult(False, retries=retries, error_message=reason)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            delay = retry_after if retry_after is not None else self._backoff(retries)
            give_up = (
                "retries exhausted"
                if retries >= self._config.max_retries
                else "shut down"
                if self._closed.is_set()
                else "deadline exceeded"
                if self._clock() + delay >= deadline
                else None
            )
            if give_up is None:
                logger.debug("retrying export in %.2fs after %s", delay, reason)
                retries += 1
                self._count(retried=1)
                self._sleep(delay)
                if not self._closed.is_set():
                    continue
                give_up = "shut down"
            self._count(failed=n)
            self._warn.warning(
                "gave-up",
                "OTLP profiles export to %s failed (%s, %s after %d retries): %d profiles lost",
                self.endpoint,
                reason,
                give_up,
                retries,
                n,
            )
            return ExportResult(False, retries=retries, error_message=f"{reason} ({give_up})")

    def _accepted(self, response: httpx.Response, n: int, retries: int) -> ExportResult:
        rejected, message = 0, ""
        if response.content:
            try:
                partial = ExportProfilesServiceResponse.FromString(response.content).partial_success
                rejected, message = partial.rejected_profiles, partial.error_message
            except DecodeError:
                logger.debug("ignoring an undecodable success response body")
        rejected = min(max(rejected, 0), n)
        if rejected or message:
            self._warn.warning(
                "partial",
                "OTLP receiver %s rejected %d of %d profiles: %s",
                self.endpoint,
                rejected,
                n,
                message or "(no message)",
            )
        self._count(exported=n - rejected, rejected=rejected)
        return ExportResult(
            True, exported=n - rejected, rejected=rejected, retries=retries, error_message=message
        )


def _call_if_alive(ref: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = ref()
    if method is not None:
        method()


def exporter_from_settings(settings: Settings) -> ProfileExporter:
    """The exporter the middleware uses when ``settings.endpoint`` is set.

    ``Settings`` has already merged explicit options, framework settings and the OTEL_*
    environment, so the exporter reads no environment of its own (``environ={}``).
    ``settings.timeout`` bounds one attempt; ``settings.export_timeout`` the whole export.
    """
    config = ProfileExporterConfig(
        endpoint=settings.endpoint,
        api_key=settings.api_key,
        headers=dict(settings.headers),
        timeout_secs=settings.timeout,
        compression=settings.compression,
        max_elapsed_secs=settings.export_timeout,
        merge=not settings.profile_per_request,
        service_name=settings.service_name,
        resource_attributes=dict(settings.resource_attributes),
    )
    return ProfileExporter(config, environ={})
