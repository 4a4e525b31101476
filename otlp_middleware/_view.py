"""Look at pprof files without a backend: a top-functions table and a flame graph page.

    otlp-middleware top FILE... [-n 20] [--cum] [--sample-index cpu] [--tag http.route=/items]
                                [--by-label http.route]
    otlp-middleware flamegraph FILE... -o out.html [--sample-index cpu] [--title T]

The contract:

- Any pprof file (``perftools.profiles.Profile``), gzip-compressed or raw, is accepted: ours
  (CPU: samples/count, cpu/nanoseconds, wall/nanoseconds; heap: alloc_objects, alloc_space,
  inuse_objects, inuse_space) or another tool's, e.g. the Go runtime's. Several files, or a
  folder of ``*.pb.gz`` files (what the file exporter writes), are merged into one view.
- Frames are merged by function (name, file, first line), as ``go tool pprof`` does by default.
  A location with inlined frames (several ``Line`` entries) expands to several frames.
- *flat* is the value of samples whose leaf frame is the function; *cum* is the value of
  samples with the function anywhere on the stack, counted once per sample, so recursion never
  counts a sample twice.
- ``--tag KEY=VALUE`` keeps only samples carrying that label (string label, or numeric label
  in decimal); several tags must all match. ``--by-label KEY`` prints one table per value.
- The flame graph page is one self-contained file: inline CSS and vanilla JavaScript, no
  network access. The merged call tree is embedded as JSON inside a ``<script
  type="application/json">`` element with ``<``, ``>`` and ``&`` escaped, and the page builds
  its DOM with ``textContent`` only, so a function named ``</script><img onerror=...>`` is
  shown as text, never run.

Python use::

    from otlp_middleware._view import load_profile, render_flamegraph_html, top_functions

    profile = load_profile("profiles/cpu-0001.pb.gz")
    for row in top_functions(profile, tag_filter={"http.route": "/items"})[:10]:
        print(row.function, row.flat, row.cum)
    html = render_flamegraph_html(profile, title="GET /items")
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TextIO

from google.protobuf.message import DecodeError

from .pprof import read_profile
from .pprof.profile_pb2 import Profile

__all__ = [
    "ProfileError",
    "TopRow",
    "add_flamegraph_arguments",
    "add_top_arguments",
    "format_value",
    "load_profile",
    "render_flamegraph_html",
    "run_flamegraph",
    "run_top",
    "top_functions",
]

_Frame = tuple[str, str, int]
"""A merged frame: (function name, file name, function's first line; 0 when unknown)."""

Profiles = Profile | Sequence[Profile]
"""One profile, or several to merge (they must share the chosen sample type)."""

_TIME_UNITS_NS = {
    "nanoseconds": 1,
    "microseconds": 1_000,
    "milliseconds": 1_000_000,
    "seconds": 10**9,
}
_NO_LABEL = "(none)"
_PROFILE_SUFFIXES = (".pb.gz", ".pb", ".pprof")


class ProfileError(ValueError):
    """A profile, or a request about it, that cannot be served.

    Bad bytes, dangling references, an unknown sample type or a malformed ``--tag``.
    """


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a pprof file, gzip-compressed (``.pb.gz``) or raw protobuf bytes.

    Raises ``OSError`` when the file cannot be read and ``ProfileError`` (a ``ValueError``)
    when its content is not a pprof profile.
    """
    try:
        return read_profile(path)
    except (EOFError, zlib.error, DecodeError) as exc:
        raise ProfileError(f"{os.fspath(path)}: not a pprof profile ({exc})") from exc


@dataclass(frozen=True)
class TopRow:
    """One function of a top table: its flat (self) and cumulative value and their shares.

    Percentages are of the total value of the samples considered (after tag filtering).
    ``start_line`` is the function's first line, 0 when the profile does not say.
    """

    function: str
    filename: str
    start_line: int
    flat: int
    flat_percent: float
    cum: int
    cum_percent: float

    @property
    def location(self) -> str:
        """``file:line`` (or just the file when the first line is unknown)."""
        if self.start_line:
            return f"{self.filename}:{self.start_line}"
        return self.filename


class _Weighted(NamedTuple):
    """A sample reduced to what the views need, independent of its profile's tables."""

    stack: tuple[_Frame, ...]  # leaf first
    value: int
    labels: tuple[tuple[str, str], ...]


class _Selection(NamedTuple):
    sample_type: str
    unit: str
    samples: list[_Weighted]
    comments: list[str]
    duration_nanos: int


class _Resolver:
    """Turns one profile's id/index references into frames, checking every reference."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        functions: dict[int, _Frame] = {}
        for f in profile.function:
            name = self.string(f.name) or self.string(f.system_name) or f"<function {f.id}>"
            functions[f.id] = (name, self.string(f.filename), f.start_line)
        mapping_files = {m.id: self.string(m.filename) for m in profile.mapping}
        self._locations: dict[int, tuple[_Frame, ...]] = {}
        for loc in profile.location:
            frames: list[_Frame] = []
            for line in loc.line:  # leaf first: the last entry is the caller of the inlined ones
                if line.function_id not in functions:
                    raise ProfileError(
                        f"location {loc.id} names unknown function {line.function_id}"
                    )
                frames.append(functions[line.function_id])
            if not frames:  # unsymbolized: show the address and the binary it is in
                frames.append((f"0x{loc.address:x}", mapping_files.get(loc.mapping_id, ""), 0))
            self._locations[loc.id] = tuple(frames)

    def string(self, index: int) -> str:
        table = self.profile.string_table
        if not 0 <= index < len(table):
            raise ProfileError(f"string index {index} out of range (table has {len(table)})")
        return str(table[index])

    def sample_types(self) -> list[tuple[str, str]]:
        return [(self.string(vt.type), self.string(vt.unit)) for vt in self.profile.sample_type]

    def sample_index(self, requested: str | int | None) -> int:
        """Resolve a sample type name or position; the default is cpu, else the profile's own."""
        names = [type_ for type_, _ in self.sample_types()]
        if not names:
            raise ProfileError("the profile has no sample types")
        if requested is None:
            if "cpu" in names:
                return names.index("cpu")
            default = self.string(self.profile.default_sample_type)
            return names.index(default) if default in names else len(names) - 1
        if isinstance(requested, int) or requested.isdigit():
            index = int(requested)
            if index < len(names):
                return index
        elif requested in names:
            return names.index(requested)
        raise ProfileError(
            f"unknown sample index {requested!r}; the profile has: "
            + ", ".join(f"{i}={n}" for i, n in enumerate(names))
        )

    def samples(self, index: int, tag_filter: Mapping[str, str] | None) -> Iterator[_Weighted]:
        """The samples that carry every requested label, with their value at ``index``."""
        wanted = set(tag_filter.items()) if tag_filter else set()
        for sample in self.profile.sample:
            labels = tuple(
                (self.string(lb.key), self.string(lb.str) if lb.str else str(lb.num))
                for lb in sample.label
            )
            if not wanted <= set(labels):
                continue
            if index >= len(sample.value):
                raise ProfileError(f"a sample has {len(sample.value)} values, needs index {index}")
            stack: list[_Frame] = []
            for loc_id in sample.location_id:
                loc = self._locations.get(loc_id)
                if loc is None:
                    raise ProfileError(f"sample names unknown location {loc_id}")
                stack.extend(loc)
            yield _Weighted(tuple(stack), sample.value[index], labels)


def _select(
    profiles: Profiles, sample_index: str | int | None, tag_filter: Mapping[str, str] | None
) -> _Selection:
    """The chosen sample type's samples from every profile; the first profile picks the type."""
    if isinstance(profiles, Profile):
        profiles = [profiles]
    if not profiles:
        raise ProfileError("no profiles given")
    resolvers = [_Resolver(p) for p in profiles]
    index = resolvers[0].sample_index(sample_index)
    sample_type, unit = resolvers[0].sample_types()[index]
    samples: list[_Weighted] = []
    comments: list[str] = []
    for r in resolvers:
        i = index if r is resolvers[0] else r.sample_index(sample_type)
        if r.sample_types()[i][1] != unit:
            raise ProfileError(f"{sample_type} is in {unit} in one profile, not in another")
        samples.extend(r.samples(i, tag_filter))
        comments.extend(r.string(c) for c in r.profile.comment if r.string(c) not in comments)
    duration = sum(p.duration_nanos for p in profiles)
    return _Selection(sample_type, unit, samples, comments, duration)


def _top(samples: Iterable[_Weighted]) -> list[TopRow]:
    flat: dict[_Frame, int] = {}
    cum: dict[_Frame, int] = {}
    total = 0
    for s in samples:
        total += s.value
        if not s.stack:
            continue
        flat[s.stack[0]] = flat.get(s.stack[0], 0) + s.value
        for frame in set(s.stack):  # once per sample: recursion must not double count
            cum[frame] = cum.get(frame, 0) + s.value

    def pct(v: int) -> float:
        return 100.0 * v / total if total else 0.0

    rows = [
        TopRow(f[0], f[1], f[2], flat.get(f, 0), pct(flat.get(f, 0)), c, pct(c))
        for f, c in cum.items()
    ]
    rows.sort(key=lambda r: (-r.flat, -r.cum, r.function, r.filename, r.start_line))
    return rows


def top_functions(
    profile: Profiles,
    sample_index: str | int | None = None,
    tag_filter: Mapping[str, str] | None = None,
) -> list[TopRow]:
    """Every function of ``profile`` with its flat and cumulative value, highest flat first.

    ``profile`` may be a sequence of profiles to merge. ``sample_index`` is a sample type name
    (``"cpu"``, ``"alloc_space"``) or position; by default ``cpu`` when present, else the
    profile's ``default_sample_type``, else the last type. ``tag_filter`` keeps only samples
    whose labels include every ``key: value`` given.

    Example::

        rows = top_functions(load_profile("heap.pb.gz"), "inuse_space")
        print(rows[0].function, rows[0].flat_percent)
    """
    return _top(_select(profile, sample_index, tag_filter).samples)


def format_value(value: int, unit: str) -> str:
    """A human reading of ``value``: ms/s for time units, KiB/MiB for bytes, else the number."""
    if value == 0:
        return "0"
    if unit in _TIME_UNITS_NS:
        ns = value * _TIME_UNITS_NS[unit]
        for scale, suffix in ((10**9, "s"), (10**6, "ms"), (10**3, "us")):
            if abs(ns) >= scale:
                return f"{ns / scale:.2f}{suffix}"
        return f"{ns}ns"
    if unit == "bytes":
        for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f}{suffix}"
        return f"{value}B"
    return str(value)


# ---------------------------------------------------------------------------------- CLI


def _expand(paths: Sequence[str]) -> list[str]:
    """Files as given; a folder stands for the profiles directly inside it."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, n) for n in os.listdir(path) if n.endswith(_PROFILE_SUFFIXES)
            )
            if not found:
                raise ProfileError(f"{path}: no {'/'.join(_PROFILE_SUFFIXES)} files in the folder")
            files.extend(found)
        else:
            files.append(path)
    return files


def _load_args(args: argparse.Namespace) -> tuple[list[str], _Selection]:
    tags = _parse_tags(args.tag)
    files = _expand(args.files)
    return files, _select([load_profile(f) for f in files], args.sample_index, tags)


def _parse_tags(tags: Sequence[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for tag in tags or ():
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ProfileError(f"--tag {tag!r}: expected KEY=VALUE")
        if key in result:
            raise ProfileError(f"--tag {key!r} given twice; a sample has one value per key")
        result[key] = value
    return result


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="pprof files (.pb.gz or raw) or folders of them; several are merged",
    )
    parser.add_argument(
        "--sample-index",
        metavar="NAME",
        help="sample type name or position (default: cpu, else the profile's default)",
    )
    parser.add_argument(
        "--tag",
        action="append",
        metavar="KEY=VALUE",
        help="keep only samples with this label; repeat to require several",
    )


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``otlp-middleware top``."""
    _add_common_arguments(parser)
    parser.add_argument(
        "-n", "--nodes", type=int, default=20, help="rows to show (default 20; 0 shows all)"
    )
    parser.add_argument("--cum", action="store_true", help="sort by cumulative value")
    parser.add_argument(
        "--by-label",
        metavar="KEY",
        help="one table per value of this sample label, e.g. http.route",
    )


def _clean(text: str) -> str:
    # Names come from the profile: keep control characters from garbling the terminal.
    return "".join(c if c.isprintable() else "?" for c in text)


def _write_table(out: TextIO, rows: Sequence[TopRow], unit: str, limit: int, by_cum: bool) -> None:
    if by_cum:
        rows = sorted(rows, key=lambda r: (-r.cum, -r.flat, r.function, r.filename))
    shown = rows[:limit] if limit > 0 else rows
    out.write(f"Showing top {len(shown)} of {len(rows)} functions\n")
    table = [("flat", "flat%", "cum", "cum%", "function", "file:line")]
    for r in shown:
        table.append(
            (
                format_value(r.flat, unit),
                f"{r.flat_percent:.2f}%",
                format_value(r.cum, unit),
                f"{r.cum_percent:.2f}%",
                _clean(r.function),
                _clean(r.location),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        nums = "  ".join(cell.rjust(w) for cell, w in zip(row[:4], widths[:4], strict=True))
        out.write(f"{nums}  {row[4].ljust(widths[4])}  {row[5]}".rstrip() + "\n")


def _group_by_label(samples: Iterable[_Weighted], key: str) -> dict[str, list[_Weighted]]:
    """Samples per value of label ``key``, the biggest group first."""
    groups: dict[str, list[_Weighted]] = {}
    for s in samples:
        value = next((v for k, v in s.labels if k == key), _NO_LABEL)
        groups.setdefault(value, []).append(s)
    order = sorted(groups, key=lambda g: (-sum(s.value for s in groups[g]), g))
    return {g: groups[g] for g in order}


def run_top(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``otlp-middleware top``: print the top functions; 0 on success, 1 on a bad file/arg."""
    out = out or sys.stdout
    try:
        files, sel = _load_args(args)
    except (OSError, ProfileError) as exc:
        sys.stderr.write(f"otlp-middleware top: {exc}\n")
        return 1
    out.write(f"File: {files[0]}\n" if len(files) == 1 else f"Files: {len(files)} profiles\n")
    line = f"Type: {sel.sample_type} ({sel.unit})"
    if sel.duration_nanos:
        line += f"   Duration: {format_value(sel.duration_nanos, 'nanoseconds')}"
    out.write(line + "\n")
    if sel.comments and len(files) == 1:  # per-request attributes: only one file's make sense
        out.write("Attributes: " + ", ".join(_clean(c) for c in sel.comments) + "\n")
    if args.by_label is None:
        groups = {"": sel.samples}
    else:
        groups = _group_by_label(sel.samples, args.by_label)
    for label_value, group in groups.items():
        out.write("\n")
        if args.by_label is not None:
            out.write(f"== {args.by_label}={_clean(label_value)} ==\n")
        total = sum(s.value for s in group)
        out.write(f"Total: {format_value(total, sel.unit)} in {len(group)} samples\n")
        _write_table(out, _top(group), sel.unit, args.nodes, args.cum)
    return 0


# ---------------------------------------------------------------------------- flame graph


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.value = 0
        self.children: dict[int, _Node] = {}


def _flame_data(sel: _Selection) -> dict[str, object]:
    """The merged call tree as JSON-ready data, flattened in pre-order.

    ``frames`` is a table of [name, file, first line] (entry 0 is the root, "all"). Nodes are
    parallel arrays: frame index ``f``, depth ``d`` and total value ``v``; each node's children
    follow it, sorted by name as in Brendan Gregg's flame graphs. Flat arrays keep the JSON
    small and let both sides walk deep stacks without recursion.
    """
    frame_ids: dict[_Frame, int] = {("all", "", 0): 0}
    root = _Node()
    n_samples = 0
    for s in sel.samples:
        if s.value <= 0:  # a width cannot be negative; diff profiles are out of scope
            continue
        n_samples += 1
        root.value += s.value
        node = root
        for frame in reversed(s.stack):
            fid = frame_ids.setdefault(frame, len(frame_ids))
            child = node.children.get(fid)
            if child is None:
                child = node.children[fid] = _Node()
            child.value += s.value
            node = child
    names = list(frame_ids)
    f: list[int] = []
    d: list[int] = []
    v: list[int] = []
    todo: list[tuple[int, _Node, int]] = [(0, root, 0)]
    while todo:
        fid, node, depth = todo.pop()
        f.append(fid)
        d.append(depth)
        v.append(node.value)
        # Pushed in reverse so they pop (and are emitted) in name order.
        for cid in sorted(node.children, key=lambda i: names[i], reverse=True):
            todo.append((cid, node.children[cid], depth + 1))
    return {
        "frames": [list(n) for n in names],
        "f": f,
        "d": d,
        "v": v,
        "total": root.value,
        "samples": n_samples,
        "sampleType": sel.sample_type,
        "unit": sel.unit,
        "comments": sel.comments,
    }


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element: no "</script>", "<!--" or line separators survive.

    Those characters can only occur inside JSON strings, where ``\\uXXXX`` means the same.
    """
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    for char in ("<", ">", "&", "\u2028", "\u2029"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def render_flamegraph_html(
    profile: Profiles,
    *,
    sample_index: str | int | None = None,
    tag_filter: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """A self-contained HTML page with an interactive flame graph of ``profile``.

    Click a frame to zoom into it, "Reset zoom" (or Escape) to go back; hover for name,
    file:line, value and share; type in the search box to highlight matching functions and see
    their combined share. ``profile``, ``sample_index`` and ``tag_filter`` work as in
    ``top_functions``.

    Example::

        page = render_flamegraph_html(load_profile("cpu.pb.gz"), title="GET /items")
        Path("out.html").write_text(page, encoding="utf-8")
    """
    data = _flame_data(_select(profile, sample_index, tag_filter))
    if title is None:
        title = f"Flame graph ({data['sampleType']})"
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_json(data))


def _render_page(args: argparse.Namespace) -> str:
    files, sel = _load_args(args)
    data = _flame_data(sel)
    title = args.title or (
        os.path.basename(files[0]) if len(files) == 1 else f"{len(files)} profiles"
    )
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_json(data))


def add_flamegraph_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``otlp-middleware flamegraph``."""
    _add_common_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT.html", help="page to write")
    parser.add_argument("--title", help="page title (default: the file name)")


def run_flamegraph(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``otlp-middleware flamegraph``: write the page, print its path; 0 on success, else 1."""
    out = out or sys.stdout
    try:
        page = _render_page(args)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(page)
    except (OSError, ProfileError) as exc:
        sys.stderr.write(f"otlp-middleware flamegraph: {exc}\n")
        return 1
    out.write(f"wrote {args.output}\n")
    return 0


# The page. Names reach the DOM only through textContent; the data through JSON.parse.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 0; padding: 12px 16px; color: #222; }
header { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; margin-bottom: 6px; }
h1 { font-size: 16px; margin: 0; }
#fg-info, #fg-attrs { color: #555; }
#fg-attrs { font-size: 12px; margin-bottom: 8px; }
#fg-controls { margin-left: auto; display: flex; gap: 8px; align-items: center; }
#fg-search { width: 16em; padding: 2px 6px; }
#fg-matched { color: #6a1b9a; }
#fg-chart { position: relative; width: 100%; overflow: hidden; }
.frame { position: absolute; height: 18px; box-sizing: border-box; padding: 0 3px;
  border-right: 1px solid #fff; border-bottom: 1px solid #fff; overflow: hidden;
  white-space: nowrap; text-overflow: ellipsis; font: 12px/17px ui-monospace, monospace;
  cursor: pointer; }
.frame.ancestor { opacity: 0.55; }
.frame.match { background: #c77dff !important; }
.frame:hover { filter: brightness(0.88); }
#fg-tip { position: fixed; pointer-events: none; display: none; z-index: 10; max-width: 60em;
  background: #fffbe6; border: 1px solid #999; padding: 4px 8px; white-space: pre-wrap;
  word-break: break-all; font: 12px/1.4 ui-monospace, monospace; }
</style>
</head>
<body>
<header>
<h1>__TITLE__</h1>
<span id="fg-info"></span>
<div id="fg-controls">
<input id="fg-search" type="search" placeholder="Search functions" aria-label="search functions">
<span id="fg-matched"></span>
<button id="fg-reset" type="button">Reset zoom</button>
</div>
</header>
<div id="fg-attrs"></div>
<div id="fg-chart"></div>
<div id="fg-tip"></div>
<script type="application/json" id="fg-data">__DATA__</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("fg-data").textContent);
  var ROW = 18, MIN_PERCENT = 0.02;
  var TIME = {nanoseconds: 1, microseconds: 1e3, milliseconds: 1e6, seconds: 1e9};
  var chart = document.getElementById("fg-chart"), tip = document.getElementById("fg-tip");
  var search = document.getElementById("fg-search");
  var matched = document.getElementById("fg-matched");
  var nodes = [], stack = [], i;
  for (i = 0; i < data.f.length; i++) {  // rebuild the tree from its pre-order arrays
    var n = {id: i, frame: data.frames[data.f[i]], value: data.v[i], depth: data.d[i],
             parent: null, children: []};
    while (stack.length > n.depth) stack.pop();
    if (stack.length) { n.parent = stack[stack.length - 1]; n.parent.children.push(n); }
    stack.push(n);
    nodes.push(n);
  }
  var root = nodes[0], focus = root;

  function scaled(v, steps, base) {  // mirrors format_value in _view.py
    for (var k = 0; k < steps.length; k++) {
      if (Math.abs(v) >= steps[k][0]) return (v / steps[k][0]).toFixed(2) + steps[k][1];
    }
    return v + base;
  }
  function fmt(v) {
    if (v === 0) return "0";
    if (data.unit in TIME) {
      return scaled(v * TIME[data.unit], [[1e9, "s"], [1e6, "ms"], [1e3, "us"]], "ns");
    }
    if (data.unit === "bytes") {
      return scaled(v, [[1099511627776, "TiB"], [1073741824, "GiB"], [1048576, "MiB"],
                        [1024, "KiB"]], "B");
    }
    return String(v);
  }
  function pct(v, of) { return (of ? 100 * v / of : 0).toFixed(2) + "%"; }
  function where(n) { return n.frame[1] + (n.frame[2] ? ":" + n.frame[2] : ""); }
  function color(name) {  // stable warm colours, as flame graphs traditionally use
    var h = 0;
    for (var k = 0; k < name.length; k++) h = (h * 31 + name.charCodeAt(k)) | 0;
    h = Math.abs(h);
    return "hsl(" + (h % 55) + ", " + (70 + (h >> 8) % 20) + "%, " + (62 + (h >> 16) % 14) + "%)";
  }
  function matches(n, q) { return q !== "" && n.frame[0].toLowerCase().indexOf(q) >= 0; }

  function place(n, left, width, cls) {
    var el = document.createElement("div");
    el.className = cls ? "frame " + cls : "frame";
    el.style.left = left + "%";
    el.style.width = width + "%";
    el.style.top = (n.depth * ROW) + "px";
    el.style.background = color(n.frame[0]);
    el.dataset.id = String(n.id);
    el.textContent = n.frame[0];
    chart.appendChild(el);
  }
  function render() {
    chart.textContent = "";
    if (!root.value) { chart.textContent = "No samples."; return; }
    var maxDepth = focus.depth, a, todo = [[focus, 0]];
    for (a = focus.parent; a; a = a.parent) place(a, 0, 100, "ancestor");
    while (todo.length) {
      var item = todo.pop(), n = item[0], x = item[1], w = 100 * n.value / focus.value;
      if (w < MIN_PERCENT) continue;
      place(n, x, w, "");
      if (n.depth > maxDepth) maxDepth = n.depth;
      for (var c = 0; c < n.children.length; c++) {
        todo.push([n.children[c], x]);
        x += 100 * n.children[c].value / focus.value;
      }
    }
    chart.style.height = ((maxDepth + 1) * ROW) + "px";
    highlight();
  }
  function highlight() {
    var q = search.value.toLowerCase(), els = chart.querySelectorAll(".frame"), sum = 0, k;
    for (k = 0; k < els.length; k++) {
      els[k].classList.toggle("match", matches(nodes[+els[k].dataset.id], q));
    }
    if (q === "") { matched.textContent = ""; return; }
    var todo = [focus];  // a match below a match is already counted in it
    while (todo.length) {
      var n = todo.pop();
      if (matches(n, q)) sum += n.value; else todo.push.apply(todo, n.children);
    }
    matched.textContent = "Matched: " + fmt(sum) + " (" + pct(sum, focus.value) + ")";
  }
  function nodeAt(e) {
    var el = e.target.closest ? e.target.closest(".frame") : null;
    return el ? nodes[+el.dataset.id] : null;
  }
  chart.addEventListener("click", function (e) {
    var n = nodeAt(e);
    if (n) { focus = n; render(); }
  });
  chart.addEventListener("mousemove", function (e) {
    var n = nodeAt(e);
    if (!n) { tip.style.display = "none"; return; }
    var self = n.value;
    for (var c = 0; c < n.children.length; c++) self -= n.children[c].value;
    var share = pct(n.value, root.value) + " of total";
    if (focus !== root) share += ", " + pct(n.value, focus.value) + " of zoom";
    tip.textContent = n.frame[0] + "\\n" + where(n) + "\\n" + fmt(n.value) + " (" + share +
      ")\\nself: " + fmt(self);
    tip.style.display = "block";
    var x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    var y = e.clientY + 14;
    if (y + tip.offsetHeight > window.innerHeight) y = e.clientY - tip.offsetHeight - 8;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  });
  chart.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  function reset() { focus = root; render(); }
  document.getElementById("fg-reset").addEventListener("click", reset);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") reset(); });
  search.addEventListener("input", highlight);
  document.getElementById("fg-info").textContent = data.sampleType + " (" + data.unit +
    "): total " + fmt(root.value) + " in " + data.samples + " samples";
  if (data.comments.length) {
    document.getElementById("fg-attrs").textContent = "Attributes: " + data.comments.join(", ");
  }
  render();
})();
</script>
</body>
</html>
"""
