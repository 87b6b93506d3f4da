"""`dnsguard report --format html`: a real log, the real CLI, and a real browser.

Debian's headless Chromium (driven by Playwright, pointed at /usr/bin/chromium) opens the
file with every network request refused: no request but the file itself, no console error,
the charts present with their number of series, readable with JavaScript off.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import write_log

from resolver.cli.report import report as report_cli
from resolver.core.names import text_to_wire
from resolver.log import report as rpt
from resolver.log.report import series as series_mod

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
H = 3600.0


def rec(ago: float, name: str | bytes, client: str, verdict: str | None, mode: str = "enforce",
        rcode: int = 0) -> tuple:
    wire = name if isinstance(name, bytes) else text_to_wire(name)
    return (NOW - ago, client, "udp", wire, 1, verdict, mode, None, rcode, None, False, 1.0, None)


HOSTILE = b"\x10<script>alert(1)\x07example\x03com\x00"  # a label a client may send; the page must escape it


# (record, count): three clients, allowed / denied / audit would-deny / malformed, over ~5 hours.
FIXTURE = [
    (rec(10 * 60, "pypi.org", "127.0.0.1", "allow"), 30),
    (rec(50 * 60, "files.pythonhosted.org", "127.0.0.1", "allow"), 12),
    (rec(2 * H, "github.com", "127.0.0.2", "allow"), 20),
    (rec(20 * 60, "telemetry.example.com", "127.0.0.1", "deny", rcode=3), 9),
    (rec(3 * H, HOSTILE, "127.0.0.2", "deny", rcode=3), 4),
    (rec(4 * H, "tracker.example.net", "127.0.0.3", "deny", mode="audit"), 5),
    (rec(30 * 60, "bad.example.org", "127.0.0.3", None, rcode=1), 2),
] + [(rec(40 * 60 + i, f"x{i:03d}q9zk2m{i * 7919 % 1000:03d}.exfil.example", "127.0.0.2", "deny", rcode=3), 1)
     for i in range(40)]
TOTAL = sum(n for _, n in FIXTURE)


@pytest.fixture(scope="module")
def log_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("html") / "log.db"
    write_log(str(path), FIXTURE)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO log_overflow (ts, dropped) VALUES (?, ?)", (NOW - H, 17))
        conn.execute("INSERT INTO connections (ts, source, destination, protocol, port, verdict, name) "
                     "VALUES (?,?,?,?,?,?,?)", (NOW - H, "127.0.0.1", "203.0.113.9", "tcp", 443, "deny",
                                                "telemetry.example.com"))
        # Let through (#12): a 15 MB upload to github.com (over the 10 MB warning), a small download
        # from pypi.org, and a would-block flow to an address nobody looked up.
        conn.executemany(
            "INSERT INTO connections (ts, end_ts, source, source_port, destination, protocol, port, verdict, "
            "name, rule, packets_out, bytes_out, packets_in, bytes_in) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(NOW - 2 * H, NOW - 2 * H + 60, "127.0.0.2", 40001, "192.0.2.80", "tcp", 443, "allowed",
              "github.com", "github.com", 11000, 15_000_000, 3000, 200_000),
             (NOW - 50 * 60, NOW - 49 * 60, "127.0.0.1", 40002, "192.0.2.81", "tcp", 443, "allowed",
              "pypi.org", "pypi.org", 40, 4_000, 800, 1_200_000),
             (NOW - 30 * 60, NOW - 30 * 60 + 5, "127.0.0.3", 40003, "198.51.100.7", "tcp", 443, "would-block",
              None, None, 5, 900, 5, 700)])
        # #14: 127.0.0.2 is a Docker container; #11: rows deleted for [log] max_size_mb.
        client_id = conn.execute("SELECT id FROM clients WHERE addr = '127.0.0.2'").fetchone()[0]
        conn.execute("INSERT INTO client_labels (client_id, name, since, until) VALUES (?, ?, 0, NULL)",
                     (client_id, "openclaw-gateway"))
        conn.execute("INSERT INTO log_size_drops (ts, dropped) VALUES (?, ?)", (NOW - H, 5000))
        conn.execute("INSERT INTO connection_gaps (since, until, reason) VALUES (?, ?, ?)",
                     (NOW - 2 * H - 30, NOW - 2 * H, "connection recorder exited with status -9"))
        conn.execute("INSERT INTO connection_overflow (ts, dropped, overruns, lost_names) "
                     "VALUES (?, 0, 0, 4)", (NOW - H,))
    return path


def test_series_buckets_add_up_to_the_totals(log_db: Path) -> None:
    db = rpt.open_log(str(log_db))
    try:
        minutes = series_mod.series(db, since=NOW - 6 * H, until=NOW, now=NOW)
        hours = series_mod.series(db, since=NOW - 2 * 86400, until=NOW, now=NOW)
        audit_only = series_mod.series(db, since=NOW - 6 * H, until=NOW, now=NOW,
                                       filters=rpt.Filters(client="127.0.0.3"))
        clients = series_mod.clients(db, since=NOW - 6 * H, until=NOW)
    finally:
        db.close()
    assert minutes["bucket_seconds"] == 60 and len(minutes["buckets"]) == 361  # partial minutes at both ends
    assert hours["bucket_seconds"] == 3600 and len(hours["buckets"]) == 49
    for s in (minutes, hours):
        assert sum(sum(v) for v in s["counts"].values()) == TOTAL
        assert sum(s["counts"]["allowed"]) == 62
        assert sum(s["counts"]["denied"]) == 53
        assert sum(s["counts"]["would deny (audit)"]) == 5
        assert sum(s["counts"]["malformed / refused"]) == 2
    assert sum(sum(v) for v in audit_only["counts"].values()) == 7
    assert [(c["client"], c["lookups"], c["denied"]) for c in clients] == \
        [("127.0.0.2", 64, 44), ("127.0.0.1", 51, 9), ("127.0.0.3", 7, 5)]


@pytest.fixture(scope="module")
def report_file(log_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html-out") / "report.html"
    args = ["--db", str(log_db), "--since", "2023-11-14T17:00:00Z", "--until", "2023-11-14T22:15:00Z",
            "--format", "html", "-o", str(out)]
    result = CliRunner().invoke(report_cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_page_is_self_contained_and_escaped(report_file: Path) -> None:
    page = report_file.read_text()
    assert re.findall(r"(?:src|href)\s*=", page) == []  # nothing to fetch
    urls = set(re.findall(r"\w+://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace: a name, never fetched
    assert "<script" not in page
    # The name arrives presentation-escaped (\<script\>...) and is HTML-escaped again here.
    assert "<script>alert" not in page and "\\&lt;script\\&gt;alert\\(1\\).example.com" in page
    # Overflow comes first: before the totals.
    assert page.index('id="overflow"') < page.index('class="cards"')
    assert "17 lookups in this window" in page
    assert page.index('id="size-dropped"') < page.index('class="cards"') and "5,000 logged lookups" in page


def test_page_shows_egress_by_name_and_client_names(report_file: Path) -> None:
    page = report_file.read_text()
    warning = page.index('class="warn large-upload"')
    assert warning < page.index('class="cards"')  # a large upload is said before any figure
    assert ("<b>openclaw-gateway</b> <code>127.0.0.2</code> sent 15 MB to <code>github.com</code> in 1 "
            "connections") in page[warning:]
    egress = page[page.index("<h2>Egress by name</h2>"):page.index("<h2>Egress to addresses never")]
    # Largest upload first in the table; sizes as the terminal report writes them.
    table = egress[egress.index("<table"):]
    assert table.index("github.com") < table.index("pypi.org")
    assert "15 MB" in egress and "1.2 MB" in egress and "large upload" in egress
    assert "<b>openclaw-gateway</b>" in egress
    unnamed = page[page.index("<h2>Egress to addresses never"):page.index("<h2>Allowed names that failed")]
    assert "198.51.100.7" in unnamed and "would-block" in unnamed and "192.0.2.80" not in unnamed
    gap = page.index('class="warn conn-gap"')
    assert gap < page.index('class="cards"') and "exited with status -9" in page[gap:gap + 400]
    assert "4 addresses' names did not reach" in page
    clients = page[page.index("<h2>Clients</h2>"):page.index("<h2>Exfiltration-shaped")]
    assert "<b>openclaw-gateway</b> <code>127.0.0.2</code>" in clients


def test_cli_rejects_html_where_it_does_not_fit(log_db: Path) -> None:
    r = CliRunner().invoke(report_cli, ["--db", str(log_db), "--format", "html", "names"])
    assert r.exit_code != 0 and "--format html is for the summary" in r.output
    r = CliRunner().invoke(report_cli, ["--db", str(log_db), "--format", "json", "-o", "x.html"])
    assert r.exit_code != 0 and "-o/--output is for --format html" in r.output


@pytest.fixture(scope="module")
def browser() -> Iterator:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.mark.parametrize("javascript", [True, False], ids=["js-on", "js-off"])
def test_chromium_renders_the_charts_offline(browser, report_file: Path, tmp_path: Path,
                                             javascript: bool) -> None:
    ctx = browser.new_context(java_script_enabled=javascript, viewport={"width": 1150, "height": 900})
    requests: list[str] = []
    problems: list[str] = []

    def route(r) -> None:  # the network is blocked: only the file itself may load
        requests.append(r.request.url)
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            r.abort()

    ctx.route("**/*", route)
    page = ctx.new_page()
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.goto(report_file.as_uri())
    page.wait_for_load_state("load")
    assert requests == [report_file.as_uri()]
    assert problems == []

    def series_count(chart: str) -> int:
        classes = page.eval_on_selector_all(f"#{chart} svg g.series",
                                            "els => els.map(e => e.getAttribute('class'))")
        return len({m for c in classes for m in re.findall(r"serie-\d+", c)})

    assert series_count("timeline") == 4  # allowed, denied, would deny (audit), malformed / refused
    assert series_count("top_denied") == 1 and series_count("top_allowed") == 1
    assert series_count("egress") == 1
    legend = page.eval_on_selector("#timeline svg .legends", "e => e.textContent")
    for outcome in ("allowed", "denied", "would deny (audit)", "malformed / refused"):
        assert outcome in legend
    # The bars are drawn: the timeline has rects with real height, laid out by the browser.
    heights = page.eval_on_selector_all("#timeline svg g.series rect",
                                        "els => els.map(e => e.getBBox().height)")
    assert sum(1 for h in heights if h > 0) >= 5
    assert "17 lookups in this window" in page.inner_text("#overflow")
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ctx.close()
