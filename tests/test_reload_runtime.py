"""A reload applies what can change while serving, names what cannot, and parses off the loop."""

from __future__ import annotations

import signal
import sqlite3
import time
from contextlib import closing

import dns.message
import dns.query
import dns.rcode
from helpers import LOOPBACK_CLIENTS, make_policy, to_toml, wait_until


def reloaded(g, n: int) -> None:
    wait_until(lambda: g.stderr_text().count("policy reloaded (SIGHUP)") >= n, 20.0, what=f"reload {n}")


def rewrite(g, policy: dict, n: int) -> None:
    g.policy_path.write_text(to_toml(policy))
    g.proc.send_signal(signal.SIGHUP)
    reloaded(g, n)


def test_reload_applies_clients_rate_limit_and_log_retention(dnsguard):
    base = make_policy(["127.0.0.1:9"], allow=["ok.test"], server={"clients": ["10.0.0.0/8"]},
                       log={"retention_days": 30})
    g = dnsguard(base)
    db = g.workdir / "dnsguard.db"
    assert g.query("denied.test").rcode() == dns.rcode.REFUSED  # loopback is not a client yet
    # A row from 10 days ago: inside 30 days of retention, outside 1.
    def rows() -> int:
        with closing(sqlite3.connect(db)) as conn:
            try:
                return conn.execute("SELECT count(*) FROM lookup_rows").fetchone()[0]
            except sqlite3.OperationalError:  # the writer has not made its tables yet
                return 0

    wait_until(rows, 10.0, what="the first row")
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("INSERT INTO lookup_rows (ts, transport, verdict, mode, rcode, cached, latency_ms,"
                     " note) VALUES (?, 0, 0, 0, 3, 0, 0.1, 'old')", (time.time() - 10 * 86400,))
        conn.commit()

    policy = dict(base, server={"clients": LOOPBACK_CLIENTS, "rate_limit": 5},
                  log={"database": str(db), "retention_days": 1})
    rewrite(g, policy, 1)
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN  # [server] clients applied
    rcodes = [g.query(f"n{i}.test").rcode() for i in range(40)]
    assert dns.rcode.REFUSED in rcodes  # [server] rate_limit applied

    def old_rows() -> int:
        with closing(sqlite3.connect(db)) as conn:
            return conn.execute("SELECT count(*) FROM lookup_rows WHERE note = 'old'").fetchone()[0]

    wait_until(lambda: old_rows() == 0, 20.0, what="the writer to apply retention_days = 1")
    assert "restart" not in g.stderr_text()


def test_settings_that_need_a_restart_are_named_once(dnsguard):
    base = make_policy(["127.0.0.1:9"], allow=["ok.test"])
    g = dnsguard(base, "--no-log")
    moved = dict(base, server=dict(base["server"], listen=["127.0.0.1:1"]),
                 firewall={"ports": ["tcp/8443"]}, docker={"socket": ""}, metrics={"listen": "127.0.0.1:0"})
    rewrite(g, moved, 1)
    g.proc.send_signal(signal.SIGHUP)  # the same file again: nothing new to say
    reloaded(g, 2)
    lines = [line for line in g.stderr_text().splitlines() if "only after a restart" in line]
    assert lines == ["dnsguard: policy reload: these changes take effect only after a restart: "
                     "[docker] socket, [metrics], [firewall] ports (run `dnsguard firewall apply` again)"]
    # The listen address given on the command line wins over the file, so it did not change;
    # the server still answers where it listens.
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN


def test_queries_are_answered_while_a_big_policy_compiles(dnsguard, tmp_path):
    base = make_policy(["127.0.0.1:9"], allow=["ok.test"])
    g = dnsguard(base, "--no-log")
    big = dict(base, allow={"domains": [f"h{i}.svc{i % 997}.example.com" for i in range(300_000)],
                            "cidrs": []})
    g.policy_path.write_text(to_toml(big))
    g.proc.send_signal(signal.SIGHUP)
    answered = 0
    # Until the reload is done, every query is answered, by the old policy.
    while "policy reloaded (SIGHUP)" not in g.stderr_text():
        q = dns.message.make_query("h7.svc7.example.com", "A")
        r = dns.query.udp(q, "127.0.0.1", port=g.port, timeout=5.0)
        if r.rcode() != dns.rcode.NXDOMAIN:
            # The new policy (the name allowed, its upstream absent) may answer before its
            # "reloaded" line has reached us through the stderr pipe -- never before the swap.
            assert r.rcode() == dns.rcode.SERVFAIL
            wait_until(lambda: "policy reloaded (SIGHUP)" in g.stderr_text(), 5.0, what="the reload line")
            break
        answered += 1
        assert answered < 100_000
    assert answered > 0
    assert "300000 rules" in g.stderr_text() or "300001 rules" in g.stderr_text()
