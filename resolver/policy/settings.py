"""What a policy is: the frozen settings dataclasses a parsed policy.toml becomes.

``config`` builds them (parsing, validation, line numbers); everything else only reads
them. Kept apart so the shape of a policy can be read without the parser around it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resolver.policy.matcher import Matcher

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HostPort = tuple[str, int]

MODES = ("enforce", "audit")
DEFAULT_CLIENTS = ("127.0.0.0/8", "::1/128")
DEFAULT_PORTS = ("tcp/80", "tcp/443", "udp/443")
PACKAGED_POLICY = Path(__file__).with_name("default_policy.toml")


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[HostPort, ...] = (("127.0.0.1", 5353),)
    clients: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c) for c in DEFAULT_CLIENTS)
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 256
    rate_limit: int = 0  # queries per second per client address; 0 = off


@dataclass(frozen=True)
class UpstreamSettings:
    servers: tuple[HostPort, ...] = ()
    timeout: float = 2.0
    from_resolv_conf: bool = False


@dataclass(frozen=True)
class CacheSettings:
    max_entries: int = 100_000
    min_ttl: int = 0
    max_ttl: int = 86_400
    negative_max_ttl: int = 3_600
    stale_max: int = 86_400  # serve-stale window after expiry, seconds (RFC 8767); 0 = off


@dataclass(frozen=True)
class LogSettings:
    enabled: bool = True
    database: str = "dnsguard.db"
    retention_days: int = 30
    queue_max: int = 200_000
    max_size_mb: int = 1024  # the writer deletes the oldest rows past this; 0 = no limit


@dataclass(frozen=True)
class FirewallSettings:
    enabled: bool = False
    min_ttl: int = 30
    max_ttl: int = 86_400
    # ("tcp", 443) pairs; None means every port.
    ports: tuple[tuple[str, int], ...] | None = (("tcp", 80), ("tcp", 443), ("udp", 443))
    # Every flow the fence lets through becomes a `connections` row (from conntrack); the
    # counters of open connections are refreshed this often (seconds, at most 60).
    record_connections: bool = True
    connection_refresh: float = 30.0


@dataclass(frozen=True)
class ReportSettings:
    # A client that sent more than this many MB to one name in a report window is flagged.
    upload_warn_mb: float = 10.0


@dataclass(frozen=True)
class MetricsSettings:
    listen: HostPort | None = None  # None: no /metrics endpoint


@dataclass(frozen=True)
class DnstapSettings:
    address: str | None = None  # "unix:/run/dnstap.sock" or "tcp:127.0.0.1:6000"; None: off
    identity: str = ""  # empty: the host name
    version: str = ""  # empty: "dnsguard <version>"
    queue_max: int = 100_000  # messages waiting for the collector; past this they are dropped (counted)


@dataclass(frozen=True)
class DockerSettings:
    # Docker Engine API socket for container names in the log; "" = never ask Docker. The log
    # writer looks for it now and then (backing off to every 30 s) until it exists.
    socket: str = "/var/run/docker.sock"


@dataclass(frozen=True)
class ClientPolicy:
    """A named client (``[[clients]]``): its sources, mode and extra rules."""

    name: str
    sources: tuple[IPNetwork, ...]
    mode: str
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    matcher: Matcher = field(compare=False, repr=False)


@dataclass(frozen=True)
class Config:
    path: str
    text: str
    mode: str
    server: ServerSettings
    upstream: UpstreamSettings
    cache: CacheSettings
    log: LogSettings
    firewall: FirewallSettings
    allow_domains: tuple[str, ...]
    deny_domains: tuple[str, ...]
    allow_cidrs: tuple[IPNetwork, ...]
    clients: tuple[ClientPolicy, ...]
    matcher: Matcher = field(compare=False, repr=False)
    metrics: MetricsSettings = MetricsSettings()
    dnstap: DnstapSettings = DnstapSettings()
    report: ReportSettings = field(default_factory=ReportSettings)
    docker: DockerSettings = DockerSettings()

    @property
    def listen(self) -> tuple[HostPort, ...]:
        return self.server.listen

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)
