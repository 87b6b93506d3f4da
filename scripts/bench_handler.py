#!/usr/bin/env python3
"""In-process cost of the query path: `Resolver.handle` for a cache hit and a denial.

Each with the log off and on, and with /metrics' query counts on (the only work metrics
add to the path; every other figure is read at scrape time).

No sockets: this is the Python work per query that `scripts/bench` measures end to end
(which adds the kernel's receive and send). Run pinned for steady figures:

    taskset -c 1 python scripts/bench_handler.py
"""

from __future__ import annotations

import struct
import timeit

import dns.message
import dns.rrset

from resolver.dns.cache import Entry
from resolver.dns.chain import Resolver
from resolver.dns.clean import clean_reply
from resolver.policy.config import parse_config

POLICY = '[upstream]\nservers = ["127.0.0.1:9"]\n[allow]\ndomains = ["*.allowed.test"]\n'


def main(n: int = 200_000) -> None:
    r = Resolver(parse_config(POLICY))
    q = dns.message.make_query("www.allowed.test", "A", use_edns=True)
    reply = dns.message.make_response(q)
    reply.answer.append(dns.rrset.from_text("www.allowed.test.", 300, "IN", "A", "192.0.2.1"))
    question = q.question[0].name.to_wire() + struct.pack(">HH", 1, 1)
    c = clean_reply(reply.to_wire(), question)
    r.cache.put(question + b"\x00", Entry(c.rcode, c.an, c.ns, c.ar, c.body, c.offsets, c.ttls, 300,
                                          r.cache.clock(), c.answers_json, c.addrs))
    packets = {"cache hit": q.to_wire(),
               "denied": dns.message.make_query("x.evil.test", "A", use_edns=True).to_wire()}
    assert isinstance(r.handle(packets["cache hit"], "127.0.0.1", "udp"), bytes)
    records: list[tuple] = []
    variants = [("log off", None, False), ("log off, metrics on", None, True),
                ("log on", records.append, False), ("log on, metrics on", records.append, True)]
    for label, submit, metrics in variants:
        r.submit = submit
        r.counts = {} if metrics else None
        for name, packet in packets.items():
            # setup empties the record list before each repeat: a list grown to a million
            # records makes later variants pay for the allocator's state, not for their own work.
            best = min(timeit.repeat(lambda p=packet: r.handle(p, "127.0.0.1", "udp"), setup=records.clear,
                                     number=n, repeat=5))
            records.clear()
            print(f"{name:10} {label:20} {best / n * 1e6:6.2f} µs per query")


if __name__ == "__main__":
    main()
