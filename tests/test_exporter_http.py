"""ProfileExporter against a real loopback HTTP server: wire format, retries, limits, secrets.

The server is scripted (a list of replies, the last one repeating) and records every request
it gets. Retry waits go through an injected clock and sleep, so no test waits for a backoff.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import http.server
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesPartialSuccess,
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)

from otlp_middleware.errors import ConfigurationError
from otlp_middleware.export._base import Exporter
from otlp_middleware.export._otlp_http import (
    ExporterStats,
    ProfileExporter,
    ProfileExporterConfig,
    parse_retry_after,
)
from otlp_middleware.otlp import ProfileBuilder, encode_profiles, generate_profile_id
from otlp_middleware.types import ProfileRecord

from .test_otlp_encode import check_request, make_record, pprof_with_labels
from .workloads import wait_until

pytestmark = pytest.mark.server

PATH = "/v1development/profiles"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False


@dataclass
class Captured:
    path: str
    headers: dict[str, str]
    body: bytes

    def decoded(self) -> ExportProfilesServiceRequest:
        data = self.body
        if self.headers.get("content-encoding") == "gzip":
            data = gzip.decompress(data)
        return ExportProfilesServiceRequest.FromString(data)


class ScriptedServer(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[Captured] = []
        self.got_request = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{PATH}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_reply(self, captured: Captured) -> Reply:
        with self.lock:
            self.requests.append(captured)
            index = min(len(self.requests), len(self.replies)) - 1
        self.got_request.set()
        return self.replies[index]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left is expected here


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.next_reply(Captured(self.path, headers, body))
        if reply.stall:
            self.server.release.wait(10)
        self.close_connection = True
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[tuple[ScriptedServer, threading.Thread]] = []

    def start(*replies: Reply) -> ScriptedServer:
        server = ScriptedServer(list(replies) or [Reply()])
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


class FakeTime:
    """A clock that only moves when the exporter sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def exporter_for(fake_time: FakeTime) -> Iterator[Callable[..., ProfileExporter]]:
    made: list[ProfileExporter] = []

    def make(
        url: str | None, *, environ: dict[str, str] | None = None, **config: Any
    ) -> ProfileExporter:
        exporter = ProfileExporter(
            ProfileExporterConfig(endpoint=url, **config),
            clock=fake_time.clock,
            sleep=fake_time.sleep,
            random=lambda: 0.0,
            environ={} if environ is None else environ,
        )
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.shutdown(timeout=1)


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{PATH}"


def ok_body(rejected: int = 0, message: str = "") -> bytes:
    response = ExportProfilesServiceResponse()
    if rejected or message:
        response.partial_success.CopyFrom(
            ExportProfilesPartialSuccess(rejected_profiles=rejected, error_message=message)
        )
    return bytes(response.SerializeToString())


# -- wire format -----------------------------------------------------------------------------


def test_posts_gzip_protobuf_with_exact_content_type(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(body=ok_body()))
    exporter = exporter_for(server.url, api_key="k-123")
    result = exporter.export([make_record(), make_record()])
    assert result.success and result.exported == 3 and result.retries == 0
    (request,) = server.requests
    assert request.path == PATH
    assert request.headers["content-type"] == "application/x-protobuf"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["authorization"] == "Bearer k-123"
    assert request.headers["user-agent"].startswith("otlp-middleware/")
    assert request.body[:2] == b"\x1f\x8b"
    check_request(request.decoded())
    assert exporter.stats() == ExporterStats(exported=3)


def test_compression_none_sends_the_raw_protobuf(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    exporter = exporter_for(server.url, compression="none")
    assert exporter.export_profile(make_record()).success
    (request,) = server.requests
    assert "content-encoding" not in request.headers
    check_request(ExportProfilesServiceRequest.FromString(request.body))


def test_built_profiles_and_records_in_one_export(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    built = ProfileBuilder(generate_profile_id()).build(pprof_with_labels())
    exporter = exporter_for(server.url, include_original_payload=True)
    assert exporter.export_profiles([built, make_record()]).exported == 6
    decoded = server.requests[0].decoded()
    check_request(decoded)
    payloads = [
        p.original_payload
        for rp in decoded.resource_profiles
        for sp in rp.scope_profiles
        for p in sp.profiles
    ]
    assert payloads.count(built.pprof_bytes()) == 3 and payloads.count(b"") == 3


def test_nothing_is_sent_for_records_without_samples(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    result = exporter_for(server.url).export([make_record(cpu=[])])
    assert result.success and result.exported == 0
    assert server.requests == []


def test_an_unencodable_record_is_dropped_not_raised(serve, exporter_for, caplog) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    broken = make_record()
    broken.cpu_samples = [broken.cpu_samples[0]._replace(stack=(10**12,))]  # unknown frame id
    exporter = exporter_for(server.url)
    with caplog.at_level(logging.WARNING, logger="otlp_middleware"):
        result = exporter.export([broken])
    assert not result.success and "encoding failed" in result.error_message
    assert exporter.stats() == ExporterStats(dropped=1)
    assert server.requests == [] and "could not encode" in caplog.text


def test_is_an_exporter_for_the_batch_processor(exporter_for) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(exporter_for(None), Exporter)


def test_async_export(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    exporter = exporter_for(server.url)

    async def main() -> tuple[bool, bool]:
        one = await exporter.aexport_profile(make_record())
        many = await exporter.aexport_profiles([make_record(), make_record()])
        return one.success, many.success

    assert asyncio.run(main()) == (True, True)
    assert len(server.requests) == 2


# -- the failure matrix ----------------------------------------------------------------------


def test_connection_refused_is_retried_with_exponential_backoff(
    exporter_for, fake_time: FakeTime
) -> None:  # type: ignore[no-untyped-def]
    exporter = exporter_for(refused_url(), max_retries=3, backoff_initial_secs=1.0)
    result = exporter.export([make_record()])
    assert not result.success and result.retries == 3
    assert "ConnectError" in result.error_message
    # random() == 0 gives the low end of the jitter range: half of 1, 2, 4 seconds.
    assert fake_time.sleeps == [0.5, 1.0, 2.0]
    assert exporter.stats() == ExporterStats(failed=3, retried=3)


def test_jitter_stays_within_the_backoff_range(fake_time: FakeTime) -> None:
    exporter = ProfileExporter(
        ProfileExporterConfig(endpoint=refused_url(), max_retries=4, backoff_max_secs=3.0),
        clock=fake_time.clock,
        sleep=fake_time.sleep,
        random=lambda: 0.999,
        environ={},
    )
    with exporter:
        exporter.export([make_record()])
    assert [round(s, 2) for s in fake_time.sleeps] == [1.0, 2.0, 3.0, 3.0]


def test_503_with_retry_after_then_200(serve, exporter_for, fake_time: FakeTime) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(503, headers={"Retry-After": "7"}), Reply(200, ok_body()))
    exporter = exporter_for(server.url)
    result = exporter.export([make_record()])
    assert result.success and result.retries == 1 and result.exported == 3
    assert fake_time.sleeps == [7.0]
    assert len(server.requests) == 2
    assert server.requests[0].body == server.requests[1].body
    assert exporter.stats() == ExporterStats(exported=3, retried=1)


def test_retry_after_as_http_date(serve, exporter_for, fake_time: FakeTime) -> None:  # type: ignore[no-untyped-def]
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server = serve(Reply(503, headers={"Retry-After": when}), Reply(200))
    assert exporter_for(server.url).export([make_record()]).success
    (slept,) = fake_time.sleeps
    assert 20 < slept <= 30


def test_parse_retry_after() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0


@pytest.mark.parametrize("status", [429, 502, 504])
def test_other_retryable_statuses(serve, exporter_for, fake_time: FakeTime, status: int) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(status), Reply(200))
    result = exporter_for(server.url).export([make_record()])
    assert result.success and result.retries == 1
    assert fake_time.sleeps == [0.5]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 500])
def test_other_statuses_are_never_retried(
    serve, exporter_for, fake_time: FakeTime, status: int
) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(status))
    exporter = exporter_for(server.url)
    result = exporter.export([make_record()])
    assert not result.success and result.retries == 0
    assert result.error_message == f"HTTP {status}"
    assert len(server.requests) == 1 and fake_time.sleeps == []
    assert exporter.stats() == ExporterStats(failed=3)


def test_retries_stop_at_max_retries(serve, exporter_for, fake_time: FakeTime) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(503))
    result = exporter_for(server.url, max_retries=2).export([make_record()])
    assert not result.success and "retries exhausted" in result.error_message
    assert len(server.requests) == 3


def test_retry_after_beyond_the_deadline_gives_up_without_waiting(
    serve, exporter_for, fake_time: FakeTime
) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(429, headers={"Retry-After": "120"}))
    result = exporter_for(server.url, max_elapsed_secs=60).export([make_record()])
    assert not result.success and "deadline" in result.error_message
    assert fake_time.sleeps == [] and len(server.requests) == 1


def test_partial_success_is_counted_and_not_retried(
    serve, exporter_for, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(200, ok_body(rejected=2, message="bad stacks")))
    exporter = exporter_for(server.url)
    with caplog.at_level(logging.WARNING, logger="otlp_middleware"):
        result = exporter.export([make_record()])
    assert result.success and result.exported == 1 and result.rejected == 2
    assert result.error_message == "bad stacks"
    assert len(server.requests) == 1
    assert "rejected 2 of 3 profiles: bad stacks" in caplog.text
    assert exporter.stats() == ExporterStats(exported=1, rejected=2)


def test_a_stalled_server_times_out(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(stall=True))
    config = ProfileExporterConfig(endpoint=server.url, timeout_secs=0.2, max_retries=0)
    with ProfileExporter(config, environ={}) as exporter:
        result = exporter.export([make_record()])
    assert not result.success and "Timeout" in result.error_message
    assert exporter.stats().failed == 3


def test_shutdown_cuts_a_retry_wait_short(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(503, headers={"Retry-After": "30"}))
    exporter = ProfileExporter(ProfileExporterConfig(endpoint=server.url), environ={})
    results = []
    worker = threading.Thread(target=lambda: results.append(exporter.export([make_record()])))
    worker.start()
    assert server.got_request.wait(10)
    exporter.shutdown(timeout=10)
    worker.join(10)
    assert not worker.is_alive()
    (result,) = results
    assert not result.success and "shut down" in result.error_message
    after = exporter.export([make_record()])
    assert not after.success and exporter.stats().dropped == 1


def test_a_batch_over_the_size_limit_is_split(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    def record(tag: str) -> ProfileRecord:
        names = tuple(f"{tag}_function_with_a_long_descriptive_name_{i}" for i in range(6))
        return make_record(cpu=[(names, 1)])

    records = [record("a"), record("b")]
    limit = 1500
    assert encode_profiles(records).ByteSize() > limit
    assert all(encode_profiles([r]).ByteSize() <= limit for r in records)
    server = serve()
    exporter = exporter_for(server.url, max_request_bytes=limit)
    result = exporter.export(records)
    assert result.success and result.exported == 6
    assert len(server.requests) == 2
    for request in server.requests:
        decoded = request.decoded()
        check_request(decoded)
        assert decoded.ByteSize() <= limit


def test_a_single_profile_over_the_limit_is_dropped(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    names = tuple(f"function_with_a_very_long_descriptive_name_{i}" for i in range(40))
    server = serve()
    exporter = exporter_for(server.url, max_request_bytes=1024)
    result = exporter.export([make_record(cpu=[(names, 1)]), make_record()])
    assert not result.success and result.exported == 3
    assert "too large" in result.error_message
    assert exporter.stats() == ExporterStats(exported=3, dropped=1)
    assert len(server.requests) == 1


def test_exporting_to_the_real_receiver(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from otlp_middleware._receiver import Receiver

    with Receiver(port=0, output_dir=tmp_path) as receiver:
        with ProfileExporter(ProfileExporterConfig(endpoint=receiver.url), environ={}) as ex:
            assert ex.export([make_record(), make_record(heap=1)]).exported == 7
        assert receiver.profiles_received == 7 and receiver.profiles_rejected == 0
    assert len(list(tmp_path.glob("*.pb.gz"))) == 7


# -- configuration -------------------------------------------------------------------------


def test_endpoint_resolution(exporter_for) -> None:  # type: ignore[no-untyped-def]
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert exporter_for(None, environ=env).endpoint == "http://collector:4318" + PATH
    env["OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT"] = "https://p:4040/custom"
    assert exporter_for(None, environ=env).endpoint == "https://p:4040/custom"
    assert exporter_for("http://explicit:1/x", environ=env).endpoint == "http://explicit:1/x"
    assert exporter_for(None).endpoint == "http://localhost:4318" + PATH


def test_base_endpoint_from_the_real_environment(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.base_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=team%20a,x-other=1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROFILES_HEADERS", "x-other=2")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    with ProfileExporter() as exporter:
        assert exporter.export([make_record()]).success
    (request,) = server.requests
    assert request.path == PATH
    assert request.headers["x-tenant"] == "team a" and request.headers["x-other"] == "2"
    resource = request.decoded().resource_profiles[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "from-env"


def test_invalid_environment_values_warn_and_fall_back(
    exporter_for, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    env = {
        "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "ftp://nope",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://good:4318",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli",
        "OTEL_EXPORTER_OTLP_HEADERS": "novalue,x-ok=1",
    }
    with caplog.at_level(logging.WARNING):
        exporter = exporter_for(None, environ=env)
    assert exporter.endpoint == "http://good:4318" + PATH
    assert exporter.timeout_secs == 10.0
    assert exporter.compression == "gzip"
    for variable in ("PROFILES_ENDPOINT", "OTLP_TIMEOUT", "OTLP_COMPRESSION", "OTLP_HEADERS"):
        assert variable in caplog.text


def test_timeout_and_compression_from_environment(exporter_for) -> None:  # type: ignore[no-untyped-def]
    env = {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT": "500",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
    }
    exporter = exporter_for(None, environ=env)
    assert exporter.timeout_secs == 0.5 and exporter.compression == "none"
    explicit = exporter_for(None, environ=env, timeout_secs=3.0, compression="gzip")
    assert explicit.timeout_secs == 3.0 and explicit.compression == "gzip"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint", "localhost:4318"),
        ("endpoint", "http://"),
        ("endpoint", "http://host:99999/x"),
        ("timeout_secs", 0),
        ("timeout_secs", float("inf")),
        ("compression", "zstd"),
        ("max_retries", -1),
        ("max_request_bytes", 10),
        ("backoff_initial_secs", -1.0),
        ("max_elapsed_secs", 0),
    ],
)
def test_invalid_explicit_settings_raise(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        ProfileExporterConfig(**{field: value})
    assert info.value.field == field


def test_exporter_from_settings(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from otlp_middleware.config import Settings
    from otlp_middleware.export._otlp_http import exporter_from_settings

    server = serve()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.base_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1500")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "env-name")
    settings = Settings.load(api_key="k", service_name="explicit", profile_per_request=True)
    with exporter_from_settings(settings) as exporter:
        assert exporter.endpoint == server.url and exporter.timeout_secs == 1.5
        a, b = make_record(), make_record()
        assert exporter.export([a, b]).exported == 6
    (request,) = server.requests
    assert request.headers["authorization"] == "Bearer k"
    decoded = request.decoded()
    resource = decoded.resource_profiles[0].resource
    assert {x.key: x.value.string_value for x in resource.attributes}["service.name"] == "explicit"
    ids = {p.profile_id for p in decoded.resource_profiles[0].scope_profiles[0].profiles}
    assert ids == {a.profile_id, b.profile_id}  # one Profile per request


def test_api_key_does_not_override_an_explicit_authorization(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    exporter = exporter_for(server.url, api_key="key", headers={"Authorization": "Basic abc"})
    exporter.export([make_record()])
    assert server.requests[0].headers["authorization"] == "Basic abc"


# -- secrets -------------------------------------------------------------------------------


SECRETS = ("sk-SECRET-api-key", "tok-SECRET-header", "env-SECRET-header")


def test_secrets_never_reach_logs_or_reprs(
    serve, caplog: pytest.LogCaptureFixture, fake_time: FakeTime
) -> None:  # type: ignore[no-untyped-def]
    server = serve(Reply(401), Reply(503), Reply(200, ok_body(rejected=1, message="no")))
    config = ProfileExporterConfig(
        endpoint=server.url + "?token=url-SECRET",
        api_key=SECRETS[0],
        headers={"X-Api-Token": SECRETS[1]},
        max_retries=1,
    )
    with caplog.at_level(logging.DEBUG):
        exporter = ProfileExporter(
            config,
            clock=fake_time.clock,
            sleep=fake_time.sleep,
            environ={"OTEL_EXPORTER_OTLP_HEADERS": f"x-env={SECRETS[2]},broken"},
        )
        for _ in range(3):
            exporter.export([make_record()])
        exporter.export([make_record()])  # the 200 with a partial success
        exporter.shutdown()
        with pytest.raises(ConfigurationError) as bad_header:
            ProfileExporterConfig(headers={"X-Api-Token": SECRETS[1] + "\n"})
        with pytest.raises(ConfigurationError) as bad_key:
            ProfileExporterConfig(api_key=SECRETS[0] + "\r\n")
    # The secrets were really sent...
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRETS[0]}"
    assert server.requests[0].headers["x-api-token"] == SECRETS[1]
    assert server.requests[0].headers["x-env"] == SECRETS[2]
    # ...and appear nowhere else.
    texts = [
        caplog.text,
        repr(config),
        str(config),
        repr(exporter),
        exporter.endpoint,
        str(bad_header.value),
        str(bad_key.value),
    ]
    assert "401" in caplog.text  # the failures were logged
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    # A token in the URL is out of our hands once httpx logs the request line (at INFO, on
    # the "httpx" logger), but this library's own logs and reprs strip the query string.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("otlp_middleware")]
    assert ours and not any("url-SECRET" in text for text in [*ours, *texts[1:]])


# -- streaming: records merged as the batch processor hands them over --------------------


def _without_ids(request: ExportProfilesServiceRequest) -> ExportProfilesServiceRequest:
    out = ExportProfilesServiceRequest()
    out.CopyFrom(request)
    for rp in out.resource_profiles:
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                p.profile_id = b""  # a fresh batch id per encoding
    return out


def test_a_record_window_encodes_what_the_batch_would() -> None:
    from otlp_middleware.otlp import RecordWindow, ResourceConfig

    resource = ResourceConfig.resolve(environ={})
    records = [make_record(), make_record(heap=2), make_record(cpu=[]), make_record(link=None)]
    window = RecordWindow()
    assert [window.add(r) for r in records] == [True, True, False, True]
    assert (window.records, window.samples) == (3, 5)
    got = window.request(resource)
    check_request(got)
    assert _without_ids(got) == _without_ids(encode_profiles(records, resource=resource))
    assert window.estimated_bytes() >= got.ByteSize()


def test_absorbed_records_go_in_one_request_at_the_next_export(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    import weakref

    server = serve(Reply(body=ok_body()), Reply(body=ok_body()))
    exporter = exporter_for(server.url)
    assert exporter.streaming and exporter.pending == 0
    records = [make_record() for _ in range(3)]
    refs = [weakref.ref(r) for r in records]
    exporter.absorb(records[:2])
    del records[:2]
    assert exporter.pending == 2 and [r() for r in refs[:2]] == [None, None]
    assert server.requests == []  # nothing sent before the export
    result = exporter.export(records)
    assert result.success and result.exported == 3 and exporter.pending == 0
    (request,) = server.requests
    decoded = request.decoded()
    check_request(decoded)
    (cpu,) = [
        p
        for rp in decoded.resource_profiles
        for sp in rp.scope_profiles
        for p in sp.profiles
        if decoded.dictionary.string_table[p.sample_type.type_strindex] == "samples"
    ]
    assert sum(s.values[0] for s in cpu.samples) == 3


def test_an_absorbed_window_over_the_limit_is_dropped_and_counted(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    names = tuple(f"function_with_a_very_long_descriptive_name_{i}" for i in range(40))
    server = serve()
    exporter = exporter_for(server.url, max_request_bytes=1024)
    exporter.absorb([make_record(cpu=[(names, 1)]), make_record()])
    assert exporter.window_full  # the batch processor would have sent it by now
    result = exporter.export([])
    assert not result.success and "too large" in result.error_message
    assert exporter.stats() == ExporterStats(dropped=2) and server.requests == []


def test_an_unencodable_record_is_dropped_alone_when_absorbed(serve, exporter_for) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    broken = make_record()
    broken.cpu_samples = [broken.cpu_samples[0]._replace(stack=(10**12,))]  # unknown frame id
    exporter = exporter_for(server.url)
    exporter.absorb([broken, make_record()])
    assert exporter.pending == 1 and exporter.stats().dropped == 1
    assert exporter.export([]).exported == 3
    check_request(server.requests[0].decoded())


def test_the_batch_processor_streams_to_the_exporter(serve) -> None:  # type: ignore[no-untyped-def]
    from otlp_middleware.export import BatchProcessor

    server = serve(*[Reply(body=ok_body())] * 4)
    exporter = ProfileExporter(ProfileExporterConfig(endpoint=server.url), environ={})
    processor = BatchProcessor(exporter, schedule_delay=30)
    try:
        for _ in range(4):
            processor.emit(make_record())
        wait_until(lambda: exporter.pending >= 4, 10, processor.stats)
        assert server.requests == []
        assert processor.force_flush(10)
        assert len(server.requests) == 1 and processor.stats().queued == 0
        check_request(server.requests[0].decoded())
    finally:
        processor.shutdown(10)
    assert processor.stats().failed == 0 and exporter.stats().exported == 3


def test_a_window_near_the_size_limit_is_sent_without_waiting(serve) -> None:  # type: ignore[no-untyped-def]
    from otlp_middleware.export import BatchProcessor

    server = serve(*[Reply(body=ok_body())] * 8)
    exporter = ProfileExporter(
        ProfileExporterConfig(endpoint=server.url, max_request_bytes=200_000), environ={}
    )
    processor = BatchProcessor(exporter, schedule_delay=30)
    try:
        for _ in range(40):  # each sample may add a 128-frame stack: full after ~16
            processor.emit(make_record())
        wait_until(lambda: server.requests, 10, processor.stats)
    finally:
        processor.shutdown(10)
    assert all(r.decoded().ByteSize() <= 200_000 for r in server.requests)
    assert processor.stats().failed == 0
