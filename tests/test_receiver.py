"""The local OTLP receiver (``otlp-middleware receive``): HTTP answers, pprof files, CLI."""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)

from otlp_middleware._receiver import (
    Receiver,
    add_receive_arguments,
    otlp_to_pprof,
    run_receive,
)
from otlp_middleware.otlp import encode_profiles
from otlp_middleware.pprof import Profile, read_profile

from .test_otlp_encode import LINK_A, LINK_B, make_record

pytestmark = pytest.mark.server

PROTOBUF = {"Content-Type": "application/x-protobuf"}


def a_request() -> ExportProfilesServiceRequest:
    return encode_profiles(
        [make_record(link=LINK_A, route="/a"), make_record(link=LINK_B, cpu=[(("h", "m"), 2)])]
    )


def labels(profile: Profile, sample_index: int = 0) -> dict[str, object]:
    st = profile.string_table
    return {
        st[lb.key]: (st[lb.str] if lb.str else lb.num) for lb in profile.sample[sample_index].label
    }


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Receiver(port=0, output_dir=tmp_path / "out") as r:
        yield r


def test_plain_and_gzip_bodies_become_pprof_files(receiver: Receiver, tmp_path: Path) -> None:
    body = a_request().SerializeToString()
    with httpx.Client() as client:
        plain = client.post(receiver.url, content=body, headers=PROTOBUF)
        zipped = client.post(
            receiver.url,
            content=gzip.compress(body),
            headers={**PROTOBUF, "Content-Encoding": "gzip"},
        )
    for response in (plain, zipped):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-protobuf"
        parsed = ExportProfilesServiceResponse.FromString(response.content)
        assert not parsed.HasField("partial_success")
    assert receiver.batches_received == 2 and receiver.profiles_received == 6
    assert receiver.samples_received == 12
    files = receiver.files
    assert len(files) == 6 and all(f.name.endswith(".pb.gz") for f in files)
    assert files[0].parent == tmp_path / "out"
    assert files[0].read_bytes()[:2] == b"\x1f\x8b"
    cpu = next(read_profile(f) for f in files if f.name.endswith("-cpu.pb.gz"))
    st = cpu.string_table
    assert [(st[t.type], st[t.unit]) for t in cpu.sample_type] == [("cpu", "nanoseconds")]
    assert (st[cpu.period_type.type], cpu.period) == ("cpu", 10_101_010)
    assert sorted(s.value[0] for s in cpu.sample) == [9_000_000, 18_000_000]
    functions = {f.id: st[f.name] for f in cpu.function}
    locations = {loc.id: loc for loc in cpu.location}
    leaves = {functions[locations[s.location_id[0]].line[0].function_id] for s in cpu.sample}
    assert leaves == {"handler", "h"}
    sample_labels = [labels(cpu, i) for i in range(len(cpu.sample))]
    assert {lb["trace_id"] for lb in sample_labels} == {LINK_A.trace_id_hex, LINK_B.trace_id_hex}
    assert {lb["http.route"] for lb in sample_labels} == {"/a", "/items/{id}"}
    assert all(lb["thread.id"] == 7 for lb in sample_labels)


def test_written_files_read_with_go_tool_pprof(receiver: Receiver, go_pprof: str) -> None:
    httpx.post(receiver.url, content=a_request().SerializeToString(), headers=PROTOBUF)
    cpu = next(f for f in receiver.files if f.name.endswith("-cpu.pb.gz"))
    out = subprocess.run(
        [go_pprof, "tool", "pprof", "-top", str(cpu)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Type: cpu" in out and " h" in out


def test_unconvertible_profiles_get_a_partial_success(receiver: Receiver) -> None:
    request = a_request()
    bad = request.resource_profiles[0].scope_profiles[0].profiles[0]
    bad.samples[0].stack_index = 999
    response = httpx.post(receiver.url, content=request.SerializeToString(), headers=PROTOBUF)
    assert response.status_code == 200
    partial = ExportProfilesServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_profiles == 1
    assert "stack index 999" in partial.error_message
    assert receiver.profiles_rejected == 1 and len(receiver.files) == 2


@pytest.mark.parametrize(
    ("path", "headers", "body", "status"),
    [
        ("/v1development/profiles", PROTOBUF, b"\xff\xff\xff", 400),
        ("/v1development/profiles", {**PROTOBUF, "Content-Encoding": "gzip"}, b"nope", 400),
        ("/v1development/profiles", {"Content-Type": "application/json"}, b"{}", 415),
        ("/v1development/profiles", {"Content-Type": "text/plain"}, b"x", 415),
        ("/v1/traces", PROTOBUF, b"", 404),
    ],
)
def test_bad_requests_are_answered_per_spec(
    receiver: Receiver, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    base = receiver.url.removesuffix("/v1development/profiles")
    response = httpx.post(base + path, content=body, headers=headers)
    assert response.status_code == status
    assert receiver.batches_received == 0
    assert receiver.bad_requests == (1 if status == 400 else 0)


def test_get_is_not_allowed(receiver: Receiver) -> None:
    assert httpx.get(receiver.url).status_code == 405


def test_on_batch_sees_each_decoded_request(tmp_path: Path) -> None:
    seen: list[ExportProfilesServiceRequest] = []
    with Receiver(port=0, output_dir=None, on_batch=seen.append) as receiver:
        request = a_request()
        httpx.post(receiver.url, content=request.SerializeToString(), headers=PROTOBUF)
    assert seen == [request]
    assert receiver.files == [] and list(tmp_path.iterdir()) == []


def test_stop_closes_keep_alive_connections(tmp_path: Path) -> None:
    receiver = Receiver(port=0, output_dir=tmp_path).start()
    client = httpx.Client()  # keeps its connection open after the response
    try:
        response = client.post(
            receiver.url, content=a_request().SerializeToString(), headers=PROTOBUF
        )
        assert response.status_code == 200
        receiver.stop()
        receiver.stop()  # idempotent
        assert not [t for t in threading.enumerate() if t.name == "otlp-middleware-receiver"]
    finally:
        client.close()


def test_conversion_refuses_a_broken_string_table() -> None:
    request = a_request()
    request.dictionary.string_table[0] = "oops"
    profile = request.resource_profiles[0].scope_profiles[0].profiles[0]
    with pytest.raises(ValueError, match="string_table"):
        otlp_to_pprof(profile, request.dictionary)


def test_receive_command_serves_until_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_receive_arguments(parser)
    args = parser.parse_args(["--port", "0", "--output-dir", str(tmp_path / "recv")])
    assert (args.host, args.port, args.discard) == ("127.0.0.1", 0, False)
    posted: list[int] = []
    clients: list[threading.Thread] = []

    def client(url: str) -> None:
        try:
            body = a_request().SerializeToString()
            posted.append(httpx.post(url, content=body, headers=PROTOBUF).status_code)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # run_receive's handler turns it into a stop

    def on_ready(receiver: Receiver) -> None:
        clients.append(threading.Thread(target=client, args=(receiver.url,)))
        clients[0].start()

    with caplog.at_level(logging.INFO, logger="otlp_middleware._receiver"):
        assert run_receive(args, on_ready=on_ready) == 0
    clients[0].join()
    assert posted == [200]
    assert len(list((tmp_path / "recv").glob("*.pb.gz"))) == 3
    assert "batch 1: 3 profiles" in caplog.text
    assert "received 1 batches, 3 profiles (0 rejected)" in caplog.text


def test_receive_command_reports_a_busy_port(receiver: Receiver) -> None:
    port = int(receiver.url.split(":")[2].split("/")[0])
    args = argparse.Namespace(host="127.0.0.1", port=port, output_dir="unused", discard=True)
    assert run_receive(args, stop=threading.Event()) == 1
