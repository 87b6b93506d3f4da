#!/usr/bin/env python3
"""Generate a big, realistic synthetic lookup log for benchmarks and demos.

    python scripts/gen_lookups.py --rows 1000000 --db /tmp/lookups-1m.db
    python scripts/gen_lookups.py --rows 10000000 --days 30 --db /tmp/lookups-10m.db

Rows go straight into the base tables with ``executemany`` (the same schema the server
writes, made by ``resolver.log.querylog``), spread evenly over the last ``--days`` days and
in time order, as a running server would write them. Names follow a Zipf law over
``--names`` names: a few package-registry / code-host names take most lookups, a long
tail of denied telemetry, ad and exfiltration-looking names trails behind. One client
runs in audit mode. A few queue-overflow episodes and blocked connections are added so
every section of the report has something to show.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resolver.core.logdb import MODE_CODES, TRANSPORT_CODES, VERDICT_CODES  # noqa: E402
from resolver.log.schema import open_for_writing, rebuild_rollup  # noqa: E402

ALLOWED_EXACT = [
    "pypi.org", "files.pythonhosted.org", "github.com", "api.github.com", "codeload.github.com",
    "registry.npmjs.org", "crates.io", "static.crates.io", "index.crates.io", "proxy.golang.org",
    "sum.golang.org", "deb.debian.org", "security.debian.org", "huggingface.co",
]
ALLOWED_WILD = ["githubusercontent.com", "docker.io", "amazonaws.com"]
DENIED_EXACT = ["telemetry.example-analytics.com", "api.segment.io", "o0.ingest.sentry.io",
                "stats.g.doubleclick.net", "browser-intake-datadoghq.com"]
DENIED_WILD = ["pastebin.com", "ngrok.io", "transfer.sh"]
CLIENTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1", "fd00::10", "fd00::11", "127.0.0.4",
           "127.0.0.5"]
AUDIT_CLIENTS = {"127.0.0.5"}
SUB_LABELS = ["objects", "raw", "media", "avatars", "release-assets", "cdn", "s3", "auth",
              "registry-1", "production", "api", "www", "uploads", "pkg-containers"]


def _name_table(count: int, rng: random.Random) -> list[tuple[str, int | None, str | None]]:
    """(name, verdict code, rule) in popularity order: index 0 is the most looked-up."""
    table: list[tuple[str, int | None, str | None]] = []
    for name in ALLOWED_EXACT:
        table.append((name, VERDICT_CODES["allow"], name))
    for parent in ALLOWED_WILD:
        for label in SUB_LABELS[:6]:
            table.append((f"{label}.{parent}", VERDICT_CODES["allow"], f"*.{parent}"))
    for name in DENIED_EXACT:
        table.append((name, VERDICT_CODES["deny"], name))
    rng.shuffle(table)  # popularity is not alphabetical
    while len(table) < count:
        kind = rng.random()
        token = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=rng.randint(6, 14)))
        if kind < 0.35:
            parent = rng.choice(ALLOWED_WILD)
            table.append((f"{token}.{rng.choice(SUB_LABELS)}.{parent}", VERDICT_CODES["allow"],
                          f"*.{parent}"))
        elif kind < 0.45:
            parent = rng.choice(DENIED_WILD)
            table.append((f"{token}.{parent}", VERDICT_CODES["deny"], f"*.{parent}"))
        else:
            # Names no rule mentions: the default deny (rule NULL).
            tld = rng.choice(["com", "net", "io", "org", "dev", "xyz"])
            table.append((f"{token}.example-{rng.randint(1, 400)}.{tld}", VERDICT_CODES["deny"], None))
    return table[:count]


def generate(db_path: str, rows: int, days: float, name_count: int, seed: int,
             end: float | None = None, chunk: int = 100_000, analyze: bool = False) -> float:
    """Write ``rows`` synthetic lookups; returns seconds taken."""
    started = time.perf_counter()
    rng = random.Random(seed)
    end = time.time() if end is None else end
    start = end - days * 86400.0
    conn = open_for_writing(db_path, busy_timeout=5.0)
    conn.execute("PRAGMA cache_size = -1000000")  # 1 GB page cache: the indexes stay hot
    names = _name_table(name_count, rng)
    conn.executemany("INSERT OR IGNORE INTO names (name) VALUES (?)", [(n,) for n, _, _ in names])
    conn.executemany("INSERT OR IGNORE INTO clients (addr) VALUES (?)", [(c,) for c in CLIENTS])
    conn.executemany("INSERT OR IGNORE INTO rules (rule) VALUES (?)",
                     [(r,) for r in sorted({r for _, _, r in names if r is not None})])
    conn.commit()
    name_id = dict(conn.execute("SELECT name, id FROM names"))
    client_id = dict(conn.execute("SELECT addr, id FROM clients"))
    rule_id = dict(conn.execute("SELECT rule, id FROM rules"))
    # Per name: (name_id, verdict, rule_id, A answers json, AAAA answers json)
    per_name = []
    for i, (name, verdict, rule) in enumerate(names):
        v4 = json.dumps([f"192.0.2.{i % 250 + 1}"] + ([f"198.51.100.{i % 250 + 1}"] if i % 3 == 0 else []))
        v6 = json.dumps([f"2001:db8::{i % 65535:x}"])
        if name.endswith("githubusercontent.com") and i % 2 == 0:
            v4 = json.dumps(["github.map.fastly.net", f"185.199.108.{i % 4 + 130}"])  # CNAME chain
        per_name.append((name_id[name], verdict, rule_id.get(rule) if rule else None, v4, v6))
    weights = list(itertools.accumulate(1.0 / (rank + 1) ** 1.1 for rank in range(len(per_name))))
    clients = [(client_id[c], MODE_CODES["audit" if c in AUDIT_CLIENTS else "enforce"]) for c in CLIENTS]
    client_weights = list(itertools.accumulate([40, 20, 10, 10, 5, 5, 5, 5]))
    qtypes = [1, 28, 65]  # A, AAAA, HTTPS
    qtype_weights = [55, 90, 100]
    step = (end - start) / max(rows, 1)
    udp, tcp = TRANSPORT_CODES["udp"], TRANSPORT_CODES["tcp"]
    insert = ("INSERT INTO lookup_rows (ts, client_id, transport, name_id, qtype, verdict, mode, rule_id,"
              " rcode, answers, cached, latency_ms, note) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")
    done = 0
    while done < rows:
        k = min(chunk, rows - done)
        picks = rng.choices(per_name, cum_weights=weights, k=k)
        who = rng.choices(clients, cum_weights=client_weights, k=k)
        types = rng.choices(qtypes, cum_weights=qtype_weights, k=k)
        rnd = [rng.random() for _ in range(k)]
        batch = []
        for j in range(k):
            ts = start + (done + j) * step
            nid, verdict, rid, v4, v6 = picks[j]
            cid, mode = who[j]
            qtype = types[j]
            r = rnd[j]
            transport = tcp if r < 0.03 else udp
            if r > 0.9995:  # a malformed packet: no name, no verdict, FORMERR
                batch.append((ts, cid, transport, None, None, None, mode, None, 1, None, 0, 0.02,
                              "formerr: truncated question"))
                continue
            if verdict == 0 and mode == 0:  # denied and enforced: answered locally
                batch.append((ts, cid, transport, nid, qtype, verdict, mode, rid, 3, None, 0, 0.03, None))
                continue
            if r < 0.015:
                rcode, answers, cached, latency = 2, None, 0, 2000.0 + r * 1000  # upstream timeout
            elif r < 0.04 or (verdict == 0 and r < 0.3):
                rcode, answers, cached, latency = 3, None, 0, 8.0 + r * 40
            else:
                rcode = 0
                answers = v4 if qtype == 1 else v6 if qtype == 28 else None
                cached = 1 if r > 0.3 else 0
                latency = 0.05 + r * 0.1 if cached else 4.0 + r * 35
            batch.append((ts, cid, transport, nid, qtype, verdict, mode, rid, rcode, answers, cached,
                          round(latency, 3), None))
        conn.execute("BEGIN")
        conn.executemany(insert, batch)
        conn.commit()
        done += k
    # A few queue-overflow episodes and blocked connections, so every report section shows.
    conn.executemany("INSERT INTO log_overflow (ts, dropped) VALUES (?, ?)",
                     [(end - 3600 * 5, 1200), (end - 86400 * 3, 350)])
    conns = []
    for i in range(min(rows // 1000, 2000)):
        ts = start + (end - start) * (i / max(1, min(rows // 1000, 2000)))
        conns.append((ts, rng.choice(CLIENTS[:3]), f"203.0.113.{i % 7 + 1}", "tcp",
                      rng.choice([443, 22, 8080]), "deny", None if i % 3 else "o0.ingest.sentry.io"))
    conn.executemany("INSERT INTO connections (ts, source, destination, protocol, port, verdict, name)"
                     " VALUES (?,?,?,?,?,?,?)", conns)
    conn.commit()
    # The writer keeps the per-hour rollup as it inserts; rows written here in bulk get theirs
    # in one pass.
    with conn:
        rebuild_rollup(conn)
    if analyze:
        conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, required=True, help="lookups to generate")
    ap.add_argument("--db", required=True, help="database file (appended to if it exists)")
    ap.add_argument("--days", type=float, default=30.0, help="spread over this many days up to now")
    ap.add_argument("--names", type=int, default=20_000, help="distinct names")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--end", type=float, default=None, help="epoch of the newest row (default now)")
    # Off by default: the server's writer never runs ANALYZE, so reports must be fast without it.
    ap.add_argument("--analyze", action="store_true", help="run ANALYZE at the end")
    args = ap.parse_args(argv)
    try:
        took = generate(args.db, args.rows, args.days, args.names, args.seed, args.end,
                        analyze=args.analyze)
    except sqlite3.Error as exc:
        print(f"gen_lookups: {args.db}: {exc}", file=sys.stderr)
        return 1
    print(f"gen_lookups: wrote {args.rows:,} rows to {args.db} in {took:.1f}s "
          f"({args.rows / took:,.0f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
