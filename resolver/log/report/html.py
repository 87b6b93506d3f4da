"""`dnsguard report --format html`: one self-contained page for a person or an incident ticket.

Everything is inline: the CSS, and the charts as SVG drawn by pygal (the optional extra
``dnsguard[html]``) with its tooltip script left out, so the page makes no request to any
address and reads the same with JavaScript off. The data is the summary's (the same dict
``--format json`` prints) plus the per-bucket series and the busiest clients.
"""

from __future__ import annotations

import html
import re
from typing import Any

from resolver.core.units import human_bytes
from resolver.log.report.query import ReportError, iso

# One colour per outcome, in series order; chosen to stay apart for red-green colour blindness.
COLOURS = ("#2b8a3e", "#c92a2a", "#f08c00", "#868e96")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#212529;
background:#f8f9fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dee2e6}
.meta{color:#495057;margin:0 0 16px}
.warn{background:#fff3bf;border:1px solid #f08c00;padding:10px 14px;border-radius:6px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;width:100%;background:#fff;margin:6px 0}
th,td{border:1px solid #dee2e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.chart{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:6px;margin:6px 0}
.chart svg{width:100%;height:auto}.none{color:#868e96}
code{font-size:13px}
"""


def _pygal() -> Any:
    try:
        import pygal
    except ImportError:
        raise ReportError("the HTML report draws its charts with pygal: "
                          "pip install 'dnsguard[html]'") from None
    return pygal


def _svg(chart: Any) -> str:
    # The inline <script> only configures pygal's tooltip JS, which we do not ship; the
    # comments carry pygal's home page address. Neither belongs in an offline page.
    return _SCRIPT.sub("", _COMMENT.sub("", chart.render(is_unicode=True)))


def _style(pygal: Any, colours: tuple[str, ...] = COLOURS) -> Any:
    from pygal.style import Style

    return Style(background="white", plot_background="white", colors=colours, font_family="sans-serif",
                 label_font_size=11, major_label_font_size=11, legend_font_size=12, value_font_size=10)


def _config(pygal: Any, **kw: Any) -> dict:
    return {"js": [], "disable_xml_declaration": True, "explicit_size": False, "style": _style(pygal),
            "print_values": False, "show_y_guides": True, **kw}


def timeline_chart(series: dict) -> str:
    pygal = _pygal()
    step = series["bucket_seconds"]
    labels = [b[11:16] if step < 86400 else b[:10] for b in series["buckets"]]
    if step >= 3600 and len({b[:10] for b in series["buckets"]}) > 1:
        labels = [b[5:10] + " " + b[11:13] + "h" for b in series["buckets"]]
    chart = pygal.StackedBar(**_config(pygal, width=1000, height=320, x_label_rotation=30 if len(labels) > 24
                                       else 0, show_minor_x_labels=False, legend_at_bottom=True,
                                       legend_at_bottom_columns=4, margin=8))
    chart.x_labels = labels
    every = max(1, len(labels) // 24)
    chart.x_labels_major = labels[::every]
    for name in series["outcomes"]:
        chart.add(name, series["counts"][name])
    return _svg(chart)


def names_chart(rows: list[dict], title: str, colour: str) -> str:
    pygal = _pygal()
    chart = pygal.HorizontalBar(**_config(pygal, width=1000, height=40 + 26 * max(1, len(rows)),
                                          show_legend=False, margin=8, style=_style(pygal, (colour,))))
    chart.x_labels = [r["name"] for r in rows][::-1]
    chart.add(title, [r["count"] for r in rows][::-1])
    return _svg(chart)


# -------------------------------------------------------------------------- page
def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _table(headers: list[str], rows: list[list[str]], numeric: frozenset[int] | set[int] = frozenset(),
           empty: str = "none in this window") -> str:
    if not rows:
        return f'<p class="none">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _when(text: str | None) -> str:
    return _e((text or "-").replace("T", " ").rstrip("Z")[:19])


def _name_rows(rows: list[dict]) -> list[list[str]]:
    return [[f"<code>{_e(r['name'])}</code>", _n(r["count"]),
             _e(", ".join("(default deny)" if x is None else x for x in r.get("rules", [])) or "-"),
             _e(", ".join(r.get("clients", [])) + (f" +{r['client_count'] - len(r['clients'])}"
                                                    if r.get("client_count", 0) > len(r.get("clients", []))
                                                    else "")),
             _when(r.get("first_seen")), _when(r.get("last_seen"))] for r in rows]


def _client(addr: str, names: dict[str, str]) -> str:
    # A container's (or fenced user's) name says more than its address; both are shown.
    name = names.get(addr)
    return f"<code>{_e(addr)}</code>" if name is None else f"<b>{_e(name)}</b> <code>{_e(addr)}</code>"


def _egress_warnings(egress: dict, names: dict[str, str]) -> list[str]:
    """Large uploads and unrecorded connections: at the top, before any figure."""
    out = []
    limit = f"{egress['upload_warn_mb']:g}"
    for u in egress["large_uploads"]:
        out.append(f'<div class="warn large-upload"><b>Large upload.</b> {_client(u["client"], names)} sent '
                   f'{_e(human_bytes(u["bytes_out"]))} to <code>{_e(u["name"])}</code> in '
                   f'{_n(u["connections"])} connections ({_when(u["first_seen"])} to '
                   f'{_when(u["last_seen"])}), more than [report] upload_warn_mb = {_e(limit)} MB.</div>')
    ov = egress["overflow"]
    if ov["dropped"]:
        out.append(f'<div class="warn" id="conn-overflow"><b>Connections missing.</b> {_n(ov["dropped"])} '
                   f'connections were not recorded ({_n(ov["dropped_in_window"])} in this window, last '
                   f'{_when(ov["last"])}).</div>')
    for gap in ov.get("gaps", ()):
        until = _when(gap["until"]) if gap["until"] else "now (not back)"
        out.append(f'<div class="warn conn-gap"><b>Connection recorder down.</b> Connections made from '
                   f'{_when(gap["since"])} to {until} may be missing '
                   f'({_e(gap["reason"] or "no reason")}).</div>')
    if ov.get("lost_names"):
        out.append(f'<div class="warn" id="lost-names"><b>Names missing.</b> {_n(ov["lost_names"])} '
                   f"addresses' names did not reach the connection recorder: their connections may be "
                   f"listed without a name, under egress to addresses never looked up.</div>")
    return out


def _egress_sections(egress: dict, names: dict[str, str]) -> list[str]:
    """Egress by name (the largest upload first), then egress to addresses never looked up."""
    rows = egress["egress_by_name"]
    out = ["<h2>Egress by name</h2>"]
    if rows:
        top = rows[:15]
        chart_rows = [{"name": f"{r['name']} <- {names.get(r['client'], r['client'])}",
                       "count": r["bytes_out"]} for r in top]
        chart = names_chart(chart_rows, "bytes out", COLOURS[2])
        out.append(f'<div class="chart" id="egress">{chart}</div>')
    out.append(_table(["name", "client", "connections", "out", "in", "first seen", "last seen"],
                      [[f"<code>{_e(r['name'])}</code>" + (" <b>large upload</b>" if r["large_upload"]
                                                           else ""),
                        _client(r["client"], names), _n(r["connections"]), _e(human_bytes(r["bytes_out"])),
                        _e(human_bytes(r["bytes_in"])), _when(r["first_seen"]), _when(r["last_seen"])]
                       for r in rows], {2, 3, 4}, empty="no connections recorded in this window"))
    out.append("<h2>Egress to addresses never looked up</h2>")
    out.append(_table(["destination", "port", "verdict", "connections", "out", "in", "clients", "last seen"],
                      [[f"<code>{_e(r['destination'])}</code>", _e(f"{r['protocol']}/{r['port']}"),
                        _e(r["verdict"]), _n(r["connections"]), _e(human_bytes(r["bytes_out"])),
                        _e(human_bytes(r["bytes_in"])), ", ".join(_client(c, names) for c in r["clients"]),
                        _when(r["last_seen"])]
                       for r in egress["unnamed_egress"]], {3, 4, 5}, empty="none in this window"))
    return out


def render(summary: dict, series: dict, clients: list[dict]) -> str:
    """The whole page as one string."""
    t = summary["totals"]
    win = summary["window"]
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             # No fetch of anything, ever: the page is meant to be attached to a ticket.
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
             "style-src 'unsafe-inline'; img-src data:\">",
             f"<title>dnsguard report {_when(win['since'])} to {_when(win['until'])}</title>",
             f"<style>{CSS}</style></head><body><main>",
             "<h1>dnsguard lookup report</h1>",
             f'<p class="meta">Window {_when(win["since"])} to {_when(win["until"])} UTC · generated '
             f'{_when(summary["generated"])} UTC · database <code>{_e(summary["database"])}</code>'
             + (f" · filters {_e(summary['filters'])}" if any(summary["filters"].values()) else "") + "</p>"]
    ov = summary["overflow"]
    if ov["in_window"] or ov["total"]:
        parts.append(f'<div class="warn" id="overflow"><b>Lookups missing from this log.</b> '
                     f'{_n(ov["in_window"])} lookups in this window ({_n(ov["total"])} in all, last '
                     f'{_when(ov["last"])}) were answered but not logged: the log queue was full. '
                     f"The figures below undercount.</div>")
    sd = summary.get("size_dropped") or {}
    if sd.get("total") or sd.get("connections"):
        conns = f' and {_n(sd["connections"])} finished connections' if sd.get("connections") else ""
        parts.append(f'<div class="warn" id="size-dropped"><b>Oldest rows deleted.</b> '
                     f'{_n(sd["total"])} logged lookups ({_n(sd["in_window"])} deleted in this window, '
                     f'last {_when(sd["last"])}){conns} were deleted to keep the log under '
                     f"<code>[log] max_size_mb</code>.</div>")
    names = summary.get("client_names") or {}
    egress = summary.get("egress")
    if egress is not None:
        parts += _egress_warnings(egress, names)
    cards = [("lookups", t["lookups"]), ("allowed", t["allow"]), ("denied", t["deny"]),
             ("in audit mode", t["audit"]), ("names", t["distinct_names"]),
             ("clients", t["distinct_clients"])]
    parts.append('<div class="cards">' + "".join(f'<div class="card"><b>{_n(v)}</b>{_e(k)}</div>'
                                                 for k, v in cards) + "</div>")
    unit = "minute" if series["bucket_seconds"] == 60 else "hour"
    parts.append(f"<h2>Lookups per {unit}, by outcome</h2>")
    parts.append(f'<div class="chart" id="timeline">{timeline_chart(series)}</div>')
    for key, title, colour in (("top_denied", "Top denied names", COLOURS[1]),
                               ("top_allowed", "Top allowed names", COLOURS[0])):
        rows = summary[key]
        parts.append(f"<h2>{title}</h2>")
        if rows:
            parts.append(f'<div class="chart" id="{key}">{names_chart(rows, title, colour)}</div>')
        parts.append(_table(["name", "lookups", "rules", "clients", "first seen", "last seen"],
                            _name_rows(rows), {1}))
    parts.append("<h2>Clients</h2>")
    parts.append(_table(["client", "lookups", "denied", "names", "first seen", "last seen"],
                        [[_client(c["client"], names), _n(c["lookups"]), _n(c["denied"]),
                          _n(c["names"]), _when(iso(c["first"])), _when(iso(c["last"]))] for c in clients],
                        {1, 2, 3}))
    parts.append("<h2>Exfiltration-shaped names</h2>")
    parts.append(_table(["domain", "kind", "why", "names (examples)", "lookups"],
                        [[f"<code>{_e(f['domain'])}</code>", _e(f["kind"]), _e(f["reason"]),
                          _e(", ".join(f["names"])) + (f" (+{f['name_count'] - len(f['names'])})"
                                                       if f["name_count"] > len(f["names"]) else ""),
                          _n(f["lookups"])] for f in summary["suspicious"]], {4}))
    parts.append("<h2>Blocked connections</h2>")
    parts.append(_table(["destination", "port", "name", "verdict", "attempts", "sources", "last seen"],
                        [[f"<code>{_e(c['destination'])}</code>", _e(f"{c['protocol']}/{c['port']}"),
                          _e(c["name"] or "-"), _e(c["verdict"]), _n(c["count"]), _e(", ".join(c["sources"])),
                          _when(c["last_seen"])] for c in summary["blocked_connections"]], {4},
                        empty="none recorded in this window"))
    if egress is not None:
        parts += _egress_sections(egress, names)
    parts.append("<h2>Allowed names that failed upstream</h2>")
    parts.append(_table(["name", "rcode", "lookups", "clients", "last seen"],
                        [[f"<code>{_e(f['name'])}</code>", _e(f["rcode"]), _n(f["count"]),
                          _e(", ".join(f["clients"])), _when(f["last_seen"])]
                         for f in summary["upstream_failures"]], {2}))
    parts.append("</main></body></html>")
    return "\n".join(parts)
