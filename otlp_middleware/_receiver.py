"""A local OTLP/HTTP profiles receiver for development: ``otlp-middleware receive``.

It listens (127.0.0.1:4318 by default) for ``POST /v1development/profiles`` with a protobuf
``ExportProfilesServiceRequest`` (gzip-compressed or not), decodes it with the official
opentelemetry-proto classes, writes each OTLP Profile back as a gzip pprof file
(``<batch>-<profile>-<service>-<type>.pb.gz``) in the output folder, and logs one line per
batch. Answers follow the OTLP/HTTP specification:

- 200 with an ``ExportProfilesServiceResponse``; profiles that cannot be converted (bad
  dictionary indices, ...) are counted in ``partial_success.rejected_profiles``;
- 400 for a body that is not a valid (or validly compressed) request;
- 415 for a Content-Type other than ``application/x-protobuf``; 413 for a body too large;
- 404 for any other path, 405 for another method.

Only the standard library's ``http.server`` serves it; it is a development tool, not a
collector. In tests and demos use the ``Receiver`` class::

    with Receiver(port=0, output_dir=tmp_path) as receiver:
        exporter = ProfileExporter(ProfileExporterConfig(endpoint=receiver.url))
        ...
        assert receiver.profiles_received > 0
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.server
import logging
import os
import re
import signal
import socket
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesPartialSuccess,
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Profile, ProfilesDictionary

from .pprof import profile_pb2 as pprof

logger = logging.getLogger(__name__)

PROFILES_PATH = "/v1development/profiles"
CONTENT_TYPE = "application/x-protobuf"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4318
DEFAULT_OUTPUT_DIR = "received"
MAX_BODY_BYTES = 64 * 1024 * 1024

BatchCallback = Callable[[ExportProfilesServiceRequest], None]


# -- OTLP -> pprof -------------------------------------------------------------------------


class ConversionError(ValueError):
    """An OTLP Profile that cannot be turned into pprof (it references missing entries)."""


def _at(table: Any, index: int, what: str) -> Any:
    if not 0 <= index < len(table):
        raise ConversionError(f"{what} index {index} out of range (table has {len(table)})")
    return table[index]


def otlp_to_pprof(profile: Profile, dictionary: ProfilesDictionary) -> pprof.Profile:
    """Convert one OTLP Profile (one sample type) to a pprof Profile.

    Sample attributes become labels (strings as ``str``, ints as ``num`` with their unit);
    a sample's link becomes ``trace_id`` and ``span_id`` labels (hex), as Pyroscope does.
    Raises ``ConversionError`` when an index points outside its dictionary table.
    """
    d = dictionary
    if not d.string_table or d.string_table[0] != "":
        raise ConversionError("string_table[0] must be the empty string")
    out = pprof.Profile()
    strings: dict[str, int] = {}

    def s(value: str) -> int:
        idx = strings.get(value)
        if idx is None:
            idx = strings[value] = len(out.string_table)
            out.string_table.append(value)
        return idx

    def ds(index: int) -> str:
        return str(_at(d.string_table, index, "string"))

    s("")
    out.sample_type.append(
        pprof.ValueType(
            type=s(ds(profile.sample_type.type_strindex)),
            unit=s(ds(profile.sample_type.unit_strindex)),
        )
    )
    out.period_type.CopyFrom(
        pprof.ValueType(
            type=s(ds(profile.period_type.type_strindex)),
            unit=s(ds(profile.period_type.unit_strindex)),
        )
    )
    out.period = profile.period
    out.time_nanos = profile.time_unix_nano
    out.duration_nanos = profile.duration_nano

    functions: dict[int, int] = {}
    mappings: dict[int, int] = {}
    locations: dict[int, int] = {}

    def function(index: int) -> int:
        if index not in functions:
            f = _at(d.function_table, index, "function")
            fid = functions[index] = len(out.function) + 1
            out.function.append(
                pprof.Function(
                    id=fid,
                    name=s(ds(f.name_strindex)),
                    system_name=s(ds(f.system_name_strindex)),
                    filename=s(ds(f.filename_strindex)),
                    start_line=f.start_line,
                )
            )
        return functions[index]

    def mapping(index: int) -> int:
        if index == 0:
            return 0
        if index not in mappings:
            m = _at(d.mapping_table, index, "mapping")
            mid = mappings[index] = len(out.mapping) + 1
            out.mapping.append(
                pprof.Mapping(
                    id=mid,
                    memory_start=m.memory_start,
                    memory_limit=m.memory_limit,
                    file_offset=m.file_offset,
                    filename=s(ds(m.filename_strindex)),
                    has_functions=True,
                )
            )
        return mappings[index]

    def location(index: int) -> int:
        if index not in locations:
            loc = _at(d.location_table, index, "location")
            lid = locations[index] = len(out.location) + 1
            out.location.append(
                pprof.Location(
                    id=lid,
                    mapping_id=mapping(loc.mapping_index),
                    address=loc.address,
                    line=[
                        pprof.Line(function_id=function(ln.function_index), line=ln.line)
                        for ln in loc.lines
                    ],
                )
            )
        return locations[index]

    for sample in profile.samples:
        stack = _at(d.stack_table, sample.stack_index, "stack")
        labels = []
        for ai in sample.attribute_indices:
            kv = _at(d.attribute_table, ai, "attribute")
            key = s(ds(kv.key_strindex))
            which = kv.value.WhichOneof("value")
            if which == "int_value":
                unit = s(ds(kv.unit_strindex)) if kv.unit_strindex else 0
                labels.append(pprof.Label(key=key, num=kv.value.int_value, num_unit=unit))
            elif which == "string_value":
                labels.append(pprof.Label(key=key, str=s(kv.value.string_value)))
            elif which is not None:
                text = str(getattr(kv.value, which))
                labels.append(pprof.Label(key=key, str=s(text)))
        if sample.link_index:
            link = _at(d.link_table, sample.link_index, "link")
            labels.append(pprof.Label(key=s("trace_id"), str=s(link.trace_id.hex())))
            labels.append(pprof.Label(key=s("span_id"), str=s(link.span_id.hex())))
        value = sum(sample.values) if sample.values else len(sample.timestamps_unix_nano)
        out.sample.append(
            pprof.Sample(
                location_id=[location(i) for i in stack.location_indices],
                value=[value],
                label=labels,
            )
        )
    return out


# -- the server ----------------------------------------------------------------------------


def _service_name(resource_attributes: Any) -> str:
    for kv in resource_attributes:
        if kv.key == "service.name" and kv.value.WhichOneof("value") == "string_value":
            return str(kv.value.string_value)
    return "unknown"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "_"


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that can close its open (keep-alive) connections on stop."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], receiver: Receiver) -> None:
        self.receiver = receiver
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            open_sockets = list(self._open)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "otlp-middleware-receiver"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY_BYTES:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def do_GET(self) -> None:
        self._reply(404 if self.path.split("?")[0] != PROFILES_PATH else 405, b"not found\n")

    do_PUT = do_DELETE = do_PATCH = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        if path != PROFILES_PATH:
            self._discard_body()
            self._reply(404, b"not found\n")
            return
        media_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media_type != CONTENT_TYPE:
            self._discard_body()
            self._reply(415, f"Content-Type must be {CONTENT_TYPE}\n".encode())
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._reply(411, b"Content-Length required\n")
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._reply(413, b"request body too large\n")
            return
        body = self.rfile.read(int(length))
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = _gunzip(body)
            elif encoding != "identity":
                self._reply(415, f"unsupported Content-Encoding {encoding}\n".encode())
                return
            request = ExportProfilesServiceRequest.FromString(body)
        except (DecodeError, OSError, EOFError, zlib.error, ValueError) as exc:
            self.server.receiver._count_bad_request()
            self._reply(400, f"cannot decode the request: {exc}\n".encode())
            return
        response = self.server.receiver._handle(request)
        self._reply(200, response.SerializeToString(), CONTENT_TYPE)


def _gunzip(data: bytes) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, MAX_BODY_BYTES)
    if d.unconsumed_tail:
        raise ValueError("decompressed body too large")
    if not d.eof:
        raise EOFError("truncated gzip body")
    return out


class Receiver:
    """An OTLP/HTTP profiles receiver running in a background thread.

    Parameters:
        host, port: where to listen; port 0 picks a free port (see ``url``).
        output_dir: folder for the pprof files (created); None writes no file.
        on_batch: called with each decoded request, on the server's thread.

    ``start()`` returns once the socket listens; ``stop()`` closes it, open connections
    included, and joins every thread. Use it as a context manager in tests.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        output_dir: str | os.PathLike[str] | None = None,
        on_batch: BatchCallback | None = None,
    ) -> None:
        self._address = (host, port)
        self._output_dir = Path(output_dir) if output_dir is not None else None
        self._on_batch = on_batch
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batches = 0
        self._profiles = 0
        self._samples = 0
        self._rejected = 0
        self._bad_requests = 0
        self._files: list[Path] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Receiver:
        """Bind and serve in a daemon-less background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("receiver already started")
        if self._output_dir is not None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-middleware-receiver",
        )
        self._thread.start()
        logger.info("OTLP profiles receiver listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close open connections, join threads. Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Receiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The full profiles URL, e.g. ``http://127.0.0.1:4318/v1development/profiles``."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        address = self._server.server_address
        host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{address[1]}{PROFILES_PATH}"

    # -- counters ----------------------------------------------------------------------------

    @property
    def batches_received(self) -> int:
        with self._lock:
            return self._batches

    @property
    def profiles_received(self) -> int:
        """OTLP Profile messages received (converted or rejected)."""
        with self._lock:
            return self._profiles

    @property
    def samples_received(self) -> int:
        with self._lock:
            return self._samples

    @property
    def profiles_rejected(self) -> int:
        with self._lock:
            return self._rejected

    @property
    def bad_requests(self) -> int:
        """Requests answered 400 (undecodable body)."""
        with self._lock:
            return self._bad_requests

    @property
    def files(self) -> list[Path]:
        """The pprof files written so far, in order."""
        with self._lock:
            return list(self._files)

    # -- handling ----------------------------------------------------------------------------

    def _count_bad_request(self) -> None:
        with self._lock:
            self._bad_requests += 1

    def _handle(self, request: ExportProfilesServiceRequest) -> ExportProfilesServiceResponse:
        with self._lock:
            self._batches += 1
            batch = self._batches
        n = samples = rejected = 0
        services: set[str] = set()
        errors: list[str] = []
        written: list[Path] = []
        for rp in request.resource_profiles:
            service = _service_name(rp.resource.attributes)
            services.add(service)
            for sp in rp.scope_profiles:
                for profile in sp.profiles:
                    n += 1
                    samples += len(profile.samples)
                    try:
                        converted = otlp_to_pprof(profile, request.dictionary)
                    except ConversionError as exc:
                        rejected += 1
                        errors.append(str(exc))
                        continue
                    if self._output_dir is not None:
                        written.append(self._write(converted, batch, n, service))
        with self._lock:
            self._profiles += n
            self._samples += samples
            self._rejected += rejected
            self._files.extend(written)
        logger.info(
            "batch %d: %d profiles, %d samples, %d links, service %s%s",
            batch,
            n,
            samples,
            max(len(request.dictionary.link_table) - 1, 0),
            ",".join(sorted(services)) or "-",
            f", {rejected} rejected ({errors[0]})" if rejected else "",
        )
        if self._on_batch is not None:
            try:
                self._on_batch(request)
            except Exception:
                logger.exception("on_batch callback failed")
        response = ExportProfilesServiceResponse()
        if rejected:
            response.partial_success.CopyFrom(
                ExportProfilesPartialSuccess(
                    rejected_profiles=rejected, error_message="; ".join(errors[:3])
                )
            )
        return response

    def _write(self, profile: pprof.Profile, batch: int, index: int, service: str) -> Path:
        assert self._output_dir is not None
        kind = profile.string_table[profile.sample_type[0].type] if profile.sample_type else "x"
        path = self._output_dir / f"{batch:06d}-{index:03d}-{_safe(service)}-{_safe(kind)}.pb.gz"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(profile.SerializeToString(), compresslevel=6, mtime=0))
        os.replace(tmp, path)
        return path


# -- the command ---------------------------------------------------------------------------


def add_receive_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``otlp-middleware receive``."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="folder for the received profiles as pprof .pb.gz files",
    )
    parser.add_argument("--discard", action="store_true", help="write no file (count and log only)")


def run_receive(
    args: argparse.Namespace,
    *,
    stop: threading.Event | None = None,
    on_ready: Callable[[Receiver], None] | None = None,
) -> int:
    """Run the receiver until Ctrl-C, SIGTERM or ``stop`` is set; return the exit code.

    ``on_ready`` is called with the running receiver (its ``url`` is known even for port 0).
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    stop = stop if stop is not None else threading.Event()
    receiver = Receiver(args.host, args.port, output_dir=None if args.discard else args.output_dir)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Install the handler before listening, so a SIGTERM can never hit the default action.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_signal) if in_main else None
    try:
        try:
            receiver.start()
        except OSError as exc:
            logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
            return 1
        if on_ready is not None:
            on_ready(receiver)
        while not stop.wait(0.5):  # a timed wait lets Ctrl-C through on every platform
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        receiver.stop()
    logger.info(
        "received %d batches, %d profiles (%d rejected)",
        receiver.batches_received,
        receiver.profiles_received,
        receiver.profiles_rejected,
    )
    return 0
