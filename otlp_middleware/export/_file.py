"""``FileExporter``: pprof files in a folder, the default sink when no endpoint is set."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence

from ..pprof import PprofWindow, Profile, record_profiles, write_profile
from ..types import ProfileRecord
from ._base import ExportResult

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str, limit: int = 60) -> str:
    """A file-name-safe rendering of a route or method ("/users/{id}" -> "users_id")."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned[:limit] or "root"


def _stamp(ns: int) -> str:
    t = time.gmtime(ns / 1e9)
    return time.strftime("%Y%m%dT%H%M%S", t) + f".{(ns // 1_000_000) % 1000:03d}Z"


class FileExporter:
    """Writes gzip pprof files (``.pb.gz``) that ``go tool pprof`` and other tools read.

    Parameters:
        directory: folder for the files (created when needed).
        aggregate: ``False`` (default) writes one file per profiled request,
            ``<time>_<method>_<route>_<profile id>.cpu.pb.gz``, whose comments hold the
            request's attributes (``go tool pprof -comments FILE``). ``True`` writes one file
            per export batch (time window) merging all its requests; every sample keeps its
            request's labels, so ``go tool pprof -tagfocus http.route=/x FILE`` slices it.
            The window is built as records arrive (``absorb``, called by the
            ``BatchProcessor`` between writes), so they are not kept until it is written.
        max_files: files kept at most; the oldest are removed first. ``None``: no limit.

    Example::

        ProfilingMiddleware(app, exporter=FileExporter("profiles", aggregate=True))
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = "profiles",
        *,
        aggregate: bool = False,
        max_files: int | None = 1000,
    ) -> None:
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files={max_files!r}: must be >= 1 or None")
        self.directory = os.fspath(directory)
        self.aggregate = aggregate
        self.max_files = max_files
        self._lock = threading.Lock()
        self._window = PprofWindow()
        self.files_written = 0
        self.dropped = 0  # records absorb() could not render

    @property
    def streaming(self) -> bool:
        """Whether records may be handed over before their batch is written (``absorb``)."""
        return self.aggregate

    @property
    def pending(self) -> int:
        """Records absorbed into the current window and not written yet."""
        return self._window.records

    def absorb(self, records: Sequence[ProfileRecord]) -> None:
        """Merge ``records`` into the window the next ``export`` writes (aggregate mode)."""
        if not self.aggregate:
            raise ValueError("absorb() needs FileExporter(aggregate=True)")
        with self._lock:
            window = self._window
            for r in records:
                try:
                    window.add(r)
                except Exception:  # a bug while rendering: this record is lost, not the rest
                    self.dropped += 1
                    logger.warning("otlp_middleware: could not render a profile", exc_info=True)

    def drop_pending(self) -> None:
        """Forget the absorbed records: a forked child's (they are its parent's to write).

        Takes no lock: in the child, the parent's export thread that may have held it at
        the fork does not exist; the lock is made anew.
        """
        self._lock = threading.Lock()
        self._window = PprofWindow()

    def __repr__(self) -> str:
        return f"FileExporter({self.directory!r}, aggregate={self.aggregate})"

    def export(self, records: Sequence[ProfileRecord]) -> ExportResult:
        """Write ``records``: a file each, or (aggregate) one window with those absorbed."""
        if self.aggregate:
            return self._export_window(records)
        records = [r for r in records if not r.is_empty]
        if not records:
            return ExportResult(success=True)
        try:
            with self._lock:
                for r in records:
                    self._write_record(r)
                self._prune()
        except OSError as exc:
            return self._failed(exc)
        return ExportResult(success=True, exported=len(records))

    def _export_window(self, records: Sequence[ProfileRecord]) -> ExportResult:
        self.absorb(records)
        with self._lock:
            window = self._window
            n = window.records
            if not n:
                return ExportResult(success=True)
            start = window.start_ns
            profiles = window.take()
            try:
                for kind, profile in profiles.items():
                    self._write(profile, f"{_stamp(start)}_window_{n}req.{kind}.pb.gz")
                self._prune()
            except OSError as exc:
                return self._failed(exc)
        return ExportResult(success=True, exported=n)

    def _failed(self, exc: OSError) -> ExportResult:
        logger.warning("otlp_middleware: cannot write profiles to %s: %s", self.directory, exc)
        return ExportResult(success=False, error_message=str(exc))

    def _write_record(self, r: ProfileRecord) -> None:
        method = str(r.attributes.get("http.request.method", "")) or "request"
        route = str(r.attributes.get("http.route", "")) or "unknown"
        stamp = _stamp(r.start_time_ns)
        base = f"{stamp}_{_safe(method, 10)}_{_safe(route)}_{r.profile_id.hex()[:16]}"
        for kind, profile in record_profiles(r).items():
            self._write(profile, f"{base}.{kind}.pb.gz")

    def _write(self, profile: Profile, name: str) -> None:
        write_profile(profile, os.path.join(self.directory, name))
        self.files_written += 1

    def _prune(self) -> None:
        if self.max_files is None:
            return
        try:
            names = [
                n
                for n in os.listdir(self.directory)
                if n.endswith(".pb.gz") and not n.startswith(".")
            ]
        except FileNotFoundError:
            return
        excess = len(names) - self.max_files
        if excess <= 0:
            return
        # Names start with a UTC timestamp, so name order is age order.
        for n in sorted(names)[:excess]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, n))

    def shutdown(self, timeout: float = 10.0) -> None:
        return None
