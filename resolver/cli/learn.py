"""`dnsguard learn` and `dnsguard policy ...` (formatting only; the work is in learn/history).

Registered by ``resolver.cli`` with ``main.add_command(learn)`` and
``main.add_command(policy)``.
"""

from __future__ import annotations

import json
import time

import click

from resolver.cli.common import DEFAULT_DB, run_command
from resolver.policy import history
from resolver.policy import learn as lrn
from resolver.policy.config import load_config

_run = run_command


def _when(text: str | None, now: float) -> float | None:
    if not text:
        return None
    from resolver.log.report import parse_when  # the same time syntax as `dnsguard report`

    return parse_when(text, now)


_db_option = click.option("--db", "db", metavar="PATH", envvar="DNSGUARD_DB", default=DEFAULT_DB,
                          show_default=True, help="lookup log database (env DNSGUARD_DB)")


# ------------------------------------------------------------------------ learn
@click.command("learn")
@_db_option
@click.option("--since", metavar="WHEN",
              help="start of the window: 30m, 1h, 24h, 7d, 2w or an ISO time (default: the whole log)")
@click.option("--until", metavar="WHEN", help="end of the window (default now); same syntax")
@click.option("--client", "clients", metavar="IP", multiple=True,
              help="only lookups from this address or CIDR; repeatable")
@click.option("--output", "-o", metavar="PATH", default="-",
              help="write the policy here (atomically) instead of stdout")
@click.option("--merge", "merge_path", metavar="POLICY", type=click.Path(dir_okay=False, exists=True),
              help="add to this existing policy, keeping its comments and order ([[clients]] get "
                   "their own names)")
@click.option("--diff", "diff_path", metavar="POLICY", type=click.Path(dir_okay=False, exists=True),
              help="print what --merge would add and which allow rules went unused; write nothing")
@click.option("--collapse-threshold", type=click.IntRange(2, 1_000_000),
              default=lrn.DEFAULT_COLLAPSE_THRESHOLD, show_default=True,
              help="distinct names under one parent needed before proposing *.parent")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="--diff output format")
@click.option("--upload-warn-mb", type=click.FloatRange(min=0, min_open=True), metavar="MB",
              help="--diff lists uploads above this to one name (default: the policy's [report] "
                   "upload_warn_mb, else 10)")
def learn(db: str, since: str | None, until: str | None, clients: tuple[str, ...], output: str,
          merge_path: str | None, diff_path: str | None, collapse_threshold: int, fmt: str,
          upload_warn_mb: float | None) -> None:
    """Write a policy from what was looked up (run `serve --mode audit --db PATH` first).

    Every name upstream answered in the window becomes an allow entry with a comment:
    lookups, query types, connections and bytes out (when `serve --firewall` recorded
    them), clients, first and last seen. Many names under one
    registrable domain become one `*.domain` wildcard (never at or above a public
    suffix such as *.com, *.co.uk or *.github.io). Names that only got NXDOMAIN, and
    names shaped like data exfiltration (long, hex/base32/base64-looking or
    high-entropy labels, bursts of new names under one domain), are left out and
    listed in comments. Destinations the firewall would have blocked are listed as
    commented-out [allow] cidrs suggestions, never added.

    --diff also lists resolved names nothing connected to, and names a client uploaded more
    than --upload-warn-mb to.

    With --merge POLICY the entries are appended to that file's lists (its comments and
    order kept); lookups from a [[clients]] entry's sources go to that client's
    `allow`. The result always loads with `dnsguard check`.

    \b
    Examples:
      dnsguard learn --db audit.db --output policy.toml
      dnsguard learn --db audit.db --since 7d --client 10.0.0.5 -o agent.toml
      dnsguard learn --db audit.db --merge policy.toml -o policy.toml
      dnsguard learn --db audit.db --diff policy.toml
    """

    def go() -> None:
        if merge_path and diff_path:
            raise click.UsageError("use --merge or --diff, not both")
        now = time.time()
        t0 = _when(since, now)
        t1 = _when(until, now)
        if t0 is not None and t1 is not None and t0 >= t1:
            raise lrn.LearnError("--since is not before --until")
        base_path = merge_path or diff_path
        base = load_config(base_path) if base_path else None
        window = lrn.read_log(db, since=t0, until=t1, clients=clients)
        p = lrn.plan(window, policy=base, collapse_threshold=collapse_threshold,
                     upload_warn_mb=upload_warn_mb)
        if diff_path:
            if fmt == "json":
                click.echo(json.dumps(_diff_json(p), indent=2))
            else:
                click.echo(lrn.render_diff(p), nl=False)
            return
        if merge_path:
            with open(merge_path, encoding="utf-8", newline="") as fh:
                text = lrn.merge(fh.read(), p, merge_path)
        else:
            text = lrn.render_new(p)
        if output == "-":
            click.echo(text, nl=False)
        else:
            history.write_atomic(output, text.encode("utf-8"))
            click.echo(f"dnsguard: wrote {output}", err=True)
        click.echo(f"dnsguard: {lrn.summary(p)}", err=True)

    _run(go)


def _diff_json(p: lrn.Plan) -> dict:
    def section(s: str | None) -> str:
        return "[allow]" if s is None else s

    return {
        "add": [{"section": section(s), "rule": e.rule, "names": list(e.names), "lookups": e.lookups,
                 "connections": None if e.egress is None else e.egress.connections,
                 "bytes_out": None if e.egress is None else e.egress.bytes_out,
                 "clients": list(e.clients), "qtypes": list(e.qtypes), "first_seen": history.iso(e.first),
                 "last_seen": history.iso(e.last)}
                for s, es in p.sections.items() for e in es],
        "unused": [{"section": section(s), "rule": r} for s, r in p.unused],
        "left_out": [{"name": lo.name, "category": lo.category, "detail": lo.detail, "lookups": lo.lookups}
                     for lo in p.left_out],
        "suspicious": [f.as_dict() for f in p.findings],
        # null when the log has no connection records
        "never_connected": None if p.window.egress is None else lrn.never_connected(p),
        "large_uploads": [{"name": n, "client": src, "connections": e.connections, "bytes_out": e.bytes_out}
                          for n, src, e in lrn.large_uploads(p)],
        "upload_warn_mb": p.upload_warn_mb,
    }


# ----------------------------------------------------------------------- policy
@click.group("policy")
def policy() -> None:
    """Policy history: every policy `serve` loaded, and rolling back to one.

    `serve` records each policy it loads (at start and on every accepted reload) in
    its lookup-log database.

    \b
    Examples:
      dnsguard policy history --db dnsguard.db
      dnsguard policy show 3 --db dnsguard.db
      dnsguard policy rollback 3 --db dnsguard.db --policy policy.toml
    """


@policy.command("history")
@_db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def history_cmd(db: str, fmt: str) -> None:
    """List recorded policy versions, oldest first, with what each one denied.

    LOOKUPS and DENIED count the log's lookups between a version's load and the next
    version's (the newest: until now).
    """

    def go() -> None:
        vs = history.versions(db)
        if fmt == "json":
            click.echo(json.dumps([v.as_dict() for v in vs], indent=2))
            return
        if not vs:
            click.echo("no policy versions recorded")
            return
        rows = [["ID", "LOADED (UTC)", "SHA256", "BYTES", "LOOKUPS", "DENIED", "PATH"]]
        for i, v in enumerate(vs):
            rows.append([str(v.id) + (" *" if i == len(vs) - 1 else ""), history.iso(v.ts) or "-",
                         v.sha256[:12], str(v.size), "-" if v.lookups is None else str(v.lookups),
                         "-" if v.denied is None else str(v.denied), v.path])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        click.echo("\n* = the newest (what a running server loaded last)")

    _run(go)


@policy.command("show")
@click.argument("version", type=int)
@_db_option
def show_cmd(version: int, db: str) -> None:
    """Print policy VERSION exactly as it was loaded."""

    def go() -> None:
        _, text = history.content(db, version)
        click.echo(text, nl=False)

    _run(go)


@policy.command("rollback")
@click.argument("version", type=int)
@_db_option
@click.option("--policy", "policy_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="file to write (default: the file the newest version was loaded from)")
def rollback_cmd(version: int, db: str, policy_path: str | None) -> None:
    """Write policy VERSION back to the policy file, byte for byte.

    The current file is kept as PATH.bak-<UTC time>; the new one replaces it in one
    rename, and a running `dnsguard serve` picks it up within a second (or send it
    SIGHUP).
    """

    def go() -> None:
        r = history.rollback(db, version, policy_path)
        if r.unchanged:
            click.echo(f"{r.path} already holds version {version}; nothing to do")
            return
        click.echo(f"wrote version {version} ({r.version.sha256[:12]}, loaded {history.iso(r.version.ts)}) "
                   f"to {r.path}" + (f"; previous file kept as {r.backup}" if r.backup else ""))

    _run(go)


if __name__ == "__main__":  # pragma: no cover - `python -m resolver.cli.learn` before registration
    @click.group()
    def _main() -> None:
        pass

    _main.add_command(learn)
    _main.add_command(policy)
    _main()
