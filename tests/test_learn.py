"""`dnsguard learn` against real lookup-log files written by resolver.log.querylog's own writer."""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import re
import sqlite3
import tomllib
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.cli.learn import learn as learn_cmd
from resolver.core.names import text_to_wire
from resolver.log.querylog import QueryLog
from resolver.policy import learn
from resolver.policy.config import parse_config
from resolver.policy.suspicious import wildcard_ok

T0 = 1_700_000_000.0   # 2023-11-14T22:13:20Z
A, CNAME, AAAA, TXT = 1, 5, 28, 16


def rec(name: str, *, ts: float = T0, client: str = "127.0.0.1", qtype: int = A, verdict: str = "deny",
        mode: str = "audit", rule: str | None = None, rcode: int | None = 0,
        answers: str | None = '["10.0.0.1"]', cached: bool = False, note: str | None = None) -> tuple:
    """One lookup-log record (resolver.core.model.LOG_FIELDS order); default: answered in audit mode."""
    return (ts, client, "udp", text_to_wire(name), qtype, verdict, mode, rule, rcode, answers, cached, 1.0,
            note)


def nx(name: str, **kw) -> tuple:
    return rec(name, rcode=3, answers=None, **kw)


def write_log(path: Path, records: list[tuple]) -> Path:
    log = QueryLog(str(path), retention_days=None)
    log.start()
    for r in records:
        log.submit(r)
    assert log.flush(10)
    assert log.close()
    assert log.written == len(records) and log.bad_records == 0
    return path


def learned(path: Path, policy_text: str | None = None, **kw) -> tuple[str, learn.Plan]:
    window = learn.read_log(str(path), since=kw.pop("since", None), until=kw.pop("until", None),
                            clients=kw.pop("clients", ()))
    base = parse_config(policy_text) if policy_text is not None else None
    p = learn.plan(window, policy=base, **kw)
    text = learn.merge(policy_text, p) if policy_text is not None else learn.render_new(p)
    return text, p


def allow_rules(text: str) -> list[str]:
    return list(parse_config(text).allow_domains)


def allowed(text: str, name: str, client: str | None = None) -> bool:
    cfg = parse_config(text)
    matcher = cfg.matcher
    if client is not None:
        addr = ipaddress.ip_address(client)
        for c in cfg.clients:
            if any(net.version == addr.version and addr in net for net in c.sources):
                matcher = c.matcher
    return matcher.decide(text_to_wire(name)).allowed


def entry_line(text: str, rule: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith(f'"{rule}"'):
            return line
    raise AssertionError(f"no entry for {rule!r} in:\n{text}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "log.db"


# ------------------------------------------------------------------- what is learned
def test_answered_names_are_learned_and_the_result_loads(db: Path) -> None:
    write_log(db, [
        rec("pypi.org", verdict="allow", mode="enforce", rule="pypi.org"),       # allowed
        rec("files.pythonhosted.org"),                                          # deny in audit, answered
        rec("files.pythonhosted.org", qtype=AAAA, answers='["2a04:4e42::223"]', cached=True),
        rec("txt.example.org", qtype=TXT, answers=None),                        # NOERROR, data not logged
        nx("pypi.org.lan"),                                                      # typo / search domain
        nx("both.example.org"), rec("both.example.org", ts=T0 + 5),              # NX then answered
        rec("blocked.example.net", mode="enforce", rcode=3, answers=None),       # denied locally
        rec("fail.example.net", rcode=2, answers=None, note="upstream: timeout"),
        rec("nodata.example.net", qtype=AAAA, answers=None),                    # NOERROR, no address
        rec("any.example.net", qtype=255, answers=None, note="ANY (RFC 8482)"),  # answered locally
        rec("ruled.example.org", rule="ruled.example.org"),                     # explicit deny rule, audit
    ])
    text, p = learned(db)
    cfg = parse_config(text)  # must load
    assert cfg.mode == "enforce"
    assert sorted(cfg.allow_domains) == ["both.example.org", "files.pythonhosted.org", "pypi.org",
                                         "txt.example.org"]
    left = {lo.name: lo.category for lo in p.left_out}
    assert left == {"pypi.org.lan": "nxdomain", "blocked.example.net": "denied",
                    "fail.example.net": "no-answer", "nodata.example.net": "no-answer",
                    "any.example.net": "no-answer", "ruled.example.org": "deny-rule"}
    tail = text[text.index("not added"):]
    assert re.search(r"only ever NXDOMAIN.*\n#\s+pypi\.org\.lan\s+NXDOMAIN x1", tail)
    for name in left:
        assert name in tail


def test_each_entry_says_lookups_types_clients_and_first_last_seen(db: Path) -> None:
    write_log(db, [
        rec("api.example.org", ts=T0, client="127.0.0.1"),
        rec("api.example.org", ts=T0 + 60, client="127.0.0.5", qtype=AAAA, answers='["2001:db8::1"]'),
        rec("api.example.org", ts=T0 + 3600, client="127.0.0.1"),
    ])
    text, _ = learned(db)
    line = entry_line(text, "api.example.org")
    assert "3 lookups" in line and "(A/AAAA)" in line
    assert "from 127.0.0.1, 127.0.0.5" in line
    assert "first 2023-11-14T22:13:20Z, last 2023-11-14T23:13:20Z" in line
    assert text.startswith("# Generated by `dnsguard learn`")


def test_window_and_client_filters(db: Path) -> None:
    write_log(db, [rec("old.example.org", ts=T0 - 7200), rec("new.example.org", ts=T0),
                   rec("other.example.org", ts=T0, client="127.0.0.9")])
    text, _ = learned(db, since=T0 - 60)
    assert sorted(allow_rules(text)) == ["new.example.org", "other.example.org"]
    text, _ = learned(db, until=T0 - 60)
    assert allow_rules(text) == ["old.example.org"]
    text, _ = learned(db, clients=("127.0.0.9",))
    assert allow_rules(text) == ["other.example.org"]
    text, _ = learned(db, clients=("127.0.0.0/30",))
    assert sorted(allow_rules(text)) == ["new.example.org", "old.example.org"]


def test_names_with_odd_bytes_are_listed_not_allowed(db: Path) -> None:
    write_log(db, [rec("a\\.b.example.org"), rec("c\\000d.example.org"), rec("fine.example.org")])
    text, p = learned(db)
    assert allow_rules(text) == ["fine.example.org"]
    assert not allowed(text, "a\\.b.example.org") and not allowed(text, "a.b.example.org")
    assert {f.kind for f in p.findings} == {"charset"}
    assert "#       a\\.b.example.org\n" in text and "#       c\\000d.example.org\n" in text


# -------------------------------------------------------------------------- collapse
def test_many_subdomains_of_a_registrable_domain_collapse(db: Path) -> None:
    write_log(db, [rec(f"h{i}.example.com", ts=T0 + i) for i in range(12)] + [rec("example.com")])
    text, _ = learned(db)
    # The apex stays exact: *.example.com does not match example.com itself.
    assert sorted(allow_rules(text)) == ["*.example.com", "example.com"]
    line = entry_line(text, "*.example.com")
    assert "wildcard for 12 names" in line and "h0.example.com" in line and "12 lookups" in line


def test_collapse_threshold_is_configurable_and_inclusive(db: Path) -> None:
    write_log(db, [rec(f"h{i}.example.com") for i in range(9)])
    text, _ = learned(db)
    assert sorted(allow_rules(text)) == sorted(f"h{i}.example.com" for i in range(9))
    text, _ = learned(db, collapse_threshold=9)
    assert allow_rules(text) == ["*.example.com"]
    assert "9 distinct names under one parent (--collapse-threshold)" in text


def test_the_deepest_justified_parent_wins(db: Path) -> None:
    write_log(db, [rec(f"n{i}.api.example.com") for i in range(12)]
              + [rec(f"w{i}.example.com") for i in range(3)])
    text, _ = learned(db)
    assert sorted(allow_rules(text)) == ["*.api.example.com", "w0.example.com", "w1.example.com",
                                         "w2.example.com"]


@pytest.mark.parametrize("parent", ["co.uk", "github.io", "s3.amazonaws.com", "amazonaws.com",
                                    "compute-1.amazonaws.com", "com"])
def test_subdomains_of_public_suffixes_never_collapse(db: Path, parent: str) -> None:
    write_log(db, [rec(f"site{i}.{parent}") for i in range(25)]
              + [rec(f"www.site{i}.{parent}") for i in range(25)])
    text, _ = learned(db)
    rules = allow_rules(text)
    assert not any(r.startswith("*.") for r in rules), rules
    assert f'"*.{parent}"' not in text
    assert len(rules) == 50


def test_deep_names_under_a_public_suffix_collapse_only_inside_one_registrant(db: Path) -> None:
    write_log(db, [rec(f"p{i}.alice.github.io") for i in range(12)]
              + [rec(f"bob{i}.github.io") for i in range(12)])
    text, _ = learned(db)
    rules = allow_rules(text)
    assert "*.alice.github.io" in rules
    assert [r for r in rules if r.startswith("*.")] == ["*.alice.github.io"]


def test_no_wildcard_over_suspicious_names(db: Path) -> None:
    rng = random.Random(1)
    chunks = [base64.b32encode(rng.randbytes(20)).decode().rstrip("=").lower() for _ in range(5)]
    write_log(db, [rec(f"h{i}.example.com") for i in range(15)]
              + [nx(f"{c}.example.com", ts=T0 + 100 + i) for i, c in enumerate(chunks)])
    text, p = learned(db)
    rules = allow_rules(text)
    assert "*.example.com" not in rules
    assert sorted(rules) == sorted(f"h{i}.example.com" for i in range(15))
    for c in chunks:
        assert not allowed(text, f"{c}.example.com")
        assert f"{c}.example.com" in text  # listed in a comment


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "www", "api", "x1"]), min_size=1, max_size=3),
                min_size=1, max_size=60),
       st.sampled_from(["example.com", "co.uk", "github.io", "s3.amazonaws.com", "amazonaws.com",
                        "foo.github.io"]),
       st.integers(min_value=2, max_value=6))
def test_collapse_invariants(prefixes: list[list[str]], parent: str, threshold: int) -> None:
    names = {".".join([*p, parent]) for p in prefixes}
    rules = learn.collapse(names, threshold)
    covered = [n for members in rules.values() for n in members]
    assert sorted(covered) == sorted(names)  # every name exactly once
    for rule, members in rules.items():
        if rule.startswith("*."):
            base = rule[2:]
            assert wildcard_ok(base)
            assert len(members) >= threshold
            assert all(m.endswith("." + base) for m in members)
        else:
            assert members == [rule]


# ------------------------------------------------------------------------ exfiltration
def test_exfiltration_workload_is_flagged_and_not_allowed(db: Path) -> None:
    rng = random.Random(2)
    records = [rec("www.legit.example.org")]
    tunnel = []
    for i in range(300):
        name = f"{base64.b32encode(rng.randbytes(20)).decode().rstrip('=').lower()}.t.evil.example"
        tunnel.append(name)
        records.append(rec(name, ts=T0 + i * 0.05, answers='["127.0.0.2"]'))  # answered: still data
    write_log(db, records)
    text, p = learned(db)
    assert allow_rules(text) == ["www.legit.example.org"]
    assert not any(allowed(text, n) for n in tunnel)
    assert "evil.example: 300 names, 300 lookups" in text
    assert re.search(r"300 new distinct names under evil\.example within 60s", text)
    flagged = {n for f in p.findings for n in f.names}
    assert flagged == set(tunnel)
    # The same findings are available straight from the log, for `dnsguard report`.
    again = learn.find_suspicious(str(db))
    assert {n for f in again for n in f.names} == set(tunnel)


# ---------------------------------------------------------------------------- merge
BASE = """\
# Team policy -- reviewed 2024-05-01
mode = "enforce"  # keep enforcing

[server]
clients = ["127.0.0.0/8"]

[allow]
# Python packaging
domains = ["pypi.org", "files.pythonhosted.org"]  # pinned
cidrs = []

[deny]
domains = ["bad.example.org"]  # never

[[clients]]
name = "agent"        # the coding agent
sources = ["127.0.0.2/32"]
allow = [
  "agent-only.example.org",  # hand-written
]

[[clients]]
name = "ci"
sources = ["127.0.0.3/32"]
"""


def test_merge_preserves_comments_order_and_adds_per_client(db: Path) -> None:
    write_log(db, [
        rec("pypi.org", client="127.0.0.1"),                     # already allowed
        rec("new.example.org", client="127.0.0.1"),              # unnamed client -> [allow]
        rec("shared.example.org", client="127.0.0.1"),           # unnamed + agent -> [allow] only
        rec("shared.example.org", client="127.0.0.2"),
        rec("agent.example.org", client="127.0.0.2"),            # agent -> its allow
        rec("ci.example.org", client="127.0.0.3"),               # ci -> its allow (had none)
        rec("bad.example.org", client="127.0.0.1"),              # the policy denies it
    ])
    text, p = learned(db, BASE)
    # Every original line is still there, in the original order.
    lines = text.splitlines()
    inline = 'domains = ["pypi.org", "files.pythonhosted.org"]  # pinned'
    at = -1
    for line in BASE.splitlines():
        if line.strip() not in ("", "]", inline):
            at = lines.index(line, at + 1)  # raises if missing or out of order
    # The one-line array grew onto new lines; its items and trailing comment stay put.
    assert 'domains = ["pypi.org", "files.pythonhosted.org",\n' in text and "\n]  # pinned\n" in text
    assert text.startswith("# Team policy -- reviewed 2024-05-01\nmode = \"enforce\"  # keep enforcing\n")
    cfg = parse_config(text)
    assert list(cfg.allow_domains) == ["pypi.org", "files.pythonhosted.org", "new.example.org",
                                       "shared.example.org"]
    clients = {c.name: list(c.allow) for c in cfg.clients}
    assert clients == {"agent": ["agent-only.example.org", "agent.example.org"], "ci": ["ci.example.org"]}
    assert list(cfg.deny_domains) == ["bad.example.org"]
    assert allowed(text, "agent.example.org", "127.0.0.2") and not allowed(text, "agent.example.org")
    assert [lo.category for lo in p.left_out if lo.name == "bad.example.org"] == ["deny-rule"]
    # Learning the same log into the result adds nothing more.
    again, p2 = learned(db, text)
    assert p2.added() == 0
    assert parse_config(again).allow_domains == cfg.allow_domains


def test_merge_into_multiline_and_empty_arrays_keeps_them_tidy(db: Path) -> None:
    base = 'mode = "audit"\n\n[allow]\ndomains = [\n    "pypi.org",  # python\n]\n\n[deny]\ndomains = []\n'
    write_log(db, [rec("new.example.org")])
    text, _ = learned(db, base)
    assert '    "pypi.org",  # python\n' in text
    assert "\n\n]" not in text and "domains = [\n" in text
    assert tomllib.loads(text)["allow"]["domains"] == ["pypi.org", "new.example.org"]
    assert tomllib.loads(text)["mode"] == "audit"  # the policy's own settings are not touched
    base2 = "[deny]\ndomains = []\n"  # no [allow] at all
    text2, _ = learned(db, base2)
    assert parse_config(text2).allow_domains == ("new.example.org",)


# ------------------------------------------------------------------------------ CLI
def run(args: list[str]):
    result = CliRunner().invoke(learn_cmd, args, catch_exceptions=False)
    return result


def test_cli_writes_the_file_and_merges_in_place(db: Path, tmp_path: Path) -> None:
    write_log(db, [rec("one.example.org"), nx("typo.example.org.lan")])
    out = tmp_path / "policy.toml"
    r = run(["--db", str(db), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "learned 1 rule(s)" in r.stderr and "1 NXDOMAIN-only" in r.stderr
    assert parse_config(out.read_text()).allow_domains == ("one.example.org",)
    write_log(tmp_path / "log2.db", [rec("two.example.org")])
    r = run(["--db", str(tmp_path / "log2.db"), "--merge", str(out), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert parse_config(out.read_text()).allow_domains == ("one.example.org", "two.example.org")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".policy.toml")]  # no temp left


def test_cli_diff_lists_additions_and_unused_rules(db: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(BASE)
    before = base.read_bytes()
    write_log(db, [rec("pypi.org"), rec("new.example.org"), rec("agent.example.org", client="127.0.0.2")])
    r = run(["--db", str(db), "--diff", str(base)])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert 'would add to [allow] domains (1):\n  + "new.example.org"' in out
    assert 'would add to [[clients]] "agent" allow (1):\n  + "agent.example.org"' in out
    assert '- "files.pythonhosted.org"  ([allow] domains)' in out
    assert '- "agent-only.example.org"  ([[clients]] "agent" allow)' in out
    assert '- "pypi.org"' not in out
    assert base.read_bytes() == before  # --diff writes nothing
    r = run(["--db", str(db), "--diff", str(base), "--format", "json"])
    data = json.loads(r.stdout)
    assert {(a["section"], a["rule"]) for a in data["add"]} == {("[allow]", "new.example.org"),
                                                                ("agent", "agent.example.org")}
    assert {(u["section"], u["rule"]) for u in data["unused"]} == {
        ("[allow]", "files.pythonhosted.org"), ("agent", "agent-only.example.org")}


@pytest.mark.parametrize(("args", "message"), [
    (["--db", "{tmp}/missing.db"], "no lookup log at"),
    (["--db", "{db}", "--client", "not-an-ip"], "--client must be an IP address or CIDR"),
    (["--db", "{db}", "--since", "yesterday-ish"], "cannot read time"),
    (["--db", "{db}", "--since", "1h", "--until", "2h"], "--since is not before --until"),
    (["--db", "{db}", "--merge", "{policy}", "--diff", "{policy}"], "use --merge or --diff, not both"),
    (["--db", "{bad}"], "not a dnsguard lookup log"),
])
def test_cli_errors_are_one_clean_line(db: Path, tmp_path: Path, args: list[str], message: str) -> None:
    write_log(db, [rec("one.example.org")])
    policy = tmp_path / "p.toml"
    policy.write_text(BASE)
    bad = tmp_path / "other.db"
    with closing(sqlite3.connect(bad)) as conn:
        conn.execute("CREATE TABLE t (x)")
    args = [a.format(tmp=tmp_path, db=db, policy=policy, bad=bad) for a in args]
    r = run(args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output


def test_merge_refuses_a_policy_that_does_not_load(db: Path, tmp_path: Path) -> None:
    write_log(db, [rec("one.example.org")])
    broken = tmp_path / "broken.toml"
    broken.write_text('[allow]\ndomains = ["*"]\n')
    r = run(["--db", str(db), "--merge", str(broken), "--output", str(broken)])
    assert r.exit_code == 1
    assert "a wildcard must be a whole leading label" in r.output or "not a valid name" in r.output
    assert broken.read_text() == '[allow]\ndomains = ["*"]\n'


# ---------------------------------------------------------------------- firewall
def test_would_block_connections_are_suggested_never_added(db: Path) -> None:
    write_log(db, [rec("api.example.org")])
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO connections (ts, source, destination, protocol, port, verdict, name) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(T0, "127.0.0.1", "203.0.113.7", "tcp", 443, "would-block", "api.example.org"),
             (T0 + 5, "127.0.0.1", "203.0.113.7", "tcp", 443, "would-block", "api.example.org"),
             (T0, "127.0.0.1", "2001:db8::7", "udp", 443, "would-block", None),
             (T0, "127.0.0.1", "198.51.100.1", "tcp", 443, "allow", "ok.example.org"),
             (T0, "127.0.0.9", "192.0.2.99", "tcp", 22, "would-block", None)])
    text, p = learned(db, clients=("127.0.0.1",))
    cfg = parse_config(text)
    assert cfg.allow_cidrs == ()
    assert re.search(r'#\s+"203\.0\.113\.7/32",\s+# 2 connections tcp/443 to api\.example\.org', text)
    assert '"2001:db8::7/128"' in text
    assert "198.51.100.1" not in text and "192.0.2.99" not in text
    # Already-allowed destinations are not suggested again.
    base = '[allow]\ndomains = []\ncidrs = ["203.0.113.0/24"]\n'
    text2, _ = learned(db, base, clients=("127.0.0.1",))
    assert "203.0.113.7" not in text2 and "2001:db8::7/128" in text2


def test_no_connections_table_is_fine(db: Path) -> None:
    write_log(db, [rec("api.example.org")])
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TABLE connections")
    text, p = learned(db)
    assert p.connections == [] and "Firewall" not in text
