"""End to end: audit -> learn -> enforce round trip, reloads, and rollback, with real processes.

Real dnsmasq upstream and real `python -m resolver serve` subprocesses (tests/conftest.py),
real SQLite files. Everything talks to 127.0.0.1 only, and every wait is a condition
with a deadline.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import dns.edns
import dns.exception
import dns.rcode
import dns.rdatatype
import pytest
from click.testing import CliRunner
from helpers import wait_until

from resolver.cli.learn import learn as learn_cmd
from resolver.cli.learn import policy as policy_cmd
from resolver.core.names import text_to_wire
from resolver.policy.config import parse_config
from resolver.policy.history import write_atomic

# dnsmasq answers these (conftest's default records; example.test covers every subdomain).
GOOD_WORKLOAD: list[tuple[str, str]] = [
    ("allowed.test", "A"), ("allowed.test", "AAAA"), ("other.test", "A"), ("both.test", "A"),
    ("alias.test", "A"),                       # CNAME -> allowed.test
    ("txt.test", "TXT"),
    ("cache.test", "A"), ("cache.test", "A"),  # the second one from dnsguard's cache
    *[(f"svc{i}.example.test", "A") for i in range(12)],  # -> one *.example.test wildcard
]
TYPOS = ["allowed.tset.test", "pypi.org.lan"]  # NXDOMAIN upstream (--local=/test/ and /lan/)
EXTRA = "corp.test"                            # resolvable, but not in the workload


def ask(g, name: str, rdtype: str, tcp: bool = False):
    return g.query(name, rdtype, tcp=tcp, use_edns=0, timeout=5.0)


def shape(msg) -> tuple:
    """What a client sees, minus TTLs: rcode, and the answer's (owner, type, rdata) set."""
    return (msg.rcode(), frozenset((rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype), rd.to_text())
                                   for rr in msg.answer for rd in rr))


def blocked(msg) -> bool:
    return any(isinstance(o, dns.edns.EDEOption) and o.code == dns.edns.EDECode.BLOCKED for o in msg.options)


def db_rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=2.0)) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the writer has not created the schema yet
        return []


def logged(db: Path) -> int:
    rows = db_rows(db, "SELECT count(*) FROM lookups")
    return rows[0][0] if rows else 0


def wait_logged(db: Path, n: int, timeout: float = 10.0) -> None:
    wait_until(lambda: logged(db) >= n, timeout, what=f"{n} lookups in {db}")
    assert logged(db) == n


def stderr_count(g, text: str) -> int:
    return g.stderr_text().count(text)


def wait_stderr(g, text: str, at_least: int, timeout: float = 10.0) -> None:
    wait_until(lambda: stderr_count(g, text) >= at_least, timeout,
               what=f"{at_least} x {text!r} on dnsguard's stderr:\n{g.stderr_text()[-2000:]}")


def versions(db: Path) -> list[tuple]:
    return db_rows(db, "SELECT id, sha256, path, content FROM policies ORDER BY id")


def wait_versions(db: Path, n: int, timeout: float = 10.0) -> list[tuple]:
    wait_until(lambda: len(versions(db)) >= n, timeout,
               what=f"{n} policy version(s) in {db} -- serve must call resolver.policy.history.record_policy "
                    "at start and after each accepted reload")
    return versions(db)


@pytest.fixture
def upstream(dnsmasq):
    return dnsmasq(extra_args=["--local=/test/", "--local=/lan/"])


# -------------------------------------------------------------------- round trip
def test_audit_learn_enforce_round_trip(upstream, dnsguard, tmp_path: Path) -> None:
    audit_db = tmp_path / "audit.db"
    policy = ('mode = "audit"\n[upstream]\n'
              f'servers = ["{upstream.addr}"]\n[allow]\ndomains = ["allowed.test"]\n')
    g = dnsguard(policy, "--db", str(audit_db))
    seen: dict[tuple[str, str], tuple] = {}
    for i, (name, rdtype) in enumerate(GOOD_WORKLOAD):
        r = ask(g, name, rdtype, tcp=i % 5 == 0)
        assert r.rcode() == dns.rcode.NOERROR, (name, rdtype, r)
        seen[(name, rdtype)] = shape(r)
    for name in TYPOS:
        assert ask(g, name, "A").rcode() == dns.rcode.NXDOMAIN
    assert g.stop() == 0  # SIGTERM drains the log
    assert logged(audit_db) == len(GOOD_WORKLOAD) + len(TYPOS)

    out = tmp_path / "learned.toml"
    r = CliRunner().invoke(learn_cmd, ["--db", str(audit_db), "--output", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    cfg = parse_config(text, str(out))
    assert cfg.mode == "enforce"
    assert sorted(cfg.allow_domains) == sorted(["*.example.test", "allowed.test", "alias.test", "both.test",
                                                "cache.test", "other.test", "txt.test"])
    for name in TYPOS:
        assert not cfg.matcher.decide(text_to_wire(name)).allowed
        assert f"#   {name}  NXDOMAIN x1" in text

    enforce_db = tmp_path / "enforce.db"
    e = dnsguard(text, "--upstream", upstream.addr, "--db", str(enforce_db))
    for i, (name, rdtype) in enumerate(GOOD_WORKLOAD):
        r = ask(e, name, rdtype, tcp=i % 3 == 0)
        assert not blocked(r), (name, rdtype)
        assert shape(r) == seen[(name, rdtype)], (name, rdtype)
    wait_logged(enforce_db, len(GOOD_WORKLOAD))
    assert db_rows(enforce_db, "SELECT count(*) FROM lookups WHERE verdict != 'allow' OR verdict IS NULL") \
        == [(0,)]
    assert db_rows(enforce_db, "SELECT DISTINCT mode FROM lookups") == [("enforce",)]

    # The same workload plus one name it never asked for: exactly that name is denied.
    for name, rdtype in [*GOOD_WORKLOAD, (EXTRA, "A")]:
        r = ask(e, name, rdtype)
        if name == EXTRA:
            assert r.rcode() == dns.rcode.NXDOMAIN and blocked(r)
        else:
            assert shape(r) == seen[(name, rdtype)]
    wait_logged(enforce_db, 2 * len(GOOD_WORKLOAD) + 1)
    assert db_rows(enforce_db, "SELECT qname, rcode FROM lookups WHERE verdict = 'deny'") == \
        [(EXTRA, "NXDOMAIN")]
    assert upstream.count(EXTRA) == 0  # denied names never reach upstream


def test_learn_per_client_against_clients_policy(upstream, dnsguard, tmp_path: Path) -> None:
    """[[clients]]: what 127.0.0.2 asked goes to its own allow list; it then passes, others do not."""
    db = tmp_path / "audit.db"
    base = ('mode = "audit"\n'
            f'[upstream]\nservers = ["{upstream.addr}"]\n'
            '[allow]\ndomains = ["allowed.test"]  # everyone\n\n'
            '[[clients]]\nname = "agent"  # the agent under test\nsources = ["127.0.0.2/32"]\n'
            'allow = []\n')
    g = dnsguard(base, "--db", str(db))
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NOERROR                      # 127.0.0.1
    r = g.query("both.test", "A", source="127.0.0.2", timeout=5.0)                     # the agent
    assert r.rcode() == dns.rcode.NOERROR
    assert g.stop() == 0
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(base)
    r = CliRunner().invoke(learn_cmd, ["--db", str(db), "--merge", str(policy_file), "--output",
                                       str(policy_file)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = policy_file.read_text()
    cfg = parse_config(text)
    assert list(cfg.allow_domains) == ["allowed.test", "other.test"]
    assert [list(c.allow) for c in cfg.clients] == [["both.test"]]
    assert "# the agent under test" in text and "# everyone" in text

    e = dnsguard(text, "--mode", "enforce")
    assert e.query("both.test", "A", source="127.0.0.2", timeout=5.0).rcode() == dns.rcode.NOERROR
    assert e.query("other.test", "A", source="127.0.0.2", timeout=5.0).rcode() == dns.rcode.NOERROR
    assert ask(e, "both.test", "A").rcode() == dns.rcode.NXDOMAIN                      # not for 127.0.0.1
    r = CliRunner().invoke(learn_cmd, ["--db", str(db), "--client", "127.0.0.2", "--output", "-"],
                           catch_exceptions=False)
    assert parse_config(r.stdout).allow_domains == ("both.test",)


# ----------------------------------------------------------------------- reloads
POLICY_V1 = """\
# policy v1: only allowed.test
mode = "enforce"

[upstream]
servers = ["{upstream}"]

[allow]
domains = ["allowed.test"]  # the one name
"""

POLICY_V2 = """\
# policy v2: other.test too
mode = "enforce"

[upstream]
servers = ["{upstream}"]

[allow]
domains = [
    "allowed.test",
    "other.test",  # added in v2
]
"""


class Asker:
    """Queries dnsguard in a loop from a thread until stopped (bounded), recording failures."""

    def __init__(self, g, name: str = "allowed.test", limit: int = 20_000) -> None:
        self.g, self.name, self.limit = g, name, limit
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(self.limit):
            if self._stop.is_set():
                return
            try:
                r = self.g.query(self.name, "A", timeout=2.0)
                if r.rcode() != dns.rcode.NOERROR:
                    self.failures.append(dns.rcode.to_text(r.rcode()))
                else:
                    self.answered += 1
            except (dns.exception.DNSException, OSError) as exc:
                self.failures.append(repr(exc))

    def __enter__(self) -> Asker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


def test_invalid_reload_keeps_the_old_policy_and_answers_continue(upstream, dnsguard, tmp_path: Path) -> None:
    g = dnsguard(POLICY_V1.format(upstream=upstream.addr), "--db", str(tmp_path / "log.db"))
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NXDOMAIN
    with Asker(g) as asker:
        wait_until(lambda: asker.answered >= 20, 10, what="answers before the reload")
        before = asker.answered
        # A broken edit (unknown key), written atomically as an editor would, plus SIGHUP.
        write_atomic(str(g.policy_path), b'mode = "enforce"\n[allow]\ndomainz = ["other.test"]\n')
        g.proc.send_signal(signal.SIGHUP)
        wait_stderr(g, "rejected, keeping the running policy", 1)
        wait_until(lambda: asker.answered >= before + 50, 10, what="answers after the rejected reload")
    assert asker.failures == []
    assert g.alive()
    assert "domainz" in g.stderr_text()
    assert ask(g, "allowed.test", "A").rcode() == dns.rcode.NOERROR
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NXDOMAIN  # the old policy still rules
    assert stderr_count(g, "policy reloaded") == 0


def test_a_valid_edit_takes_effect_without_restart(upstream, dnsguard) -> None:
    g = dnsguard(POLICY_V1.format(upstream=upstream.addr), "--no-log")
    pid = g.proc.pid
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NXDOMAIN
    with Asker(g) as asker:
        write_atomic(str(g.policy_path), POLICY_V2.format(upstream=upstream.addr).encode())
        wait_stderr(g, "policy reloaded (file changed)", 1)  # the watcher, no signal sent
        wait_until(lambda: asker.answered >= 20, 10, what="answers across the reload")
    assert asker.failures == []
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NOERROR
    # SIGHUP works too: back to v1 by hand.
    g.policy_path.write_text(POLICY_V1.format(upstream=upstream.addr))
    g.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: ask(g, "other.test", "A").rcode() == dns.rcode.NXDOMAIN, 10,
               what="v1 back in force")
    assert g.proc.pid == pid and g.alive()


# ---------------------------------------------------------------- history, rollback
def test_serve_records_each_loaded_policy_once(upstream, dnsguard, tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    v1 = POLICY_V1.format(upstream=upstream.addr)
    v2 = POLICY_V2.format(upstream=upstream.addr)
    g = dnsguard(v1, "--db", str(db))
    (first,) = wait_versions(db, 1)
    assert first[1:] == (hashlib.sha256(v1.encode()).hexdigest(), str(g.policy_path), v1)
    # Reloading the same content adds no version; a rejected file adds none either.
    g.proc.send_signal(signal.SIGHUP)
    wait_stderr(g, "policy reloaded (SIGHUP)", 1)
    write_atomic(str(g.policy_path), b"mode = \n")
    wait_stderr(g, "rejected", 1)
    write_atomic(str(g.policy_path), v2.encode())
    wait_stderr(g, "policy reloaded (file changed)", 1)
    got = wait_versions(db, 2)
    assert [row[3] for row in got] == [v1, v2]


def test_rollback_restores_bytes_and_serve_picks_it_up(upstream, dnsguard, tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    v1 = POLICY_V1.format(upstream=upstream.addr)
    v2 = POLICY_V2.format(upstream=upstream.addr)
    g = dnsguard(v1, "--db", str(db))
    wait_versions(db, 1)
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NXDOMAIN      # denied under v1
    write_atomic(str(g.policy_path), v2.encode())
    wait_stderr(g, "policy reloaded (file changed)", 1)
    wait_versions(db, 2)
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NOERROR       # allowed under v2

    runner = CliRunner()
    r = runner.invoke(policy_cmd, ["history", "--db", str(db)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = [line.split() for line in r.stdout.splitlines()[1:3]]
    assert [row[0] for row in table] == ["1", "2"]
    assert table[0][5] == "1"  # v1 denied the one other.test lookup (DENIED column)

    r = runner.invoke(policy_cmd, ["rollback", "1", "--db", str(db)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert g.policy_path.read_bytes() == v1.encode()                    # byte-identical
    backups = sorted(g.policy_path.parent.glob("policy.toml.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == v2.encode()
    wait_stderr(g, "policy reloaded (file changed)", 2)
    assert ask(g, "other.test", "A").rcode() == dns.rcode.NXDOMAIN      # v1 again
    assert ask(g, "allowed.test", "A").rcode() == dns.rcode.NOERROR
    got = wait_versions(db, 3)
    assert got[2][3] == v1 and got[2][1] == got[0][1]
    r = runner.invoke(policy_cmd, ["show", "3", "--db", str(db)], catch_exceptions=False)
    assert r.stdout == v1
    # Reloading the same content again (SIGHUP) records nothing new.
    g.proc.send_signal(signal.SIGHUP)
    wait_stderr(g, "policy reloaded (SIGHUP)", 1)
    assert len(versions(db)) == 3
