"""Cleaning upstream replies before they are cached or relayed.

Cleaning uses dnspython (only on cache misses, where its cost is small next to
the network round trip): answer records not on the CNAME chain from the
question, and everything in the additional section, are dropped before the
answer is cached or relayed.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase
import dns.renderer
import dns.rrset

from resolver.core.addrs import is_public, rebinding_filter
from resolver.core.names import wire_to_text
from resolver.dns import wire
from resolver.dns.wire import is_subdomain, read_name, svcb_hints


def _json(items: list[str]) -> str:
    """``json.dumps(items, separators=(",", ":"))`` for a list of strings, at a fifth of
    the cost (the encoder object json builds per call is most of it)."""
    return "[" + ",".join(map(_json_str, items)) + "]"


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps uses (ensure_ascii)
_KEEP_AUTHORITY = frozenset((dns.rdatatype.SOA, dns.rdatatype.NSEC, dns.rdatatype.NSEC3,
                             dns.rdatatype.RRSIG))


class BadReply(ValueError):
    """An upstream reply that matched our query but whose records cannot be used."""


def _bad(exc: Exception) -> BadReply:
    # dnspython's messages span lines: one line each, for stderr and the log's note.
    return BadReply(f"unparseable reply ({exc.__class__.__name__}: {' '.join(str(exc).split())})")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 µs more per miss
class Cleaned:
    """An upstream reply reduced to what may be relayed and cached."""

    rcode: int
    an: int
    ns: int
    ar: int
    body: bytes  # records after the question, no OPT
    offsets: list[int]  # TTL positions within body
    ttls: list[int]
    cache_ttl: int  # how long the whole answer may be cached (0 = not at all)
    answers_json: str | None
    addrs: tuple[tuple[str, int], ...]  # (ip, ttl) from A/AAAA and SVCB/HTTPS hints
    dropped: int  # records removed as off-chain/poison
    stripped: tuple[str, ...] = ()  # private/loopback/... addresses removed (DNS rebinding)


class Cleaner:
    """Turns upstream replies into Cleaned answers.

    The common reply -- every answer record on the chain, only SOA/NSEC proof or
    plain NS in authority, public addresses -- is handled on the bytes: the
    records are kept exactly as received (their compression pointers stay
    valid because the client's question has the same length and position) and
    the additional section is cut off. Anything else (poison to drop, an
    out-of-order chain, DNAME, addresses to strip) goes through dnspython,
    which re-renders what is kept. Both give the same records; a property test
    holds them to that.
    """

    def __init__(self, negative_max_ttl: int = 3600, allowed_cidrs: tuple = ()) -> None:
        self.negative_max_ttl = negative_max_ttl
        self.allowed_cidrs = tuple(allowed_cidrs)

    def public(self, ip: str) -> bool:
        return is_public(ip) or bool(self.allowed_cidrs and rebinding_filter([ip], self.allowed_cidrs)[0])

    def clean(self, reply: bytes, question: bytes, name_len: int) -> Cleaned:
        """Reduce a reply that matched our query; BadReply if its records cannot be used."""
        try:
            fast = self._fast(reply, question, name_len)
        except (ValueError, IndexError, struct.error, OSError):
            fast = None
        if fast is not None:
            return fast
        try:
            return self._full(reply, question)
        except BadReply:
            raise
        except Exception as exc:
            # The bytes are the upstream's: whatever the parser and renderer make of them,
            # the outcome is "this server's reply is unusable", never a traceback per reply.
            raise _bad(exc) from None

    # -- bytes path ---------------------------------------------------------------------

    def _fast(self, reply: bytes, question: bytes, name_len: int) -> Cleaned | None:
        an = (reply[6] << 8) | reply[7]
        ns = (reply[8] << 8) | reply[9]
        qend = 12 + len(question)
        qname = question[:name_len]
        owners = {qname}
        # A pointer to offset 12 is the question's name, which (case aside) must be ours: then
        # the owner of a record -- almost always such a pointer -- is read without a walk.
        at_12 = qname if reply[12:12 + name_len].lower() == qname else None
        offsets: list[int] = []
        ttls: list[int] = []
        chain: list[str] = []
        addrs: list[tuple[str, int]] = []
        cnames = False  # the chain holds only address text otherwise: no JSON escaping needed
        public = self.public
        i = qend
        for _ in range(an):
            if reply[i] == 0xC0 and reply[i + 1] == 12 and at_12 is not None:
                owner, i = at_12, i + 2
            else:
                owner, i = read_name(reply, i)
            rtype, rclass, ttl, rdlen = _RR.unpack_from(reply, i)
            start, end = i + 10, i + 10 + rdlen
            if end > len(reply) or owner not in owners or rclass != 1:
                return None
            ttl &= 0x7FFFFFFF
            offsets.append(i + 4 - qend)
            ttls.append(ttl)
            if rtype == wire.TYPE_CNAME:
                target, after = read_name(reply, start)
                if after != end:  # the name runs past (or stops short of) its RDATA: let the parser judge
                    return None
                owners.add(target)
                chain.append(wire_to_text(target))
                cnames = True
            elif rtype == wire.TYPE_A or rtype == wire.TYPE_AAAA:
                if rdlen != (4 if rtype == wire.TYPE_A else 16):
                    return None
                ip = socket.inet_ntop(socket.AF_INET if rdlen == 4 else socket.AF_INET6, reply[start:end])
                if not public(ip):
                    return None
                chain.append(ip)
                addrs.append((ip, ttl))
            elif rtype == wire.TYPE_HTTPS or rtype == wire.TYPE_SVCB:
                hints = svcb_hints(reply, start, end)
                if not all(public(ip) for ip in hints):
                    return None
                addrs.extend((ip, ttl) for ip in hints)
            elif rtype == wire.TYPE_TXT:
                j = start
                while j < end:  # <length><bytes> strings that end exactly with the RDATA
                    j += 1 + reply[j]
                if j != end or rdlen == 0:
                    return None
            elif rtype not in _FAST_OPAQUE:
                # Names inside other RDATA (MX, SRV, NS, PTR, ...) may be compressed, and a pointer
                # into the additional section we cut off would corrupt the answer: re-render.
                return None
            i = end
        answer_end = i
        keep = drop = 0
        soa_ttl = -1
        auth_offsets: list[int] = []
        auth_ttls: list[int] = []
        for _ in range(ns):
            owner, i = read_name(reply, i)
            rtype, rclass, ttl, rdlen = _RR.unpack_from(reply, i)
            end = i + 10 + rdlen
            if end > len(reply):
                return None
            if rtype in _KEEP_AUTHORITY and any(is_subdomain(o, owner) for o in owners):
                if rtype != wire.TYPE_SOA:
                    return None  # NSEC/NSEC3/RRSIG proofs: rare, and their names are re-rendered
                # Both SOA names (they point backwards), then exactly the five 32-bit fields.
                if read_name(reply, read_name(reply, i + 10)[1])[1] + 20 != end:
                    return None
                keep += 1
                auth_offsets.append(i + 4 - qend)
                auth_ttls.append(ttl & 0x7FFFFFFF)
                if rtype == wire.TYPE_SOA and soa_ttl < 0:
                    soa_ttl = min(ttl & 0x7FFFFFFF, int.from_bytes(reply[end - 4:end], "big"))
            else:
                drop += 1
            i = end
        if keep and drop:
            return None  # some to keep, some not: needs re-rendering
        if keep:
            body, offsets, ttls = reply[qend:i], offsets + auth_offsets, ttls + auth_ttls
        else:
            # Pointers only ever point backwards, so cutting the later sections off is safe.
            body, ns = reply[qend:answer_end], 0
        rcode = reply[3] & 0x0F
        dropped = drop + _count_additional(reply)
        return Cleaned(rcode, an, ns, 0, body, offsets, ttls,
                       self._cache_ttl(rcode, an, ttls, soa_ttl if keep else -1),
                       (_json(chain) if cnames else '["' + '","'.join(chain) + '"]') if chain else None,
                       tuple(addrs), dropped)

    def _cache_ttl(self, rcode: int, an: int, ttls: list[int], soa_ttl: int) -> int:
        if rcode == wire.NOERROR and an:
            return min(ttls)
        # Negative answer (NXDOMAIN / NODATA): RFC 2308 5 -- min(SOA TTL, SOA MINIMUM); no SOA, no caching.
        return min(soa_ttl, self.negative_max_ttl) if soa_ttl >= 0 else 0

    # -- dnspython path -----------------------------------------------------------------

    def _full(self, reply: bytes, question: bytes) -> Cleaned:
        try:
            msg = dns.message.from_wire(reply, ignore_trailing=True, one_rr_per_rrset=False)
        except (dns.exception.DNSException, ValueError, IndexError) as exc:
            raise _bad(exc) from None
        qname = msg.question[0].name
        qtype = msg.question[0].rdtype

        owners = {qname}
        kept: set[int] = set()
        pending = list(enumerate(msg.answer))
        changed = True
        while changed:  # the chain may be listed out of order; bounded by the section size
            changed = False
            for idx, rrset in list(pending):
                on_chain = rrset.name in owners
                if not on_chain and rrset.rdtype == dns.rdatatype.DNAME:
                    on_chain = any(o.is_subdomain(rrset.name) for o in owners)
                if not on_chain or rrset.rdclass != dns.rdataclass.IN:
                    continue
                kept.add(idx)
                pending.remove((idx, rrset))
                if rrset.rdtype == dns.rdatatype.CNAME:
                    for rd in rrset:
                        if rd.target not in owners:
                            owners.add(rd.target)
                            changed = True
        answer = []
        stripped: list[str] = []
        for i, rr in enumerate(msg.answer):
            if i not in kept:
                continue
            if rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                bad = [rd for rd in rr if not self.public(rd.address)]
                if bad:
                    stripped.extend(rd.address for rd in bad)
                    rr = rr.copy()
                    for rd in bad:
                        rr.discard(rd)
                    if not rr:
                        continue
            elif rr.rdtype in (dns.rdatatype.HTTPS, dns.rdatatype.SVCB):
                hints = [ip for rd in rr for ip in _hints_of(rd)]
                bad_hints = [ip for ip in hints if not self.public(ip)]
                if bad_hints:  # a hint can't be edited out without changing the record: drop it
                    stripped.extend(bad_hints)
                    continue
            answer.append(rr)
        authority = [rr for rr in msg.authority
                     if rr.rdtype in _KEEP_AUTHORITY and any(o.is_subdomain(rr.name) for o in owners)]
        dropped = (sum(len(rr) for rr in msg.answer) - sum(len(rr) for rr in answer)
                   + sum(len(rr) for rr in msg.authority) - sum(len(rr) for rr in authority)
                   + sum(len(rr) for rr in msg.additional))

        renderer = dns.renderer.Renderer(0, 0x8180)
        renderer.add_question(qname, qtype, dns.rdataclass.IN)
        for rr in answer:
            renderer.add_rrset(dns.renderer.ANSWER, rr)
        for rr in authority:
            renderer.add_rrset(dns.renderer.AUTHORITY, rr)
        renderer.write_header()
        rendered = renderer.get_wire()
        qend = 12 + len(question)
        an = (rendered[6] << 8) | rendered[7]
        ns = (rendered[8] << 8) | rendered[9]
        offsets, ttls, _ = wire.record_ttls(rendered, qend, an + ns)
        offsets = [o - qend for o in offsets]

        chain: list[str] = []
        addrs: list[tuple[str, int]] = []
        for rr in answer:
            if rr.rdtype == dns.rdatatype.CNAME:
                chain.extend(wire_to_text(rd.target.to_wire().lower()) for rd in rr)
            elif rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                for rd in rr:
                    chain.append(rd.address)
                    addrs.append((rd.address, rr.ttl))
            elif rr.rdtype in (dns.rdatatype.HTTPS, dns.rdatatype.SVCB):
                addrs.extend((ip, rr.ttl) for rd in rr for ip in _hints_of(rd))
        soa = [rr for rr in authority if rr.rdtype == dns.rdatatype.SOA]
        soa_ttl = min(soa[0].ttl, soa[0][0].minimum) if soa else -1
        rcode = msg.rcode() & 0xF
        return Cleaned(rcode, an, ns, 0, rendered[qend:], offsets, ttls,
                       self._cache_ttl(rcode, an, ttls, soa_ttl),
                       _json(chain) if chain else None, tuple(addrs), dropped,
                       tuple(stripped))


def clean_reply(reply: bytes, question: bytes, negative_max_ttl: int = 3600,
                allowed_cidrs: tuple = ()) -> Cleaned:
    """Clean one reply with a throwaway Cleaner (tests and tools)."""
    return Cleaner(negative_max_ttl, allowed_cidrs).clean(reply, question, _name_len(question))


def _name_len(name: bytes) -> int:
    i = 0
    while name[i]:
        i += name[i] + 1
    return i + 1


def _hints_of(rd: object) -> list[str]:
    out = []
    for key in (dns.rdtypes.svcbbase.ParamKey.IPV4HINT, dns.rdtypes.svcbbase.ParamKey.IPV6HINT):
        param = rd.params.get(key)  # type: ignore[attr-defined]
        if param is not None:
            out.extend(param.addresses)
    return out


_RR = struct.Struct(">HHIH")
# Answer types the bytes path keeps verbatim: their RDATA holds no name (A, AAAA, TXT), a name
# checked with read_name (CNAME), or an uncompressed one (SVCB/HTTPS, checked in svcb_hints).
_FAST_OPAQUE = frozenset((wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_CNAME, wire.TYPE_TXT, wire.TYPE_SVCB,
                          wire.TYPE_HTTPS))


def _count_additional(reply: bytes) -> int:
    """Records dropped from the additional section (the OPT pseudo-record is not one)."""
    ar = (reply[10] << 8) | reply[11]
    return max(0, ar - 1) if ar else 0
