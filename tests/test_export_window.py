"""Aggregate pprof files built as records arrive: ``PprofWindow`` and the streaming queue.

``FileExporter(aggregate=True)`` merges each record into its window when the export thread
hands it over (every ``ABSORB_INTERVAL``), so records are not held until the window is
written; the window file must say exactly what ``merged_profiles`` would have said.
"""

from __future__ import annotations

import gc
import os
import subprocess
import weakref
from collections import Counter
from pathlib import Path

import pytest

from otlp_middleware.export import BatchProcessor, FileExporter
from otlp_middleware.export._batch import ABSORB_INTERVAL
from otlp_middleware.pprof import PprofWindow, Profile, merged_profiles, read_profile

from .test_otlp_encode import LINK_B, make_record
from .workloads import wait_until


def totals(profile: Profile) -> Counter[tuple[object, ...]]:
    """Summed values per (function names of the stack, sorted labels): what readers show."""
    st = profile.string_table
    names = {f.id: st[f.name] for f in profile.function}
    locs = {loc.id: names[loc.line[0].function_id] for loc in profile.location}
    out: Counter[tuple[object, ...]] = Counter()
    for s in profile.sample:
        labels = tuple(
            sorted((st[lab.key], st[lab.str] if lab.str else lab.num) for lab in s.label)
        )
        for i, v in enumerate(s.value):
            out[(tuple(locs[x] for x in s.location_id), labels, i)] += v
    return out


def some_records() -> list:
    return [
        make_record(cpu=((("handler", "main"), 2), (("query", "handler", "main"), 1))),
        make_record(link=LINK_B, route="/b", start=500, cpu=((("handler", "main"), 1),)),
        make_record(link=None, heap=2, start=9_000_000),
        make_record(cpu=()),  # nothing to add
    ]


def test_a_window_says_what_merging_the_batch_at_once_says() -> None:
    records = some_records()
    expected = merged_profiles(records)
    window = PprofWindow()
    added = [window.add(r) for r in records]
    assert added == [True, True, True, False]
    assert window.records == 3 and window.start_ns == 500
    got = window.take()
    assert got.keys() == expected.keys() == {"cpu", "heap"}
    for kind in ("cpu", "heap"):
        g, e = got[kind], expected[kind]
        assert totals(g) == totals(e), kind
        assert (g.period, g.time_nanos, g.duration_nanos) == (
            e.period,
            e.time_nanos,
            e.duration_nanos,
        )
        assert [g.string_table[c] for c in g.comment] == [e.string_table[c] for c in e.comment]
        assert g.string_table[g.default_sample_type] == e.string_table[e.default_sample_type]
    # taken: the window starts afresh
    assert window.records == 0 and window.take() == {}


def test_a_window_keeps_the_longest_period_of_its_records() -> None:
    window = PprofWindow()
    short, long = make_record(), make_record()
    long.cpu_period_ns = short.cpu_period_ns * 3
    window.add(short)
    window.add(long)
    assert window.take()["cpu"].period == long.cpu_period_ns


def test_the_streaming_queue_hands_records_over_at_once_and_writes_one_window(
    tmp_path: Path,
) -> None:
    exporter = FileExporter(tmp_path, aggregate=True)
    processor = BatchProcessor(exporter, schedule_delay=30)
    try:
        records = [make_record() for _ in range(5)]
        refs = [weakref.ref(r) for r in records]
        for r in records:
            assert processor.emit(r)
        del records, r
        wait_until(lambda: exporter.pending >= 5, 10 * ABSORB_INTERVAL + 5, processor.stats)
        # absorbed: the queue holds nothing, no file is written before the window is due,
        # and the records themselves are gone (their samples are in the window)
        gc.collect()
        assert [ref() for ref in refs] == [None] * 5
        assert os.listdir(tmp_path) == []
        stats = processor.stats()
        assert (stats.queued, stats.emitted, stats.exported) == (5, 5, 0)
        assert processor.force_flush(10)
        (name,) = os.listdir(tmp_path)
        assert "_window_5req.cpu.pb.gz" in name
        profile = read_profile(tmp_path / name)
        assert sum(s.value[0] for s in profile.sample) == 5
        stats = processor.stats()
        assert (stats.queued, stats.exported, stats.failed) == (0, 5, 0)
    finally:
        processor.shutdown(10)


def test_records_emitted_just_before_shutdown_are_written(tmp_path: Path) -> None:
    exporter = FileExporter(tmp_path, aggregate=True)
    processor = BatchProcessor(exporter, schedule_delay=30)
    for _ in range(3):
        processor.emit(make_record())
    processor.shutdown(10)
    (name,) = os.listdir(tmp_path)
    assert "_window_3req" in name
    assert processor.stats().exported == 3 and exporter.pending == 0


def test_a_window_that_cannot_be_written_counts_its_records_failed(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    exporter = FileExporter(blocked, aggregate=True)
    processor = BatchProcessor(exporter, schedule_delay=30)
    for _ in range(4):
        processor.emit(make_record())
    processor.shutdown(10)
    stats = processor.stats()
    assert (stats.exported, stats.failed, stats.queued) == (0, 4, 0)


def test_a_full_window_is_written_without_waiting_for_the_schedule(tmp_path: Path) -> None:
    exporter = FileExporter(tmp_path, aggregate=True)
    processor = BatchProcessor(exporter, schedule_delay=30, max_export_batch_size=4)
    try:
        for _ in range(4):
            processor.emit(make_record())
        # counted once the file is in place
        wait_until(lambda: processor.stats().exported >= 4, 10, processor.stats)
        assert len(os.listdir(tmp_path)) == 1
    finally:
        processor.shutdown(10)


def test_a_forked_child_does_not_write_its_parents_absorbed_records(tmp_path: Path) -> None:
    exporter = FileExporter(tmp_path, aggregate=True)
    processor = BatchProcessor(exporter, schedule_delay=30)
    try:
        for _ in range(2):
            processor.emit(make_record())
        wait_until(lambda: exporter.pending >= 2, 10)
        pid = os.fork()
        if pid == 0:  # the child: nothing of the parent's is pending here
            ok = exporter.pending == 0 and processor.stats().queued == 0
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert exporter.pending == 2
    finally:
        processor.shutdown(10)
    assert len(os.listdir(tmp_path)) == 1


def test_go_tool_pprof_reads_a_streamed_window(go_pprof: str, tmp_path: Path) -> None:
    exporter = FileExporter(tmp_path, aggregate=True)
    for r in some_records():
        exporter.absorb([r])
    assert exporter.export([]).exported == 3
    cpu = next(p for p in os.listdir(tmp_path) if ".cpu." in p)
    out = subprocess.run(
        [go_pprof, "tool", "pprof", "-top", "-tagfocus", "http.route=/b", str(tmp_path / cpu)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "handler" in out and "query" not in out, out


def test_absorb_needs_the_aggregate_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aggregate"):
        FileExporter(tmp_path).absorb([make_record()])


def test_samples_of_requests_with_a_span_are_written_out_and_the_others_merge() -> None:
    window = PprofWindow()
    for _ in range(3):  # one stack, no span: one sample of count 3
        window.add(make_record(link=None))
    for _ in range(2):  # each with its own span: a sample each, however alike
        window.add(make_record())
    profile = window.take()["cpu"]
    counts = sorted(s.value[0] for s in profile.sample)
    assert counts == [1, 1, 3], counts
