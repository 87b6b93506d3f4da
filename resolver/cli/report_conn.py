"""`dnsguard report connections` and the summary's egress sections (formatting only; the data
comes from resolver.log.report.connections). Registered on the `report` group by
resolver.cli.report; the shared formatting helpers live there (imported when called, as
that module imports this one).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from resolver.cli.report_fmt import (
    columns,
    csv_text,
    emit,
    human,
    num,
    style,
    use_colour,
)
from resolver.core.units import human_bytes
from resolver.log import report as rpt
from resolver.policy.config import ReportSettings, load_config

_CONN_HEADERS = ["START (UTC)", "END", "CLIENT", "SOURCE", "DESTINATION", "PORT", "VERDICT", "NAME", "RULE",
                 "OUT", "IN"]


def upload_warn_mb(policy: str | None, value: float | None) -> float:
    """--upload-warn-mb, else the policy's [report] upload_warn_mb, else the default (10)."""
    if value is not None:
        return value
    if policy:
        return load_config(policy).report.upload_warn_mb
    return ReportSettings().upload_warn_mb


def _endpoint(addr: str | None, port: int | None) -> str:
    if addr is None:
        return "-"
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _conn_verdict_style(cell: str) -> dict:
    return {"fg": "red", "bold": True} if cell == "blocked" else {"fg": "yellow"} if cell == "would-block" \
        else {"fg": "green"} if cell == "allowed" else {}


def overflow_lines(overflow: dict, colour: bool) -> list[str]:

    lines = []
    if overflow["dropped"] or overflow["overruns"]:
        lines.append(f"WARNING: {num(overflow['dropped'])} connections were not recorded "
                     f"({num(overflow['dropped_in_window'])} in this window; last {human(overflow['last'])} "
                     f"UTC); conntrack event buffer overran {num(overflow['overruns'])} times")
    if overflow.get("lost_names"):
        lines.append(f"WARNING: {num(overflow['lost_names'])} addresses' names did not reach the recorder: "
                     "their connections may show no name")
    for gap in overflow.get("gaps", ()):
        end = f"{human(gap['until'])} UTC" if gap["until"] else "now (not back)"
        lines.append(f"WARNING: connections may be missing from {human(gap['since'])} UTC to {end}: "
                     f"{gap['reason']}")
    return [style(text, colour, fg="red", bold=True) for text in lines]


def egress_lines(data: dict, colour: bool) -> list[str]:
    """The summary's "Egress by name", large-upload warnings and unnamed egress, as text."""
    eg = data["egress"]
    # A container's (or fenced user's) name in place of its address, as the lookups tables do.
    names = data.get("client_names") or {}
    lines = overflow_lines(eg["overflow"], colour)
    for u in eg["large_uploads"]:
        who = names.get(u["client"], u["client"])
        lines.append(style(f"LARGE UPLOAD: {who} sent {human_bytes(u['bytes_out'])} to {u['name']} "
                            f"in {num(u['connections'])} connections ({human(u['first_seen'])} .. "
                            f"{human(u['last_seen'])} UTC; warning above {eg['upload_warn_mb']:g} MB)",
                            colour, fg="red", bold=True))
    if eg["egress_by_name"]:
        title = "Egress by name (connections let through; largest upload first)"
        lines += ["", style(title, colour, bold=True)]
        rows = [[human_bytes(r["bytes_out"]), human_bytes(r["bytes_in"]), num(r["connections"]), r["name"],
                 names.get(r["client"], r["client"]),
                 ",".join(r["verdicts"]), human(r["first_seen"]), human(r["last_seen"])
                 + ("  LARGE UPLOAD" if r["large_upload"] else "")] for r in eg["egress_by_name"]]
        lines += columns(["OUT", "IN", "CONNS", "NAME", "CLIENT", "VERDICT", "FIRST SEEN", "LAST SEEN"], rows,
                        right={0, 1, 2}, colour=colour)
    if eg["unnamed_egress"]:
        lines += ["", style("Egress to addresses never looked up ([allow] cidrs, audit)", colour, bold=True)]
        rows = [[human_bytes(r["bytes_out"]), human_bytes(r["bytes_in"]), num(r["connections"]),
                 r["destination"] or "-", f"{r['protocol'] or '-'}/{r['port'] or '-'}", r["verdict"],
                 human(r["first_seen"]), human(r["last_seen"]),
                 ", ".join(names.get(c, c) for c in r["clients"][:3])]
                for r in eg["unnamed_egress"]]
        lines += columns(["OUT", "IN", "CONNS", "DESTINATION", "PORT", "VERDICT", "FIRST SEEN", "LAST SEEN",
                         "CLIENTS"], rows, right={0, 1, 2}, colour=colour)
    return lines


def egress_csv_rows(data: dict) -> list[list[Any]]:
    """Rows for the summary CSV (its columns: section, key, count, enforce, audit, rcode, rules,
    clients, first_seen, last_seen); bytes out/in go in the enforce/audit-free `rules` cell."""
    eg = data["egress"]
    rows: list[list[Any]] = []
    for r in eg["egress_by_name"]:
        rows.append(["egress_by_name", r["name"], r["connections"], "", "", "",
                     f"bytes_out={r['bytes_out']} bytes_in={r['bytes_in']}"
                     + (" large_upload" if r["large_upload"] else ""), r["client"], r["first_seen"],
                     r["last_seen"]])
    for r in eg["large_uploads"]:
        rows.append(["large_uploads", r["name"], r["connections"], "", "", "",
                     f"bytes_out={r['bytes_out']}", r["client"], r["first_seen"], r["last_seen"]])
    for r in eg["unnamed_egress"]:
        rows.append(["unnamed_egress", f"{r['destination']} {r['protocol']}/{r['port']} {r['verdict']}",
                     r["connections"], "", "", "",
                     f"bytes_out={r['bytes_out']} bytes_in={r['bytes_in']}", " ".join(r["clients"]),
                     r["first_seen"], r["last_seen"]])
    for key in ("dropped", "dropped_in_window", "overruns", "lost_names"):
        rows.append(["connection_overflow", key, eg["overflow"][key], "", "", "", "", "", "",
                     eg["overflow"]["last"]])
    for gap in eg["overflow"]["gaps"]:
        rows.append(["connection_gaps", gap["reason"], 1, "", "", "", "", "", gap["since"], gap["until"]])
    return rows


_CONN_CSV = ("id", "start", "end", "open", "duration_s", "source", "source_port", "client", "client_name",
             "destination", "protocol", "port", "name", "verdict", "rule", "packets_out", "bytes_out",
             "packets_in", "bytes_in")


@click.command("connections")
@click.option("--db", "db", metavar="PATH", envvar="DNSGUARD_DB",
              help="lookup log database (env DNSGUARD_DB)")
@click.option("--since", metavar="WHEN", help="start of the window (default 24h ago); same syntax as report")
@click.option("--until", metavar="WHEN", help="end of the window (default now)")
@click.option("--client", metavar="CLIENT", help="a [[clients]] name, or a source address or CIDR")
@click.option("--name", metavar="PATTERN",
              help="only this name: example.com exactly, *.example.com below it")
@click.option("--verdict", type=click.Choice(list(rpt.CONNECTION_VERDICTS)), help="only this verdict")
@click.option("--open", "open_only", is_flag=True, help="only connections still open")
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True,
              help="the most recent N connections (0 = all)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
              help="output format (default table)")
@click.pass_context
def connections_cmd(ctx: click.Context, db: str | None, since: str | None, until: str | None,
                    client: str | None, name: str | None, verdict: str | None, open_only: bool, limit: int,
                    fmt: str | None) -> None:
    """Every outbound connection of the fenced agents: allowed, blocked and would-block.

    One line per connection, oldest first: start and end (none while open), client, source
    and destination, the name whose answer let it through, the rule, and the bytes out and
    in that conntrack counted (IP headers included; open connections are brought up to date
    every [firewall] connection_refresh_s). Needs `dnsguard serve --firewall`.
    JSON follows the schema dnsguard-report-connections/1.

    \b
    Examples:
      dnsguard report connections --since 1h --name '*.openai.com'
      dnsguard report connections --open --format json
      dnsguard report connections --verdict blocked --client openclaw --format csv
    """
    from resolver.cli.report import (
        DEFAULT_SINCE,
        _open,
        _Opts,
        _run,
        _window,
    )

    opts = _Opts(db=db, since=since, until=until, client=client, name=name, fmt=fmt).merged(ctx.obj)

    def go() -> None:
        now = time.time()
        start, end = _window(opts, None if open_only and opts.since is None else DEFAULT_SINCE, now)
        database = _open(opts)
        data = rpt.connections(database, since=start, until=end, now=now, limit=limit or None,
                               filters=rpt.ConnFilters(opts.client, opts.name, verdict, open_only))
        if opts.fmt == "json":
            click.echo(json.dumps(data, indent=2))
            return
        if opts.fmt == "csv":
            rows = [[r[c] for c in _CONN_CSV] for r in data["connections"]]
            click.echo(csv_text(_CONN_CSV, rows), nl=False)
            return
        colour = use_colour()
        lines = overflow_lines(data["overflow"], colour)
        lines.append(f"dnsguard connections {data['database']}")
        window = data["window"]
        lines.append(f"window   {human(window['since']) if window['since'] else 'the beginning'} .. "
                     f"{human(window['until'])} UTC")
        lines.append("")
        if not data["connections"]:
            lines.append("no connections in this window")
        else:
            rows = [[human(r["start"]), "open" if r["open"] else human(r["end"])[11:],
                     r["client"] or r["client_name"] or "-",
                     _endpoint(r["source"], r["source_port"]), r["destination"] or "-",
                     f"{r['protocol'] or '-'}/{'-' if r['port'] is None else r['port']}",
                     r["verdict"], r["name"] or "-", r["rule"] or "-", human_bytes(r["bytes_out"]),
                     human_bytes(r["bytes_in"])] for r in data["connections"]]
            lines += columns(_CONN_HEADERS, rows, right={9, 10}, colours={6: _conn_verdict_style},
                             colour=colour)
            if limit and len(data["connections"]) == limit:
                lines += ["", f"(the latest {limit}; --limit 0 for all)"]
        emit(lines)

    _run(go)
