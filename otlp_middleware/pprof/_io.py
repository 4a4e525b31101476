"""Serialize pprof profiles: gzip bytes and ``.pb.gz`` files (what pprof readers expect)."""

from __future__ import annotations

import gzip
import os
import tempfile

from .profile_pb2 import Profile


def serialize(profile: Profile, *, compress: bool = True) -> bytes:
    """The profile's wire bytes, gzip-compressed by default (as on disk)."""
    data: bytes = profile.SerializeToString()
    return gzip.compress(data, compresslevel=6) if compress else data


def parse(data: bytes) -> Profile:
    """Read a profile from gzip-compressed or raw bytes."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    profile = Profile()
    profile.ParseFromString(data)
    return profile


def write_profile(profile: Profile, path: str | os.PathLike[str]) -> str:
    """Write ``profile`` gzip-compressed to ``path`` atomically; return the path.

    The bytes go to a temporary file in the same folder first and are renamed into place, so
    a reader never sees half a profile.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pb.gz")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(serialize(profile))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a ``.pb.gz`` (or raw) pprof file."""
    with open(path, "rb") as f:
        return parse(f.read())
