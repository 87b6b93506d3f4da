"""The fence as data: generated rules, plans, parsing -- no root, no kernel, nothing touched."""

from __future__ import annotations

import ipaddress
import socket
import struct

import dns.message
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from resolver.core.addrs import uid_from_source, user_source
from resolver.core.names import text_to_wire
from resolver.fence import firewall as fw
from resolver.fence.ipsets import IPSET_MAX_TIMEOUT, addresses_in_answer, timeout_bounds
from resolver.fence.nflog import NflogRecorder, parse_packet
from resolver.policy.config import parse_config

NET4 = ipaddress.ip_network("192.0.2.0/24")
NET6 = ipaddress.ip_network("2001:db8:a::/64")


def container(**kw: object) -> fw.FenceSpec:
    base: dict[str, object] = {"mode": "container", "sources": (NET4, NET6),
                               "listen": (("192.0.2.1", 53), ("2001:db8:a::1", 53))}
    base.update(kw)
    return fw.FenceSpec(**base)  # type: ignore[arg-type]


def user(**kw: object) -> fw.FenceSpec:
    base: dict[str, object] = {"mode": "user", "uid": 1000, "user": "agent",
                               "listen": (("127.0.0.1", 5353), ("::1", 5353))}
    base.update(kw)
    return fw.FenceSpec(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ generated rules

def test_container_ipv4_rules_exactly() -> None:
    spec = container(allow_cidrs=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")))
    tables = fw.fence_rules(spec, 4)
    assert list(tables) == ["filter"]
    assert tables["filter"] == [
        ":DNSGUARD - [0:0]",
        ":DNSGUARD-OUT - [0:0]",
        ":DNSGUARD-ALLOW - [0:0]",
        ":DNSGUARD-REJECT - [0:0]",
        "-A DNSGUARD -s 192.0.2.0/24 -g DNSGUARD-OUT",
        "-A DNSGUARD-OUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A DNSGUARD-OUT -d 192.0.2.1 -p udp -m udp --dport 53 -j RETURN",
        "-A DNSGUARD-OUT -d 192.0.2.1 -p tcp -m tcp --dport 53 -j RETURN",
        "-A DNSGUARD-OUT -p udp -m multiport --dports 53,853 -g DNSGUARD-REJECT",
        "-A DNSGUARD-OUT -p tcp -m multiport --dports 53,853 -g DNSGUARD-REJECT",
        "-A DNSGUARD-OUT -d 10.1.0.0/16 -g DNSGUARD-ALLOW",
        "-A DNSGUARD-OUT -p tcp -m multiport --dports 80,443 -m set --match-set dnsguard4 dst "
        "-g DNSGUARD-ALLOW",
        "-A DNSGUARD-OUT -p udp -m udp --dport 443 -m set --match-set dnsguard4 dst -g DNSGUARD-ALLOW",
        "-A DNSGUARD-OUT -g DNSGUARD-REJECT",
        "-A DNSGUARD-ALLOW -j CONNMARK --set-xmark 0x100000/0x300000",
        "-A DNSGUARD-REJECT -m limit --limit 20/sec --limit-burst 100 -j NFLOG --nflog-prefix "
        "dnsguard:blocked --nflog-group 53 --nflog-size 128",
        "-A DNSGUARD-REJECT -p tcp -j REJECT --reject-with tcp-reset",
        "-A DNSGUARD-REJECT -p udp -j REJECT --reject-with icmp-port-unreachable",
        "-A DNSGUARD-REJECT -j REJECT --reject-with icmp-admin-prohibited",
        f'-I FORWARD 1 -m comment --comment "dnsguard:container:{spec.fingerprint}" -j DNSGUARD',
    ]


def test_container_ipv6_uses_v6_set_sources_cidrs_and_icmp6() -> None:
    spec = container(allow_cidrs=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")))
    lines = fw.fence_rules(spec, 6)["filter"]
    text = "\n".join(lines)
    assert "-A DNSGUARD -s 2001:db8:a::/64 -g DNSGUARD-OUT" in lines
    assert "192.0.2" not in text and "10.1.0.0" not in text
    assert "-A DNSGUARD-OUT -d fd00::/8 -g DNSGUARD-ALLOW" in lines
    assert "--match-set dnsguard6 dst" in text and "dnsguard4" not in text
    assert "-A DNSGUARD-REJECT -p udp -j REJECT --reject-with icmp6-port-unreachable" in lines
    assert "-A DNSGUARD-REJECT -j REJECT --reject-with icmp6-adm-prohibited" in lines


def test_rule_order_dns_before_any_allow() -> None:
    lines = fw.fence_rules(container(allow_cidrs=(ipaddress.ip_network("0.0.0.0/0"),)), 4)["filter"]
    idx = {name: next(i for i, ln in enumerate(lines) if marker in ln) for name, marker in [
        ("established", "ESTABLISHED"), ("own dns", "-d 192.0.2.1 -p udp"), ("dns reject", "53,853"),
        ("cidr", "-d 0.0.0.0/0"), ("set", "--match-set"), ("catch-all", "-A DNSGUARD-OUT -g"),
        ("log", "NFLOG"), ("reject", "tcp-reset")]}
    order = sorted(idx, key=idx.get)
    assert order == ["established", "own dns", "dns reject", "cidr", "set", "catch-all", "log", "reject"]


def test_docker_user_and_interfaces() -> None:
    lines = fw.fence_rules(container(interfaces=("docker0",)), 4, docker_user=True)["filter"]
    assert lines[-1].startswith("-I DOCKER-USER 1 ")
    assert "-A DNSGUARD -i docker0 -g DNSGUARD-OUT" in lines


def test_audit_logs_and_does_not_reject() -> None:
    lines = fw.fence_rules(container(audit=True), 4)["filter"]
    rej = [ln for ln in lines if ln.startswith("-A DNSGUARD-REJECT")]
    # marked first (the conntrack recorder follows the flow it lets through), then logged
    assert rej[0] == "-A DNSGUARD-REJECT -j CONNMARK --set-xmark 0x200000/0x300000"
    assert len(rej) == 2 and "--nflog-prefix dnsguard:would-block" in rej[1]
    assert not any("REJECT --reject-with" in ln for ln in lines)


def test_ports_any_and_many() -> None:
    lines = fw.fence_rules(container(ports=None), 4)["filter"]
    assert "-A DNSGUARD-OUT -m set --match-set dnsguard4 dst -g DNSGUARD-ALLOW" in lines
    many = tuple(("tcp", p) for p in range(8000, 8020)) + (("udp", 5000),)
    lines = fw.fence_rules(container(ports=many), 4)["filter"]
    sets = [ln for ln in lines if "--match-set" in ln]
    assert len(sets) == 3  # 15 + 5 tcp ports, 1 udp
    assert "--dports 8000,8001,8002,8003,8004,8005,8006,8007,8008,8009,8010,8011,8012,8013,8014 " in sets[0]
    assert "--dports 8015,8016,8017,8018,8019 " in sets[1]
    assert "-p udp -m udp --dport 5000 " in sets[2]


def test_unspecified_listen_means_any_local_address() -> None:
    lines = fw.fence_rules(container(listen=(("0.0.0.0", 53),)), 4)["filter"]
    assert "-A DNSGUARD-OUT -m addrtype --dst-type LOCAL -p udp -m udp --dport 53 -j RETURN" in lines


def test_user_mode_rules_and_dns_redirect() -> None:
    spec = user()
    t4 = fw.fence_rules(spec, 4)
    assert "-A DNSGUARD -m owner --uid-owner 1000 -g DNSGUARD-OUT" in t4["filter"]
    assert "-A DNSGUARD-OUT -o lo -j RETURN" in t4["filter"]
    assert t4["filter"][-1].startswith("-I OUTPUT 1 ")
    nat = t4["nat"]
    assert ("-A DNSGUARD-DNS -p udp -m owner --uid-owner 1000 -m udp --dport 53 -j DNAT --to-destination "
            "127.0.0.1:5353") in nat
    assert ("-A DNSGUARD-SNAT -d 127.0.0.1 -p tcp -m owner --uid-owner 1000 -m conntrack --ctstate DNAT "
            "--ctorigdstport 53 -j SNAT --to-source 127.255.3.232") in nat  # uid 1000 = 3 * 256 + 232
    assert uid_from_source("127.255.3.232") == 1000 and user_source(1000) == "127.255.3.232"
    assert uid_from_source("127.0.0.1") is None and user_source(70000) is None
    jumps = [ln.split(" -m comment")[0] for ln in nat if ln.startswith("-I")]
    assert jumps == ["-I OUTPUT 1", "-I POSTROUTING 1"]
    t6 = fw.fence_rules(spec, 6)
    assert any("--to-destination [::1]:5353" in ln for ln in t6["nat"])
    # no IPv6 listen address: IPv6 DNS is not redirected (so it is rejected like any other DNS)
    assert "nat" not in fw.fence_rules(user(listen=(("127.0.0.1", 5353),)), 6)
    assert not any("-o lo" in ln for ln in fw.fence_rules(user(loopback=False), 4)["filter"])
    assert fw.dns_target(user(listen=(("0.0.0.0", 53),)), 4) == ("127.0.0.1", 53)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "container"}, "--source"),
    ({"mode": "user"}, "--user"),
    ({"mode": "user", "uid": 0}, "root"),
    ({"mode": "bogus", "sources": (NET4,)}, "mode"),
    ({"mode": "container", "interfaces": ("eth0; rm -rf /",)}, "interface"),
    ({"mode": "container", "sources": (NET4,), "listen": ()}, "listen"),
    ({"mode": "container", "sources": (NET4,), "nflog_group": 70000}, "NFLOG"),
])
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(fw.FirewallError, match=message):
        fw.FenceSpec(**kwargs)


def test_fingerprint_tracks_settings() -> None:
    assert container().fingerprint == container().fingerprint
    others = [container(audit=True), container(ports=None), container(sources=(NET4,)),
              container(listen=(("192.0.2.1", 5353),)), container(nflog_group=7),
              container(allow_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))]
    assert len({container().fingerprint, *(o.fingerprint for o in others)}) == 1 + len(others)


def test_parse_ports() -> None:
    assert fw.parse_ports(["tcp/443", " UDP/443 "]) == (("tcp", 443), ("udp", 443))
    assert fw.parse_ports(["any"]) is None
    for bad in (["tcp/0"], ["icmp/1"], ["443"], ["tcp/65536"]):
        with pytest.raises(fw.FirewallError):
            fw.parse_ports(bad)


def test_spec_from_config() -> None:
    cfg = parse_config('[server]\nlisten = ["192.0.2.1:53"]\n[upstream]\nservers = ["192.0.2.53"]\n'
                       '[allow]\ncidrs = ["10.0.0.0/8"]\n[firewall]\nports = "any"\n')
    spec = fw.spec_from_config(cfg, sources=["192.0.2.0/24"], audit=True)
    assert spec.mode == "container" and spec.sources == (NET4,)
    assert spec.listen == (("192.0.2.1", 53),) and spec.ports is None and spec.audit
    assert spec.allow_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    spec = fw.spec_from_config(cfg, user="65534")
    assert spec.mode == "user" and spec.uid == 65534
    with pytest.raises(fw.FirewallError, match="not a CIDR"):
        fw.spec_from_config(cfg, sources=["nonsense"])
    with pytest.raises(fw.FirewallError, match="no such user"):
        fw.spec_from_config(cfg, user="no-such-user-dnsguard")


def test_notes() -> None:
    n = fw.notes(container(listen=(("127.0.0.1", 5353),), sources=(NET4,)))
    assert any("loopback" in x for x in n) and any("IPv6" in x for x in n)
    clients = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert fw.notes(user(), clients) == []
    n = fw.notes(user(listen=(("192.0.2.1", 53),)), clients)
    assert any('add "192.0.2.1/32" to [server] clients' in x for x in n)
    assert any("no IPv6 listen address" in x for x in n)


# ------------------------------------------------------------------ reading state, planning

SAVED = """# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [10:600]
:OUTPUT ACCEPT [0:0]
:DNSGUARD - [0:0]
:DNSGUARD-OUT - [0:0]
:DNSGUARD-REJECT - [0:0]
:HOST - [0:0]
-A FORWARD -m comment --comment "dnsguard:container:abc" -j DNSGUARD
-A FORWARD -j HOST
-A DNSGUARD -s 192.0.2.0/24 -g DNSGUARD-OUT
-A DNSGUARD-OUT -g DNSGUARD-REJECT
-A DNSGUARD-REJECT -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DNSGUARD-DNS - [0:0]
:DNSGUARD-SNAT - [0:0]
-A OUTPUT -m comment --comment "dnsguard:user:abc" -j DNSGUARD-DNS
-A POSTROUTING -m comment --comment "dnsguard:user:abc" -j DNSGUARD-SNAT
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
"""


def test_parse_save_and_removal() -> None:
    rs = fw.parse_save(SAVED)
    assert rs.ours("filter") == ["DNSGUARD", "DNSGUARD-OUT", "DNSGUARD-REJECT"]
    assert rs.ours("nat") == ["DNSGUARD-DNS", "DNSGUARD-SNAT"]
    assert [(j.table, j.chain) for j in rs.jumps()] == [("filter", "FORWARD"), ("nat", "OUTPUT"),
                                                        ("nat", "POSTROUTING")]
    removal = fw.removal_lines(rs)
    assert removal["filter"] == [
        '-D FORWARD -m comment --comment "dnsguard:container:abc" -j DNSGUARD',
        "-F DNSGUARD", "-F DNSGUARD-OUT", "-F DNSGUARD-REJECT",
        "-X DNSGUARD", "-X DNSGUARD-OUT", "-X DNSGUARD-REJECT",
    ]
    assert removal["nat"][:2] == ['-D OUTPUT -m comment --comment "dnsguard:user:abc" -j DNSGUARD-DNS',
                                  '-D POSTROUTING -m comment --comment "dnsguard:user:abc" -j DNSGUARD-SNAT']
    assert "MASQUERADE" not in fw.render(removal)


def test_plan_apply_from_scratch() -> None:
    empty = {4: fw.parse_save("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"), 6: fw.parse_save("")}
    plan = fw.plan_apply(container(), empty)
    actions = [(s.action, s.argv) for s in plan.steps]
    assert actions == [
        ("ensure-sets", ()),
        ("run", ("iptables-restore", "--noflush", "--test")),
        ("run", ("ip6tables-restore", "--noflush", "--test")),
        ("run", ("iptables-restore", "--noflush")),
        ("run", ("ip6tables-restore", "--noflush")),
        ("accounting", ()),  # after the rules, which load nf_conntrack (whose sysctls these are)
    ]
    assert "sysctl -w net.netfilter.nf_conntrack_acct=1" in plan.describe()
    no_recording = fw.plan_apply(container(accounting=False), empty)
    assert [s.action for s in no_recording.steps][-1] == "run"
    text = plan.steps[3].input
    assert text is not None and text.startswith("*filter\n:DNSGUARD - [0:0]\n") and text.endswith("COMMIT\n")
    assert "-D " not in text
    assert plan.steps[1].input == plan.steps[3].input


def test_plan_apply_replaces_existing_and_switches_mode() -> None:
    state = {4: fw.parse_save(SAVED), 6: fw.parse_save("")}
    plan = fw.plan_apply(container(), state)
    text = plan.steps[3].input or ""
    filt, nat = text.split("*nat")
    # our filter chains exist: flushed and refilled, not re-declared, not deleted
    assert "-F DNSGUARD-OUT" in filt and ":DNSGUARD-OUT" not in filt and "-X DNSGUARD" not in filt
    assert filt.index("-D FORWARD") < filt.index("-F DNSGUARD") < filt.index("-A DNSGUARD ")
    # nat chains are not part of a container fence: deleted
    assert "-X DNSGUARD-DNS" in nat and "-X DNSGUARD-SNAT" in nat and "-A DNSGUARD-DNS" not in nat
    # and back: user mode declares the nat chains it needs
    plan = fw.plan_apply(user(), {4: fw.parse_save(""), 6: fw.parse_save("")})
    assert ":DNSGUARD-DNS - [0:0]" in (plan.steps[3].input or "")


def test_plan_remove() -> None:
    plan = fw.plan_remove({4: fw.parse_save(SAVED), 6: fw.parse_save("")})
    assert [s.argv for s in plan.steps if s.action == "run"] == [("iptables-restore", "--noflush")]
    assert plan.steps[-1].action == "destroy-sets"
    described = plan.describe()
    assert "iptables-restore --noflush <<'EOF'" in described and "ipset destroy dnsguard4" in described
    empty = fw.plan_remove({4: fw.parse_save(""), 6: fw.parse_save("")}, destroy_sets=False)
    assert empty.steps == [] and "nothing to do" in empty.describe()


def test_family_status_from_save() -> None:
    st = fw.family_status(fw.parse_save(SAVED), 4)
    assert st.comment == "dnsguard:container:abc"
    assert st.jumps == ["filter/FORWARD", "nat/OUTPUT", "nat/POSTROUTING"]
    assert st.audit is False and st.rule_count == 3


# ------------------------------------------------------------------ sets: clamping, answers

def test_timeout_bounds() -> None:
    assert timeout_bounds(30, 86400) == (30, 86400)
    assert timeout_bounds(0, 10) == (1, 10)  # 0 would be a permanent entry
    assert timeout_bounds(-5, 10) == (1, 10)
    assert timeout_bounds(1, 10**12) == (1, IPSET_MAX_TIMEOUT)
    assert timeout_bounds(10**12, 10**12) == (IPSET_MAX_TIMEOUT, IPSET_MAX_TIMEOUT)
    with pytest.raises(ValueError):
        timeout_bounds(60, 30)


def _response(qname: str, qtype: str, *records: tuple[str, int, str, str]) -> bytes:
    q = dns.message.make_query(qname, qtype)
    r = dns.message.make_response(q)
    for owner, ttl, rtype, text in records:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, text))
    return r.to_wire()


def test_addresses_in_answer_follows_cname_chain() -> None:
    wire = _response("www.example.test", "A",
                     ("www.example.test.", 300, "CNAME", "edge.cdn.test."),
                     ("edge.cdn.test.", 60, "CNAME", "e1.cdn.test."),
                     ("e1.cdn.test.", 600, "A", "203.0.113.1"),
                     ("e1.cdn.test.", 600, "A", "203.0.113.2"),
                     ("injected.test.", 600, "A", "198.51.100.66"))
    assert addresses_in_answer(wire) == [("203.0.113.1", 60), ("203.0.113.2", 60)]


def test_addresses_in_answer_aaaa_and_https_hints() -> None:
    wire = _response("svc.test", "HTTPS",
                     ("svc.test.", 120, "HTTPS",
                      '1 . alpn="h2,h3" ipv4hint="203.0.113.7,203.0.113.8" ipv6hint="2001:db8::7"'))
    assert addresses_in_answer(wire) == [("203.0.113.7", 120), ("203.0.113.8", 120), ("2001:db8::7", 120)]
    wire = _response("v6.test", "AAAA", ("v6.test.", 30, "AAAA", "2001:db8::1"))
    assert addresses_in_answer(wire) == [("2001:db8::1", 30)]


def test_addresses_in_answer_garbage_and_loops() -> None:
    assert addresses_in_answer(b"\x00\x01garbage") == []
    wire = _response("a.test", "A", ("a.test.", 60, "CNAME", "b.test."), ("b.test.", 60, "CNAME", "a.test."))
    assert addresses_in_answer(wire) == []


# ------------------------------------------------------------------ NFLOG parsing

def _v4(proto: int, sport: int, dport: int, frag: int = 0) -> bytes:
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40, 1, frag, 64, proto, 0,
                      socket.inet_aton("192.0.2.2"), socket.inet_aton("203.0.113.10"))
    return hdr + struct.pack(">HH", sport, dport) + b"\0" * 16


def _v6(next_header: int, ext: bytes, l4: bytes) -> bytes:
    return (struct.pack(">IHBB", 0x60000000, len(ext) + len(l4), next_header, 64)
            + socket.inet_pton(socket.AF_INET6, "2001:db8:a::2")
            + socket.inet_pton(socket.AF_INET6, "2001:db8:c::10") + ext + l4)


def test_parse_packet() -> None:
    assert parse_packet(_v4(6, 40000, 443)) == ("192.0.2.2", "203.0.113.10", "tcp", 443)
    assert parse_packet(_v4(17, 40000, 53)) == ("192.0.2.2", "203.0.113.10", "udp", 53)
    assert parse_packet(_v4(1, 0x0800, 0)) == ("192.0.2.2", "203.0.113.10", "icmp", None)
    assert parse_packet(_v4(6, 1, 443, frag=100)) == ("192.0.2.2", "203.0.113.10", "tcp", None)
    ports = struct.pack(">HH", 5555, 853) + b"\0" * 16
    assert parse_packet(_v6(6, b"", ports)) == ("2001:db8:a::2", "2001:db8:c::10", "tcp", 853)
    hop = bytes([17, 0]) + b"\0" * 6  # hop-by-hop, 8 bytes, next = udp
    assert parse_packet(_v6(0, hop, ports)) == ("2001:db8:a::2", "2001:db8:c::10", "udp", 853)
    frag_first = bytes([6, 0, 0, 0]) + b"\0\0\0\1"
    assert parse_packet(_v6(44, frag_first, ports))[3] == 853
    frag_later = bytes([6, 0]) + struct.pack(">H", 100 << 3) + b"\0\0\0\1"
    assert parse_packet(_v6(44, frag_later, ports))[3] is None
    assert parse_packet(b"") is None
    assert parse_packet(b"\x45\x00") is None
    assert parse_packet(b"\x10" * 40) is None


def _nflog_msg(prefix: str, payload: bytes, family: int = socket.AF_INET) -> bytes:
    def attr(t: int, data: bytes) -> bytes:
        n = 4 + len(data)
        return struct.pack("=HH", n, t) + data + b"\0" * ((-n) % 4)

    body = struct.pack("=BBH", family, 0, 0) + attr(1, struct.pack(">HBB", 0x0800, 3, 0)) \
        + attr(10, prefix.encode() + b"\0") + attr(9, payload)
    return struct.pack("=IHHII", 16 + len(body), 0x0400, 0, 0, 0) + body


def test_nflog_rows_from_messages() -> None:
    names = {"203.0.113.10": text_to_wire("Files.Example.test").lower()}
    rec = NflogRecorder(":memory:", 53, name_of=names.get)
    buf = _nflog_msg("dnsguard:blocked", _v4(6, 1, 443)) + _nflog_msg("dnsguard:would-block", _v4(17, 1, 443))
    rows = rec._rows(buf)
    assert [r[1:7] for r in rows] == [
        ("192.0.2.2", "203.0.113.10", "tcp", 443, "blocked", "files.example.test"),
        ("192.0.2.2", "203.0.113.10", "udp", 443, "would-block", "files.example.test"),
    ]
    assert all(r[7] is None and r[8] == r[0] for r in rows)  # no client; over when made
    assert NflogRecorder(":memory:", skip_audit=True)._rows(buf)[0][5] == "blocked"
    assert len(NflogRecorder(":memory:", skip_audit=True)._rows(buf)) == 1  # conntrack has those
    assert NflogRecorder(":memory:")._rows(_nflog_msg("x", _v4(6, 1, 80)))[0][6] is None
