"""``otlp-middleware top`` and ``flamegraph`` on hand-built pprof files with known answers.

The CPU profile below has this call tree (values are cpu milliseconds; leaf at the right):

    main -> handle -> fib -> fib -> fib     30   route /fib    (recursion)
    main -> handle -> fib                   10   route /fib
    main -> handle -> sql                   40   route /items
    main -> encode -> json_dumps            15   route /items  (json_dumps inlined in encode)
    main                                     5   route /items

so flat: fib 40, sql 40, json_dumps 15, main 5, encode 0, handle 0 and cum: main 100,
handle 80, fib 40 (not 100: recursion counts once), sql 40, encode 15, json_dumps 15.
"""

from __future__ import annotations

import gzip
import html.parser
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from otlp_middleware import cli
from otlp_middleware._view import (
    TopRow,
    format_value,
    load_profile,
    render_flamegraph_html,
    top_functions,
)
from otlp_middleware.pprof.profile_pb2 import (
    Function,
    Label,
    Line,
    Location,
    Profile,
    Sample,
    ValueType,
)

MS = 1_000_000
EVIL = '</script><img src=x onerror="document.body.dataset.pwned=1">'


class _ProfileMaker:
    """Builds a pprof Profile by hand: strings interned, one location per (function, line)."""

    def __init__(self, sample_types: Sequence[tuple[str, str]], default: str = "") -> None:
        self.p = Profile(string_table=[""])
        self.strings: dict[str, int] = {"": 0}
        for type_, unit in sample_types:
            self.p.sample_type.append(ValueType(type=self.s(type_), unit=self.s(unit)))
        if default:
            self.p.default_sample_type = self.s(default)
        self.functions: dict[str, int] = {}

    def s(self, text: str) -> int:
        if text not in self.strings:
            self.strings[text] = len(self.p.string_table)
            self.p.string_table.append(text)
        return self.strings[text]

    def function(self, name: str, filename: str, start_line: int) -> int:
        fid = len(self.p.function) + 1
        self.p.function.append(
            Function(id=fid, name=self.s(name), filename=self.s(filename), start_line=start_line)
        )
        self.functions[name] = fid
        return fid

    def location(self, *names: str) -> int:
        """A location; several names make an inlined chain, innermost first."""
        lid = len(self.p.location) + 1
        lines = [Line(function_id=self.functions[n], line=7) for n in names]
        self.p.location.append(Location(id=lid, line=lines))
        return lid

    def sample(self, locations: Sequence[int], values: Sequence[int], **labels: str | int) -> None:
        s = Sample(location_id=locations, value=values)
        for key, value in labels.items():
            key = key.replace("_route", ".route")
            if isinstance(value, str):
                s.label.append(Label(key=self.s(key), str=self.s(value)))
            else:
                s.label.append(Label(key=self.s(key), num=value))
        self.p.sample.append(s)


def cpu_profile(evil: bool = False) -> Profile:
    m = _ProfileMaker([("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds")])
    m.function("main", "app.py", 1)
    m.function("handle", "app.py", 10)
    m.function(EVIL if evil else "fib", "app.py", 20)
    m.function("sql", "db.py", 5)
    m.function("json_dumps", "enc.py", 3)
    m.function("encode", "enc.py", 30)
    fib = EVIL if evil else "fib"
    main, handle, fib_loc, sql = (m.location(n) for n in ("main", "handle", fib, "sql"))
    inlined = m.location("json_dumps", "encode")
    m.sample([fib_loc, fib_loc, fib_loc, handle, main], [3, 30 * MS, 60 * MS], http_route="/fib")
    m.sample([fib_loc, handle, main], [1, 10 * MS, 20 * MS], http_route="/fib", thread_id=7)
    m.sample([sql, handle, main], [4, 40 * MS, 400 * MS], http_route="/items")
    m.sample([inlined, main], [2, 15 * MS, 30 * MS], http_route="/items")
    m.sample([main], [1, 5 * MS, 10 * MS], http_route="/items")
    m.p.comment.append(m.s("http.route=/many"))
    m.p.duration_nanos = 2 * 10**9
    return m.p


def heap_profile(default: str = "inuse_space") -> Profile:
    types = [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ]
    m = _ProfileMaker(types, default)
    m.function("main", "app.py", 1)
    m.function("load", "app.py", 9)
    main, load = m.location("main"), m.location("load")
    m.sample([load, main], [10, 3 * 2**20, 4, 3 * 2**10])
    m.sample([main], [1, 2**20, 1, 2**10])
    return m.p


def _write(tmp_path: Path, profile: Profile, name: str = "cpu.pb.gz", gz: bool = True) -> str:
    path = tmp_path / name
    data = profile.SerializeToString()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def _rows(rows: list[TopRow]) -> list[tuple[str, int, int]]:
    return [(r.function, r.flat // MS, r.cum // MS) for r in rows]


# ------------------------------------------------------------------------------ top_functions


def test_top_functions_flat_and_cum_with_recursion_and_inlining() -> None:
    rows = top_functions(cpu_profile())
    assert _rows(rows) == [
        ("fib", 40, 40),
        ("sql", 40, 40),
        ("json_dumps", 15, 15),
        ("main", 5, 100),
        ("handle", 0, 80),
        ("encode", 0, 15),
    ]
    fib = rows[0]
    assert (fib.flat_percent, fib.cum_percent) == (40.0, 40.0)
    assert fib.location == "app.py:20"
    assert rows[3].cum_percent == 100.0


def test_sample_index_by_name_position_and_default() -> None:
    p = cpu_profile()
    assert top_functions(p, "wall")[0].function == "sql"  # 400 of 520 wall ms
    assert top_functions(p, 0)[0].flat == 4  # samples/count
    assert top_functions(p, "0")[0].flat == 4
    with pytest.raises(ValueError, match="0=samples, 1=cpu, 2=wall"):
        top_functions(p, "alloc_space")
    with pytest.raises(ValueError):
        top_functions(p, 3)
    # Heap: no cpu type, so the profile's default_sample_type; with none set, the last type.
    assert top_functions(heap_profile())[0].flat == 3 * 2**10
    assert top_functions(heap_profile(default="alloc_objects"))[0].flat == 10
    assert top_functions(heap_profile(default=""))[0].flat == 3 * 2**10


def test_tag_filter_matches_string_and_numeric_labels() -> None:
    p = cpu_profile()
    assert _rows(top_functions(p, tag_filter={"http.route": "/items"})) == [
        ("sql", 40, 40),
        ("json_dumps", 15, 15),
        ("main", 5, 60),
        ("handle", 0, 40),
        ("encode", 0, 15),
    ]
    only = top_functions(p, tag_filter={"http.route": "/fib", "thread_id": "7"})
    assert [(r.function, r.flat // MS, r.flat_percent) for r in only[:1]] == [("fib", 10, 100.0)]
    assert top_functions(p, tag_filter={"http.route": "/nowhere"}) == []


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (1_500_000_000, "nanoseconds", "1.50s"),
        (12_340_000, "nanoseconds", "12.34ms"),
        (2_000, "nanoseconds", "2.00us"),
        (999, "nanoseconds", "999ns"),
        (0, "nanoseconds", "0"),
        (0, "bytes", "0"),
        (3, "milliseconds", "3.00ms"),
        (512, "bytes", "512B"),
        (1536, "bytes", "1.50KiB"),
        (5 * 2**20, "bytes", "5.00MiB"),
        (42, "count", "42"),
    ],
)
def test_format_value(value: int, unit: str, text: str) -> None:
    assert format_value(value, unit) == text


def test_load_profile_gzip_raw_and_bad_files(tmp_path: Path) -> None:
    p = cpu_profile()
    assert load_profile(_write(tmp_path, p)) == p
    assert load_profile(_write(tmp_path, p, "raw.pb", gz=False)) == p
    bad = tmp_path / "bad.pb.gz"
    bad.write_bytes(gzip.compress(b"\xff\xff\xff not a profile"))
    with pytest.raises(ValueError, match="not a pprof profile"):
        load_profile(bad)
    with pytest.raises(OSError):
        load_profile(tmp_path / "missing.pb.gz")


def test_dangling_references_are_reported_not_crashed_on() -> None:
    p = cpu_profile()
    p.sample.append(Sample(location_id=[99], value=[1, 1, 1]))
    with pytest.raises(ValueError, match="unknown location 99"):
        top_functions(p)


# ------------------------------------------------------------------------------ top CLI


def _table(out: str) -> dict[str, list[str]]:
    """function -> [flat, flat%, cum, cum%, file:line] from a printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1].endswith("%") and parts[0] != "flat":
            rows[parts[4]] = [*parts[:4], parts[5]]
    return rows


def test_cli_top(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, cpu_profile())
    assert cli.main(["top", path]) == 0
    out = capsys.readouterr().out
    assert "Type: cpu (nanoseconds)" in out
    assert "Duration: 2.00s" in out
    assert "Attributes: http.route=/many" in out
    assert "Total: 100.00ms in 5 samples" in out
    assert "Showing top 6 of 6 functions" in out
    rows = _table(out)
    assert rows["fib"] == ["40.00ms", "40.00%", "40.00ms", "40.00%", "app.py:20"]
    assert rows["main"] == ["5.00ms", "5.00%", "100.00ms", "100.00%", "app.py:1"]
    assert list(rows)[:2] == ["fib", "sql"]


def test_cli_top_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, cpu_profile())
    assert cli.main(["top", path, "-n", "2", "--cum", "--sample-index", "wall"]) == 0
    out = capsys.readouterr().out
    assert "Type: wall (nanoseconds)" in out
    assert "Showing top 2 of 6 functions" in out
    assert list(_table(out)) == ["main", "handle"]
    assert _table(out)["main"][2] == "520.00ms"

    assert cli.main(["top", path, "--tag", "http.route=/fib"]) == 0
    out = capsys.readouterr().out
    assert "Total: 40.00ms in 2 samples" in out
    assert list(_table(out)) == ["fib", "handle", "main"]


def test_cli_top_by_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, cpu_profile())
    assert cli.main(["top", path, "--by-label", "http.route"]) == 0
    out = capsys.readouterr().out
    items, fib = out.index("== http.route=/items =="), out.index("== http.route=/fib ==")
    assert items < fib  # the biggest route first
    assert _table(out[items:fib])["main"] == ["5.00ms", "8.33%", "60.00ms", "100.00%", "app.py:1"]
    assert _table(out[fib:])["fib"] == ["40.00ms", "100.00%", "40.00ms", "100.00%", "app.py:20"]
    assert "sql" not in out[fib:]


def test_cli_top_heap_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, heap_profile())
    assert cli.main(["top", path, "--sample-index", "alloc_space"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["load"][:3] == ["3.00MiB", "75.00%", "3.00MiB"]
    assert rows["main"][2] == "4.00MiB"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sample-index", "nope"], "unknown sample index 'nope'"),
        (["--tag", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_cli_top_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    path = _write(tmp_path, cpu_profile())
    assert cli.main(["top", path, *argv]) == 1
    assert message in capsys.readouterr().err
    assert cli.main(["top", str(tmp_path / "missing.pb.gz")]) == 1
    assert "missing.pb.gz" in capsys.readouterr().err


def test_cli_top_merges_files_and_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "received"
    folder.mkdir()
    _write(folder, cpu_profile(), "a.pb.gz")
    _write(folder, cpu_profile(), "b.pb.gz")
    (folder / "notes.txt").write_text("not a profile")
    assert cli.main(["top", str(folder), "--tag", "http.route=/fib"]) == 0
    out = capsys.readouterr().out
    assert "Files: 2 profiles" in out
    assert "Duration: 4.00s" in out
    assert "Attributes" not in out  # per-request attributes of many files would mislead
    assert "Total: 80.00ms in 4 samples" in out
    assert _table(out)["fib"][:2] == ["80.00ms", "100.00%"]

    heap = _write(tmp_path, heap_profile(), "heap.pb.gz")
    assert cli.main(["top", str(folder / "a.pb.gz"), heap]) == 1
    assert "unknown sample index 'cpu'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["top", str(tmp_path / "empty")]) == 1
    assert "no .pb.gz/.pb/.pprof files" in capsys.readouterr().err


def test_unsymbolized_locations_show_their_address() -> None:
    p = heap_profile()
    p.string_table.append("libc.so.6")
    p.mapping.add(id=1, filename=len(p.string_table) - 1)
    p.location.add(id=10, mapping_id=1, address=0xBEEF)
    p.sample.add(location_id=[10, 1], value=[1, 1, 1, 5 * 2**10])
    assert top_functions(p)[0].function == "0xbeef"
    assert top_functions(p)[0].location == "libc.so.6"


def test_cli_top_as_a_subprocess(tmp_path: Path) -> None:
    path = _write(tmp_path, cpu_profile(), "raw.pb", gz=False)
    done = subprocess.run(
        [sys.executable, "-m", "otlp_middleware.cli", "top", path, "-n", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(_table(done.stdout)) == ["fib", "sql", "json_dumps"]


# ------------------------------------------------------------------------------ flame graph


class _Page(html.parser.HTMLParser):
    """Collects start tags and the text of each <script> element."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.frames: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        classes = (dict(attrs).get("class") or "").split()
        self._in = tag if tag == "script" or "frame" in classes else None
        if self._in == "script":
            self.scripts.append("")
        elif self._in:
            self.frames.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts[-1] += data
        elif self._in:
            self.frames[-1] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _tree(data: dict[str, list]) -> dict[str, object]:  # type: ignore[type-arg]
    """Nested {name: (value, {children})} from the page's pre-order arrays."""
    root: dict[str, object] = {}
    stack: list[dict[str, object]] = []
    for f, d, v in zip(data["f"], data["d"], data["v"], strict=True):
        children: dict[str, object] = {}
        del stack[d:]
        (stack[-1] if stack else root)[data["frames"][f][0]] = (v // MS, children)
        stack.append(children)
    return root


def test_flamegraph_embeds_the_merged_tree() -> None:
    page = render_flamegraph_html(cpu_profile(), title="GET <b>/x</b>")
    parsed = _parse(page)
    assert ("b", {}) not in parsed.tags  # the title is escaped
    assert "<title>GET &lt;b&gt;/x&lt;/b&gt;</title>" in page
    assert not any(a.get("src") or a.get("href") for _, a in parsed.tags)  # nothing fetched
    data = json.loads(parsed.scripts[0])
    assert (data["total"], data["samples"], data["unit"]) == (100 * MS, 5, "nanoseconds")
    assert _tree(data) == {
        "all": (
            100,
            {
                "main": (
                    100,
                    {
                        "encode": (15, {"json_dumps": (15, {})}),
                        "handle": (
                            80,
                            {
                                "fib": (40, {"fib": (30, {"fib": (30, {})})}),
                                "sql": (40, {}),
                            },
                        ),
                    },
                )
            },
        )
    }
    assert ["app.py", 20] in [fr[1:] for fr in data["frames"]]


def test_flamegraph_sample_index_and_tags() -> None:
    page = render_flamegraph_html(
        cpu_profile(), sample_index="wall", tag_filter={"http.route": "/items"}
    )
    data = json.loads(_parse(page).scripts[0])
    assert (data["sampleType"], data["total"]) == ("wall", 440 * MS)
    assert "fib" not in [fr[0] for fr in data["frames"]]


def test_flamegraph_escapes_hostile_names() -> None:
    page = render_flamegraph_html(cpu_profile(evil=True), title=EVIL)
    parsed = _parse(page)
    assert [t for t, _ in parsed.tags if t == "img"] == []
    assert len(parsed.scripts) == 2
    assert "<" not in parsed.scripts[0] and ">" not in parsed.scripts[0]
    assert EVIL not in page
    names = [fr[0] for fr in json.loads(parsed.scripts[0])["frames"]]
    assert EVIL in names  # intact as data, shown as text by the page


def test_cli_flamegraph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, cpu_profile())
    out = tmp_path / "out.html"
    assert cli.main(["flamegraph", path, "-o", str(out), "--title", "T1"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    page = out.read_text(encoding="utf-8")
    assert "<title>T1</title>" in page
    assert (
        cli.main(["flamegraph", path, "-o", str(tmp_path / "x.html"), "--sample-index", "x"]) == 1
    )
    assert "unknown sample index" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------ in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)

# Appended to a copy of the page: drives the real UI with real DOM events, then records what
# the page shows into #result so --dump-dom carries it out.
_HARNESS = """<script>
(function () {
  function frames() {
    return Array.prototype.map.call(document.querySelectorAll(".frame"), function (el) {
      return [el.textContent, el.style.left, el.style.width, el.className];
    });
  }
  function find(name) {
    var els = document.querySelectorAll(".frame");
    for (var i = 0; i < els.length; i++) if (els[i].textContent === name) return els[i];
  }
  var out = {initial: frames()};
  var main = find("main"), box = main.getBoundingClientRect();
  main.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: box.left + 2,
                                                  clientY: box.top + 2}));
  out.tip = document.getElementById("fg-tip").textContent;
  out.tipShown = document.getElementById("fg-tip").style.display;
  find("handle").dispatchEvent(new MouseEvent("click", {bubbles: true}));
  out.zoomed = frames();
  var search = document.getElementById("fg-search");
  search.value = "FIB";
  search.dispatchEvent(new Event("input", {bubbles: true}));
  out.searched = frames();
  out.matched = document.getElementById("fg-matched").textContent;
  document.getElementById("fg-reset").click();
  out.reset = frames();
  var pre = document.createElement("pre");
  pre.id = "result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def _dump_dom(tmp_path: Path, page: Path) -> str:
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1200,800",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_flamegraph_renders_in_chromium_and_hostile_names_stay_text(tmp_path: Path) -> None:
    page = tmp_path / "evil.html"
    page.write_text(render_flamegraph_html(cpu_profile(evil=True), title=EVIL), encoding="utf-8")
    dom = _parse(_dump_dom(tmp_path, page))
    assert sorted(set(dom.frames)) == sorted(
        ["all", "main", "handle", EVIL, "sql", "encode", "json_dumps"]
    )
    assert dom.frames.count(EVIL) == 3  # the recursion, one box per level
    assert [t for t, _ in dom.tags if t == "img"] == []
    body = next(attrs for tag, attrs in dom.tags if tag == "body")
    assert "data-pwned" not in body


@needs_chromium
def test_flamegraph_zoom_search_tooltip_reset_in_chromium(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    text = render_flamegraph_html(cpu_profile())
    page.write_text(text.replace("</body>", _HARNESS + "</body>"), encoding="utf-8")
    dom = _dump_dom(tmp_path, page)
    result_start = dom.index('<pre id="result">') + len('<pre id="result">')
    result = json.loads(html.unescape(dom[result_start : dom.index("</pre>", result_start)]))

    def boxes(state: str) -> dict[str, list[tuple[str, str, str]]]:
        found: dict[str, list[tuple[str, str, str]]] = {}
        for name, left, width, cls in result[state]:
            found.setdefault(name, []).append((left, width, cls))
        return {name: sorted(b) for name, b in found.items()}

    initial = boxes("initial")
    assert initial["main"] == [("0%", "100%", "frame")]
    assert initial["handle"] == [("15%", "80%", "frame")]  # after encode, by name order
    assert initial["fib"] == [("15%", "30%", "frame")] * 2 + [("15%", "40%", "frame")]
    assert initial["sql"] == [("55%", "40%", "frame")]
    assert result["tipShown"] == "block"
    tip = ["main", "app.py:1", "100.00ms (100.00% of total)", "self: 5.00ms"]
    assert result["tip"].splitlines() == tip

    zoomed = boxes("zoomed")
    assert zoomed["handle"] == [("0%", "100%", "frame")]
    assert zoomed["main"] == [("0%", "100%", "frame ancestor")]
    assert zoomed["sql"] == [("50%", "50%", "frame")]
    assert "encode" not in zoomed and "json_dumps" not in zoomed

    searched = boxes("searched")
    assert {cls for _, _, cls in searched["fib"]} == {"frame match"}
    assert {cls for _, _, cls in searched["sql"]} == {"frame"}
    assert result["matched"] == "Matched: 40.00ms (50.00%)"  # nested fib counted once

    assert boxes("reset") == {
        name: [(left, width, "frame match" if name == "fib" else "frame") for left, width, _ in b]
        for name, b in initial.items()
    }
