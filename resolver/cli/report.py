"""`dnsguard report`: read the lookup log (formatting only; the data comes from resolver.report)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from resolver.cli import report_conn
from resolver.cli.common import DEFAULT_DB, run_command
from resolver.cli.report_fmt import (
    clients_cell,
    columns,
    csv_text,
    emit,
    head_lines,
    human,
    num,
    rcode_style,
    rules_cell,
    style,
    use_colour,
    verdict_style,
)
from resolver.log import report as rpt

DEFAULT_SINCE = "24h"
FORMATS = ("table", "json", "csv", "html")


# ------------------------------------------------------------------- options
@dataclass
class _Opts:
    db: str | None = None
    since: str | None = None
    until: str | None = None
    client: str | None = None
    verdict: str | None = None
    name: str | None = None
    fmt: str | None = None

    def merged(self, parent: _Opts | None) -> _Opts:
        """Options given on the subcommand win; the rest come from `report` itself."""
        if parent is None:
            return self
        return _Opts(**{k: v if v is not None else getattr(parent, k) for k, v in vars(self).items()})


def _common_options(f: Callable) -> Callable:
    options = [
        click.option("--db", "db", metavar="PATH", envvar="DNSGUARD_DB",
                     help=f"lookup log database (default ./{DEFAULT_DB}; env DNSGUARD_DB)"),
        click.option("--since", metavar="WHEN",
                     help="start of the window: 30m, 1h, 24h, 7d, 2w or an ISO time (UTC unless "
                          "it has an offset)"),
        click.option("--until", metavar="WHEN", help="end of the window (default now); same syntax"),
        click.option("--client", metavar="IP", help="only this client address (or CIDR)"),
        click.option("--verdict", type=click.Choice(["allow", "deny"]), help="only this verdict"),
        click.option("--name", metavar="PATTERN",
                     help="only this name: example.com exactly, *.example.com any depth below it"),
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="output format (default table)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _window(opts: _Opts, default_since: str | None, now: float) -> tuple[float | None, float]:
    since_text = opts.since if opts.since is not None else default_since
    since = rpt.parse_when(since_text, now) if since_text else None
    until = rpt.parse_when(opts.until, now) if opts.until else now
    if since is not None and since >= until:
        raise rpt.ReportError(f"--since ({since_text}) is not before --until ({opts.until or 'now'})")
    return since, until


def _filters(opts: _Opts) -> rpt.Filters:
    return rpt.Filters(client=opts.client, verdict=opts.verdict, name=opts.name)


def _open(opts: _Opts) -> Any:
    return rpt.open_log(opts.db or DEFAULT_DB)


_run = run_command


def _write(path: str | None, text: str) -> None:
    if path is None:
        click.echo(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise rpt.ReportError(f"cannot write {path}: {exc}") from None
    click.echo(f"wrote {path}", err=True)


def _no_html(opts: _Opts) -> None:
    if opts.fmt == "html":
        raise rpt.ReportError("--format html is for the summary (`dnsguard report`), not this view")


# ----------------------------------------------------------------- summary
_SUMMARY_CSV = ("section", "key", "count", "enforce", "audit", "rcode", "rules", "clients",
                "first_seen", "last_seen")


def _summary_csv(data: dict) -> str:
    rows: list[list[Any]] = []
    for key in ("total", "in_window"):
        rows.append(["overflow", key, data["overflow"][key], "", "", "", "", "", "",
                     data["overflow"]["last"]])
    for key in ("total", "in_window"):
        rows.append(["size_dropped", key, data["size_dropped"][key], "", "", "", "", "", "",
                     data["size_dropped"]["last"]])
    for key, value in data["totals"].items():
        if key != "by_verdict_mode":
            rows.append(["totals", key, value, "", "", "", "", "", "", ""])
    for section in ("top_denied", "top_allowed"):
        for r in data[section]:
            rows.append([section, r["name"], r["count"], r["enforce"], r["audit"], "",
                         " ".join("-" if x is None else x for x in r["rules"]), " ".join(r["clients"]),
                         r["first_seen"], r["last_seen"]])
    for r in data["upstream_failures"]:
        rows.append(["upstream_failures", r["name"], r["count"], "", "", r["rcode"], "",
                     " ".join(r["clients"]), r["first_seen"], r["last_seen"]])
    for r in data["blocked_connections"]:
        key = f"{r['destination']} {r['protocol']}/{r['port']}" + (f" {r['name']}" if r["name"] else "")
        rows.append(["blocked_connections", key, r["count"], "", "", "", "", " ".join(r["sources"]),
                     r["first_seen"], r["last_seen"]])
    rows.extend(report_conn.egress_csv_rows(data))
    for r in data["suspicious"]:
        rows.append(["suspicious", r["domain"], r["lookups"], "", "", "", r["kind"], " ".join(r["names"]),
                     r["first_seen"], r["last_seen"]])
    return csv_text(_SUMMARY_CSV, rows)


def _summary_table(data: dict, colour: bool) -> list[str]:
    t = data["totals"]
    cn = data["client_names"]
    lines = head_lines(data, colour)
    share = f" ({t['deny'] / t['lookups']:.1%})" if t["lookups"] else ""
    lines += [
        "",
        f"lookups  {num(t['lookups'])}   allow {num(t['allow'])}   "
        + style(f"deny {num(t['deny'])}{share}", colour and t["deny"] > 0, fg="red")
        + f"   undecided (malformed/refused) {num(t['undecided'])}",
        f"modes    enforce {num(t['enforce'])}   audit {num(t['audit'])}",
        f"distinct names {num(t['distinct_names'])}   clients {num(t['distinct_clients'])}",
    ]
    if not t["lookups"]:
        lines += ["", "no lookups in this window"]
    for title, key in (("Top denied names", "top_denied"), ("Top allowed names", "top_allowed")):
        if not data[key]:
            continue
        lines += ["", style(title, colour, bold=True)]
        rows = [[num(r["count"]), num(r["enforce"]), num(r["audit"]), r["name"], rules_cell(r["rules"]),
                 human(r["first_seen"]), human(r["last_seen"]),
                 clients_cell(r["clients"], r["client_count"], names=cn)] for r in data[key]]
        lines += columns(["COUNT", "ENFORCE", "AUDIT", "NAME", "RULE", "FIRST SEEN", "LAST SEEN", "CLIENTS"],
                        rows, right={0, 1, 2}, colour=colour)
    if data["upstream_failures"]:
        lines += ["", style("Allowed lookups that failed upstream (SERVFAIL / NXDOMAIN)", colour, bold=True)]
        rows = [[num(r["count"]), r["rcode"], r["name"], human(r["first_seen"]), human(r["last_seen"]),
                 clients_cell(r["clients"], r["client_count"], names=cn)] for r in data["upstream_failures"]]
        lines += columns(["COUNT", "RCODE", "NAME", "FIRST SEEN", "LAST SEEN", "CLIENTS"], rows,
                        right={0}, colours={1: rcode_style}, colour=colour)
    if data["blocked_connections"]:
        lines += ["", style("Blocked connections", colour, bold=True)]
        rows = [[num(r["count"]), r["destination"] or "-", f"{r['protocol'] or '-'}/{r['port'] or '-'}",
                 r["name"] or "-", human(r["first_seen"]), human(r["last_seen"]),
                 clients_cell(r["sources"], len(r["sources"]), names=cn)]
                for r in data["blocked_connections"]]
        lines += columns(["COUNT", "DESTINATION", "PORT", "NAME", "FIRST SEEN", "LAST SEEN", "SOURCES"], rows,
                        right={0}, colour=colour)
    lines += report_conn.egress_lines(data, colour)
    if data["suspicious"]:
        lines += ["", style("Suspicious names (exfiltration-shaped; `dnsguard learn` will not allow them)",
                             colour, bold=True)]
        rows = [[num(r["name_count"]), num(r["lookups"]), r["domain"], r["kind"], r["reason"],
                 human(r["first_seen"]), human(r["last_seen"])] for r in data["suspicious"]]
        lines += columns(["NAMES", "LOOKUPS", "UNDER", "KIND", "WHY", "FIRST SEEN", "LAST SEEN"], rows,
                        right={0, 1}, colour=colour)
    lines.append("")
    lines.append("times are UTC; `dnsguard report names` lists every name, `dnsguard report tail` "
                 "the latest lookups")
    return lines


@click.group(invoke_without_command=True)
@_common_options
@click.option("--top", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="rows in each top list")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="write the report to FILE instead of stdout (for --format html)")
@click.option("--upload-warn-mb", type=click.FloatRange(min=0, min_open=True), metavar="MB",
              help="flag a client that sent more than this to one name (default: the policy's "
                   "[report] upload_warn_mb, else 10)")
@click.option("--policy", "policy_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="read [report] settings from this policy")
@click.pass_context
def report(ctx: click.Context, top: int, fmt: str | None, output: str | None, upload_warn_mb: float | None,
           policy_path: str | None, **kw: Any) -> None:
    """Summarise the lookup log: what was asked, what was denied, what failed.

    Without a subcommand prints the summary for the window (default the last 24h):
    totals by verdict and mode, distinct names and clients, the top denied and
    allowed names with counts, first/last seen and the clients that asked, allowed
    lookups that upstream answered SERVFAIL/NXDOMAIN, blocked connections, egress by
    name (connections and bytes out/in per name and client, largest upload first, with a
    LARGE UPLOAD warning above --upload-warn-mb), and at the top how many lookups or
    connections could not be recorded (overflow), if any.

    The filters work with every view and may be given here or after the subcommand.
    The database is opened read-only, so reports are safe while `dnsguard serve` runs.

    \b
    Examples:
      dnsguard report --since 7d --verdict deny
      dnsguard report --db /var/lib/dnsguard/dnsguard.db --name '*.github.com' --format json
      dnsguard report names --client 127.0.0.1
      dnsguard report tail -f
      dnsguard report --since 7d --format html -o report.html
    """
    opts = _Opts(fmt=fmt, **kw)
    ctx.obj = opts
    if ctx.invoked_subcommand is not None:
        return

    def go() -> None:
        now = time.time()
        since, until = _window(opts, DEFAULT_SINCE, now)
        db = _open(opts)
        warn = report_conn.upload_warn_mb(policy_path, upload_warn_mb)
        data = rpt.summary(db, since=since, until=until, filters=_filters(opts), top=top, now=now,
                           upload_warn_mb=warn)
        if opts.fmt == "html":
            from resolver.log.report import html, series

            filters = _filters(opts)
            page = html.render(data, series.series(db, since=since, until=until, filters=filters, now=now),
                               series.clients(db, since=since, until=until, filters=filters, top=top))
            _write(output, page)
        elif output is not None:
            raise rpt.ReportError("-o/--output is for --format html")
        elif opts.fmt == "json":
            click.echo(json.dumps(data, indent=2))
        elif opts.fmt == "csv":
            click.echo(_summary_csv(data), nl=False)
        else:
            emit(_summary_table(data, use_colour()))

    _run(go)


# ------------------------------------------------------------------- names
_NAMES_CSV = ("name", "count", "allow", "deny", "enforce", "audit", "rules", "rcodes", "client_count",
              "clients", "first_seen", "last_seen")


@report.command("names")
@_common_options
@click.option("--sort", type=click.Choice(list(rpt.NAME_SORTS)), default="count", show_default=True,
              help="order of the rows")
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True,
              help="at most this many names (0 = all)")
@click.pass_context
def names_cmd(ctx: click.Context, sort: str, limit: int, fmt: str | None, **kw: Any) -> None:
    """One row per name: lookups, verdicts, rule, rcodes, clients, first/last seen.

    Window defaults to the last 24h; filters as for `dnsguard report`.

    \b
    Examples:
      dnsguard report names --since 7d --verdict deny --sort last
      dnsguard report names --name '*.githubusercontent.com' --format csv > names.csv
    """
    opts = _Opts(fmt=fmt, **kw).merged(ctx.obj)

    def go() -> None:
        _no_html(opts)
        now = time.time()
        since, until = _window(opts, DEFAULT_SINCE, now)
        db = _open(opts)
        data = rpt.names(db, since=since, until=until, filters=_filters(opts), sort=sort,
                         limit=limit or None, now=now)
        if opts.fmt == "json":
            click.echo(json.dumps(data, indent=2))
            return
        if opts.fmt == "csv":
            rows = [[r["name"], r["count"], r["allow"], r["deny"], r["enforce"], r["audit"],
                     " ".join("-" if x is None else x for x in r["rules"]),
                     " ".join(f"{k}={v}" for k, v in r["rcodes"].items()), r["client_count"],
                     " ".join(r["clients"]), r["first_seen"], r["last_seen"]] for r in data["names"]]
            click.echo(csv_text(_NAMES_CSV, rows), nl=False)
            return
        colour = use_colour()
        cn = data["client_names"]
        lines = head_lines(data, colour) + [""]
        if not data["names"]:
            lines.append("no lookups in this window")
        else:
            rows = [[num(r["count"]), num(r["allow"]), num(r["deny"]), num(r["audit"]), r["name"],
                     rules_cell(r["rules"]), " ".join(f"{k}={v}" for k, v in r["rcodes"].items()),
                     human(r["first_seen"]), human(r["last_seen"]),
                     clients_cell(r["clients"], r["client_count"], names=cn)] for r in data["names"]]
            lines += columns(["COUNT", "ALLOW", "DENY", "AUDIT", "NAME", "RULE", "RCODES", "FIRST SEEN",
                             "LAST SEEN", "CLIENTS"], rows, right={0, 1, 2, 3}, colour=colour)
            if limit and len(data["names"]) == limit:
                lines += ["", f"(first {limit} names; --limit 0 for all)"]
        emit(lines)

    _run(go)


# -------------------------------------------------------------------- tail
_TAIL_HEADERS = ["TIME (UTC)", "CLIENT", "PROTO", "TYPE", "VERDICT", "MODE", "RCODE", "MS", "CACHED",
                 "NAME", "RULE / ANSWERS / NOTE"]
# Fixed widths so rows printed later by --follow line up with the first screen.
_TAIL_WIDTHS = [23, 18, 5, 6, 7, 7, 8, 8, 6, 40, 0]


def _tail_cells(r: dict) -> list[str]:
    extra = []
    if r["rule"]:
        extra.append(f"rule {r['rule']}")
    if r["answers"]:
        extra.append("-> " + " ".join(r["answers"]))
    if r["note"]:
        extra.append(f"({r['note']})")
    return [
        human(r["time"], ms=True), r.get("client_name") or r["client"] or "-", r["transport"] or "-",
        r["qtype"] or "-",
        r["verdict"] or "-", r["mode"] or "-", r["rcode"] or "DROPPED",
        "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}", "yes" if r["cached"] else "",
        r["qname"] or "(unreadable)", " ".join(extra),
    ]


class _TailPrinter:
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.colour = use_colour()
        self.started = False

    def rows(self, rows: list[dict]) -> None:
        if self.fmt == "json":
            for r in rows:
                click.echo(json.dumps(r))
        elif self.fmt == "csv":
            text = csv_text(rpt.LOOKUP_COLUMNS, [
                [" ".join(r[c]) if c == "answers" and r[c] else r[c] for c in rpt.LOOKUP_COLUMNS]
                for r in rows])
            click.echo(text if not self.started else text.split("\n", 1)[1], nl=False)
        else:
            lines = columns(_TAIL_HEADERS, [_tail_cells(r) for r in rows], right={7},
                           colours={4: verdict_style, 6: rcode_style}, colour=self.colour,
                           widths=_TAIL_WIDTHS)
            emit(lines if not self.started else lines[1:])
        self.started = True
        sys.stdout.flush()


@report.command("tail")
@_common_options
@click.option("-n", "--lines", "count", type=click.IntRange(1, 1_000_000), default=20, show_default=True,
              help="how many recent lookups")
@click.option("-f", "--follow", is_flag=True,
              help="keep printing new lookups as they are logged (Ctrl-C stops)")
@click.option("--interval", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="seconds between polls with --follow")
@click.pass_context
def tail_cmd(ctx: click.Context, count: int, follow: bool, interval: float, fmt: str | None,
             **kw: Any) -> None:
    """The most recent lookups, oldest first; -f keeps following new ones.

    No window by default (the last N lookups whenever they were); --since/--until and
    the filters narrow it. With --format json each lookup is one JSON object per line
    (schema dnsguard-report-lookup/1), so `tail -f --format json` can be piped.

    \b
    Examples:
      dnsguard report tail -n 50 --verdict deny
      dnsguard report tail -f --client 127.0.0.1
    """
    opts = _Opts(fmt=fmt, **kw).merged(ctx.obj)

    def go() -> None:
        _no_html(opts)
        if follow and opts.until:
            raise rpt.ReportError("--follow cannot be combined with --until")
        now = time.time()
        since = rpt.parse_when(opts.since, now) if opts.since else None
        until = rpt.parse_when(opts.until, now) if opts.until else None
        db = _open(opts)
        filters = _filters(opts)
        printer = _TailPrinter(opts.fmt or "table")
        try:
            mark = rpt.last_id(db)
            rows = rpt.tail(db, n=count, since=since, until=until, filters=filters, max_id=mark)
            if rows or not follow:
                printer.rows(rows)
            while follow:
                time.sleep(interval)
                # Read the high-water mark first, then everything up to it: rows that do not
                # match the filters are skipped once, not rescanned on every poll.
                top = rpt.last_id(db)
                while mark < top:
                    rows = rpt.tail(db, n=10_000, after_id=mark, max_id=top, since=since, filters=filters)
                    if rows:
                        printer.rows(rows)
                    mark = rows[-1]["id"] if len(rows) == 10_000 else top
        except KeyboardInterrupt:
            return  # Ctrl-C is how -f ends: exit 0, no "Aborted!"

    _run(go)


report.add_command(report_conn.connections_cmd)
