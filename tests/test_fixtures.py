"""The test infrastructure itself: dnsmasq and the test nameserver, driven with dnspython.

If these fail, every end-to-end result is suspect, so they run first and alone.
"""

from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from helpers import addresses, frame, recv_frame, tcp_connect, to_toml, udp_exchange
from nameserver import POISON_ADDITIONAL_ADDRESS, POISON_ADDRESS, POISON_OWNER, big_a_rrset_records

RECORDS = {"host.test.": {"A": ["192.0.2.1", "192.0.2.2"], "TXT": '"hi"'},
           "alias.test.": {"CNAME": "host.test."}}


def ask(addr_port: int, name: str, rdtype: str = "A", tcp: bool = False, timeout: float = 2.0,
        **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=addr_port, timeout=timeout)
    return dns.query.udp(q, "127.0.0.1", port=addr_port, timeout=timeout)


# ------------------------------------------------------------------------ dnsmasq
def test_dnsmasq_answers_local_records_over_udp_and_tcp(dnsmasq):
    d = dnsmasq()
    assert d.addr == f"127.0.0.1:{d.port}"
    r = ask(d.port, "allowed.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.1"}
    assert r.answer[0].ttl == 300  # --local-ttl; dnsmasq's default for local records is 0
    r = ask(d.port, "a.b.example.test", tcp=True)
    assert addresses(r) == {"198.51.100.1"}
    r = ask(d.port, "alias.test")
    assert addresses(r) == {"192.0.2.1"}
    assert any(rrset.rdtype == dns.rdatatype.CNAME for rrset in r.answer)
    r = ask(d.port, "txt.test", "TXT")
    assert "hello from dnsmasq" in r.answer[0][0].to_text()


def test_dnsmasq_refuses_unknown_names_without_upstreams(dnsmasq):
    d = dnsmasq()
    assert ask(d.port, "nowhere.test").rcode() == dns.rcode.REFUSED


def test_dnsmasq_query_log_and_barrier(dnsmasq):
    d = dnsmasq()
    ask(d.port, "allowed.test")
    ask(d.port, "OtHeR.test", "TXT")
    ask(d.port, "txt.test", "TXT", tcp=True)
    d.sync()
    names = d.queried_names()
    assert names[:2] == ["allowed.test", "other.test"]
    assert "txt.test" in names
    assert d.count("allowed.test") == 1
    assert d.count("other.test", "TXT") == 1
    assert d.count("other.test", "A") == 0
    assert not any("barrier" in n for n in names)
    assert "never.test" not in names


def test_two_dnsmasqs_get_distinct_ports(dnsmasq):
    a = dnsmasq(host_records={"one.test": "203.0.113.1"})
    b = dnsmasq(host_records={"one.test": "203.0.113.2"})
    assert a.port != b.port
    assert addresses(ask(a.port, "one.test")) == {"203.0.113.1"}
    assert addresses(ask(b.port, "one.test")) == {"203.0.113.2"}


# --------------------------------------------------------------------- nameserver
def test_nameserver_answer_mode(nameserver):
    ns = nameserver("answer", RECORDS)
    r = ask(ns.port, "host.test")
    assert addresses(r) == {"192.0.2.1", "192.0.2.2"}
    r = ask(ns.port, "ALIAS.test", tcp=True)
    assert addresses(r) == {"192.0.2.1", "192.0.2.2"}
    assert ask(ns.port, "missing.test").rcode() == dns.rcode.NXDOMAIN
    r = ask(ns.port, "host.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert ns.count("udp") == 3 and ns.count("tcp") == 1
    assert ns.queries_for("host.test") == 2
    assert ns.queries_for("alias.test", "tcp") == 1


def test_nameserver_blackhole_counts_but_never_answers(nameserver):
    ns = nameserver("blackhole")
    assert udp_exchange(dns.message.make_query("x.test", "A").to_wire(), ns.port, timeout=0.3) is None
    assert ns.wait_for_count(1, "udp", timeout=2)
    with tcp_connect(ns.port) as s:
        s.sendall(frame(dns.message.make_query("x.test", "A").to_wire()))
        with pytest.raises(TimeoutError):
            recv_frame(s, timeout=0.3)
    assert ns.count("tcp") == 1


def test_nameserver_servfail(nameserver):
    ns = nameserver("servfail", RECORDS)
    assert ask(ns.port, "host.test").rcode() == dns.rcode.SERVFAIL


def test_nameserver_truncate(nameserver):
    ns = nameserver("truncate", big_a_rrset_records("big.test.", 300))
    r = ask(ns.port, "big.test", use_edns=0, payload=4096)
    assert r.flags & dns.flags.TC and not r.answer
    r = ask(ns.port, "big.test", tcp=True)
    assert not r.flags & dns.flags.TC
    assert len(addresses(r)) == 300
    assert len(r.to_wire()) > 4096  # would not fit any UDP payload size
    assert ns.count("udp") == 1 and ns.count("tcp") == 1


def test_nameserver_poison(nameserver):
    ns = nameserver("poison", RECORDS)
    r = ask(ns.port, "host.test")
    owners = {rrset.name.to_text() for rrset in r.answer}
    assert owners == {"host.test.", POISON_OWNER}
    assert POISON_ADDRESS in addresses(r)
    assert any(rd.to_text() == POISON_ADDITIONAL_ADDRESS for rrset in r.additional for rd in rrset)


def test_nameserver_wrong_id_sends_spoof_first(nameserver):
    ns = nameserver("wrong_id", RECORDS)
    q = dns.message.make_query("host.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q.to_wire(), ("127.0.0.1", ns.port))
        first = dns.message.from_wire(s.recvfrom(65535)[0])
        second = dns.message.from_wire(s.recvfrom(65535)[0])
    assert first.id != q.id and addresses(first) == {POISON_ADDRESS}
    assert second.id == q.id and addresses(second) == {"192.0.2.1", "192.0.2.2"}
    # dnspython's client rejects the spoof (BadResponse) unless told to skip bad replies
    with pytest.raises(dns.query.BadResponse):
        ask(ns.port, "host.test")
    q = dns.message.make_query("host.test", "A")
    r = dns.query.udp(q, "127.0.0.1", port=ns.port, timeout=2, ignore_errors=True)
    assert r.id == q.id and addresses(r) == {"192.0.2.1", "192.0.2.2"}


def test_nameserver_stops_and_frees_port(nameserver):
    from nameserver import Nameserver

    with Nameserver("answer", RECORDS) as ns:
        port = ns.port
        assert addresses(ask(port, "host.test")) == {"192.0.2.1", "192.0.2.2"}
    start = time.monotonic()
    assert udp_exchange(dns.message.make_query("host.test", "A").to_wire(), port, timeout=0.3) is None
    assert time.monotonic() - start < 2


def test_to_toml_round_trips():
    import tomllib

    data = {"mode": "audit", "server": {"clients": ["127.0.0.1/32"], "tcp_max_connections": 4},
            "allow": {"domains": ['we"ird', "*.x.test"]}, "log": {"enabled": False}}
    assert tomllib.loads(to_toml(data)) == data
