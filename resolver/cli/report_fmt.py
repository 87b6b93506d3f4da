"""Text formatting shared by the report commands: aligned tables, colour, times, CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click


def use_colour() -> bool:
    return click.get_text_stream("stdout").isatty()


def style(text: str, colour: bool, **kw: Any) -> str:
    return click.style(text, **kw) if colour else text


def human(iso_text: str | None, ms: bool = False) -> str:
    """``2024-05-01T12:00:00.123Z`` -> ``2024-05-01 12:00:00`` (UTC, like every report time)."""
    if not iso_text:
        return "-"
    text = iso_text.replace("T", " ").rstrip("Z")
    return text if ms else text[:19]


def num(n: int) -> str:
    return f"{n:,}"


def clients_cell(clients: Sequence[str], count: int, show: int = 3,
                  names: dict[str, str] | None = None) -> str:
    # A container's (or fenced user's) name says more than its address; the address is in the JSON.
    shown = ", ".join((names or {}).get(c, c) for c in clients[:show])
    return f"{shown} +{count - show}" if count > show else shown


def rules_cell(rules: Sequence[str | None]) -> str:
    return ", ".join("(default deny)" if r is None else r for r in rules) or "-"


def columns(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = (),
           colours: dict[int, Callable[[str], dict]] | None = None, colour: bool = False,
           widths: Sequence[int] | None = None) -> list[str]:
    """Aligned text columns; the last column is never padded. Styling applies after padding
    so escape codes never upset the alignment."""
    right = set(right)
    if widths is None:
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []

    def fmt(cells: Sequence[str], header: bool) -> str:
        out = []
        last = len(cells) - 1
        for i, cell in enumerate(cells):
            padded = cell if i == last else (cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
            if header:
                padded = style(padded, colour, bold=True)
            elif colours and i in colours:
                how = colours[i](cell)
                if how:
                    padded = style(padded, colour, **how)
            out.append(padded)
        return "  ".join(out).rstrip()

    lines.append(fmt(headers, True))
    lines.extend(fmt(r, False) for r in rows)
    return lines


def verdict_style(cell: str) -> dict:
    return {"fg": "red", "bold": True} if cell == "deny" else {"fg": "green"} if cell == "allow" else {}


def rcode_style(cell: str) -> dict:
    return {"fg": "yellow"} if cell in ("SERVFAIL", "NXDOMAIN", "DROPPED", "FORMERR") else {}


def overflow_lines(overflow: dict, colour: bool, size_dropped: dict | None = None) -> list[str]:
    lines = []
    if overflow["total"]:
        text = (f"WARNING: {num(overflow['total'])} lookups were not logged because the log queue was "
                f"full ({num(overflow['in_window'])} in this window; last {human(overflow['last'])} UTC)")
        lines.append(style(text, colour, fg="red", bold=True))
    if size_dropped and (size_dropped["total"] or size_dropped.get("connections")):
        conns = size_dropped.get("connections") or 0
        text = (f"WARNING: {num(size_dropped['total'])} oldest logged lookups"
                + (f" and {num(conns)} finished connections" if conns else "")
                + f" were deleted to keep the log under [log] max_size_mb ({num(size_dropped['in_window'])} "
                f"lookups in this window; last {human(size_dropped['last'])} UTC)")
        lines.append(style(text, colour, fg="red", bold=True))
    return lines


def head_lines(data: dict, colour: bool) -> list[str]:
    window = data["window"]
    since = human(window["since"]) if window["since"] else "the beginning"
    lines = overflow_lines(data["overflow"], colour, data.get("size_dropped"))
    lines.append(f"dnsguard lookup log {data['database']}")
    lines.append(f"window   {since} .. {human(window['until'])} UTC")
    active = [f"{k}={v}" for k, v in data["filters"].items() if v is not None]
    if active:
        lines.append(f"filters  {' '.join(active)}")
    return lines


def emit(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
