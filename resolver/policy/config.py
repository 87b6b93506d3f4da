"""policy.toml -> one typed, immutable Config, validated once.

Runtime code never sees raw TOML. Every problem is reported with the file,
the line (TOML's own for syntax errors; the line holding the offending entry
otherwise) and the entry, and nothing half-loaded is ever returned -- which is
what lets a reload keep the running policy when the new file is broken.
"""

from __future__ import annotations

import codecs
import gc
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from resolver.core.errors import PolicyError
from resolver.policy import tomlfast
from resolver.policy.matcher import Matcher, RuleError, compile_rule

# The settings types live in settings.py; importing them from here keeps working.
from resolver.policy.settings import (  # noqa: F401
    DEFAULT_CLIENTS,
    DEFAULT_PORTS,
    MODES,
    PACKAGED_POLICY,
    CacheSettings,
    ClientPolicy,
    Config,
    DnstapSettings,
    DockerSettings,
    FirewallSettings,
    HostPort,
    IPNetwork,
    LogSettings,
    MetricsSettings,
    ReportSettings,
    ServerSettings,
    UpstreamSettings,
)

# ---------------------------------------------------------------- parsing helpers

class _Ctx:
    """Carries the file name and text so every error can point at a line."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self._lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        # Only errors need lines: splitting a 30 MB policy up front is one long C call, which
        # holds the GIL (and stalls DNS) when a reload parses in a thread.
        if self._lines is None:
            self._lines = self.text.splitlines()
        return self._lines

    def line_of(self, needle: str | None, key: str | None = None, section: str | None = None) -> int | None:
        if needle:
            for quoted in (f'"{needle}"', f"'{needle}'"):
                # Prefer the entry itself over a comment that happens to mention it.
                for code_only in (True, False):
                    for no, line in enumerate(self.lines, 1):
                        if quoted in (line.split("#", 1)[0] if code_only else line):
                            return no
        if key is not None:
            start = 0
            if section:
                head = re.compile(rf"^\s*\[+\s*{re.escape(section)}\s*\]")
                start = next((i for i, line in enumerate(self.lines) if head.match(line)), 0)
            pat = re.compile(rf"^\s*(\[+\s*)?{re.escape(key)}\b")
            for no, line in enumerate(self.lines[start:], start + 1):
                if pat.match(line):
                    return no
        return None

    def fail(self, message: str, *, entry: str | None = None, key: str | None = None,
             section: str | None = None) -> PolicyError:
        return PolicyError(message, path=self.path, line=self.line_of(entry, key, section), entry=entry)


def _table(ctx: _Ctx, data: dict, name: str, allowed: set[str]) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ctx.fail(f"[{name}] must be a table", key=name)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ctx.fail(f"unknown key {name}.{unknown[0]} (known: {', '.join(sorted(allowed))})",
                       key=unknown[0], section=name)
    return value


_KIND_NAMES = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}


def _typed(ctx: _Ctx, table: dict, where: str, key: str, kind: type | tuple, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    # bool is an int in Python; a boolean where a number belongs is a mistake.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        name = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ctx.fail(f"{where}.{key} must be {name}, not {value!r}", key=key, section=where)
    return value


def _str_list(ctx: _Ctx, table: dict, where: str, key: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ctx.fail(f"{where}.{key} must be a list of strings", key=key, section=where)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ctx.fail(f"{where}.{key}[{i}] must be a string, not {item!r}", key=key, section=where)
    return value


def parse_hostport(text: str, default_port: int = 53) -> HostPort:
    """``"127.0.0.1:5353"``, ``"[::1]:53"``, ``"::1"`` or ``"192.0.2.1"`` -> (host, port)."""
    text = text.strip()
    host, port = text, default_port
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), int(m.group(2) or default_port)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address with an optional port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def _hostports(ctx: _Ctx, items: list[str], where: str, default_port: int) -> tuple[HostPort, ...]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_hostport(item, default_port))
        except ValueError as exc:
            raise ctx.fail(f"{where}[{i}]: {exc}", entry=item) from None
    return tuple(out)


def _networks(ctx: _Ctx, items: list[str], where: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ctx.fail(f"{where}[{i}]: {item!r} is not a CIDR or address", entry=item) from None
    return tuple(out)


def _matcher(ctx: _Ctx, allow: list[str], deny: list[str], where: str) -> Matcher:
    try:
        return Matcher(allow, deny)
    except RuleError as exc:
        for list_name, items in (("allow", allow), ("deny", deny)):
            if exc.entry in items:
                idx = items.index(exc.entry)
                raise ctx.fail(f"{where}{list_name}.domains[{idx}]: {exc}", entry=exc.entry) from None
        raise ctx.fail(f"{where}{exc}", entry=exc.entry) from None


def _mode(ctx: _Ctx, value: Any, where: str) -> str:
    if value not in MODES:
        raise ctx.fail(f"{where} must be \"enforce\" or \"audit\", not {value!r}", key="mode")
    return value


def _ports(ctx: _Ctx, value: Any) -> tuple[tuple[str, int], ...] | None:
    if value == "any":
        return None
    if not isinstance(value, list):
        raise ctx.fail('firewall.ports must be "any" or a list like ["tcp/443"]', key="ports")
    out = []
    for item in value:
        m = re.fullmatch(r"(tcp|udp)/(\d{1,5})", str(item))
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ctx.fail(f"firewall.ports: {item!r} is not like 'tcp/443'", entry=str(item))
        out.append((m.group(1), int(m.group(2))))
    return tuple(out)


def resolv_conf_servers(path: str = "/etc/resolv.conf") -> list[HostPort]:
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ipaddress.ip_address(parts[1].split("%")[0])
                    except ValueError:
                        continue
                    servers.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return servers


def without_self(servers: list[HostPort] | tuple[HostPort, ...],
                 listen: tuple[HostPort, ...]) -> tuple[HostPort, ...]:
    """Drop upstreams that are dnsguard itself: forwarding there would loop every query back in.

    A listen address of 0.0.0.0 / :: answers on every local address, so any local address
    on that port counts (loopback for certain; others are not knowable without asking the
    kernel, and a resolv.conf pointing at the host's own LAN address is rare).
    """
    def is_self(server: HostPort) -> bool:
        host, port = server
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        for lhost, lport in listen:
            if lport != port:
                continue
            laddr = ipaddress.ip_address(lhost)
            if laddr == addr or (laddr.is_unspecified and (addr.is_loopback or addr.is_unspecified)):
                return True
        return False

    return tuple(s for s in servers if not is_self(s))


# ---------------------------------------------------------------- entry points

TOP_KEYS = {"mode", "server", "upstream", "cache", "allow", "deny", "log", "firewall", "clients",
            "metrics", "dnstap", "report", "docker"}


def parse_config(text: str, path: str = "<policy>") -> Config:
    """Validate policy text; raise PolicyError (with file, line, entry) on any problem."""
    # Millions of short-lived objects for a big policy set off full collections that find
    # nothing (nothing built here forms a cycle): a third of a 1M-name load, measured.
    was = gc.isenabled()
    gc.disable()
    try:
        return _parse_config(text, path)
    finally:
        if was:
            gc.enable()


def _parse_config(text: str, path: str) -> Config:
    ctx = _Ctx(path, text)
    try:
        data = tomlfast.loads(text)
    except RecursionError:
        raise PolicyError("invalid TOML: nested too deeply", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        line = int(m.group(1)) if m else (len(ctx.lines) or None) if "end of document" in str(exc) else None
        raise PolicyError(f"invalid TOML: {exc}", path=path, line=line) from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ctx.fail(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})", key=unknown[0])

    mode = _mode(ctx, data.get("mode", "enforce"), "mode")

    s = _table(ctx, data, "server", {"listen", "clients", "tcp_idle_timeout_ms", "tcp_max_connections",
                                     "rate_limit"})
    listen = _hostports(ctx, _str_list(ctx, s, "server", "listen") or ["127.0.0.1:5353"], "server.listen", 53)
    clients_acl = _networks(ctx, _str_list(ctx, s, "server", "clients") or list(DEFAULT_CLIENTS),
                            "server.clients")
    idle_ms = _typed(ctx, s, "server", "tcp_idle_timeout_ms", int, 10_000)
    max_conn = _typed(ctx, s, "server", "tcp_max_connections", int, 256)
    if idle_ms <= 0 or max_conn <= 0:
        raise ctx.fail("server.tcp_idle_timeout_ms and tcp_max_connections must be positive",
                       key="tcp_idle_timeout_ms" if idle_ms <= 0 else "tcp_max_connections")
    rate_limit = _typed(ctx, s, "server", "rate_limit", int, 0)
    if not 0 <= rate_limit <= 10_000_000:
        raise ctx.fail("server.rate_limit must be between 0 (off) and 10000000 queries per second",
                       key="rate_limit", section="server")
    server = ServerSettings(listen, clients_acl, idle_ms / 1000, max_conn, rate_limit)

    u = _table(ctx, data, "upstream", {"servers", "timeout_ms"})
    timeout_ms = _typed(ctx, u, "upstream", "timeout_ms", int, 2000)
    if not 10 <= timeout_ms <= 60_000:
        raise ctx.fail("upstream.timeout_ms must be between 10 and 60000", key="timeout_ms")
    if "servers" in u:
        servers = _hostports(ctx, _str_list(ctx, u, "upstream", "servers"), "upstream.servers", 53)
        if not servers:
            raise ctx.fail("upstream.servers is empty; remove it to use /etc/resolv.conf", key="servers")
        from_resolv = False
    else:
        servers = without_self(resolv_conf_servers(), listen)
        from_resolv = True
    upstream = UpstreamSettings(servers, timeout_ms / 1000, from_resolv)

    c = _table(ctx, data, "cache", {"max_entries", "min_ttl", "max_ttl", "negative_max_ttl", "stale_max_s"})
    cache = CacheSettings(
        max_entries=_typed(ctx, c, "cache", "max_entries", int, 100_000),
        min_ttl=_typed(ctx, c, "cache", "min_ttl", int, 0),
        max_ttl=_typed(ctx, c, "cache", "max_ttl", int, 86_400),
        negative_max_ttl=_typed(ctx, c, "cache", "negative_max_ttl", int, 3_600),
        stale_max=_typed(ctx, c, "cache", "stale_max_s", int, 86_400),
    )
    if cache.max_entries < 0 or cache.min_ttl < 0 or cache.max_ttl < cache.min_ttl:
        raise ctx.fail("cache: max_entries >= 0 and 0 <= min_ttl <= max_ttl required", key="cache")
    if not 0 <= cache.stale_max <= 7 * 86_400:
        raise ctx.fail("cache.stale_max_s must be between 0 (off) and 604800 (RFC 8767: at most 7 days)",
                       key="stale_max_s", section="cache")

    a = _table(ctx, data, "allow", {"domains", "cidrs"})
    d = _table(ctx, data, "deny", {"domains"})
    allow = _str_list(ctx, a, "allow", "domains")
    deny = _str_list(ctx, d, "deny", "domains")
    matcher = _matcher(ctx, allow, deny, "")
    allow_cidrs = _networks(ctx, _str_list(ctx, a, "allow", "cidrs"), "allow.cidrs")

    lg = _table(ctx, data, "log", {"enabled", "database", "retention_days", "queue_max", "max_size_mb"})
    log = LogSettings(
        enabled=_typed(ctx, lg, "log", "enabled", bool, True),
        database=_typed(ctx, lg, "log", "database", str, "dnsguard.db"),
        retention_days=_typed(ctx, lg, "log", "retention_days", int, 30),
        queue_max=_typed(ctx, lg, "log", "queue_max", int, 200_000),
        max_size_mb=_typed(ctx, lg, "log", "max_size_mb", int, 1024),
    )
    if log.retention_days < 0 or log.queue_max <= 0:
        raise ctx.fail("log.retention_days must be >= 0 and log.queue_max > 0", key="log")
    if log.max_size_mb < 0:
        raise ctx.fail("log.max_size_mb must be >= 0 (0 = no limit)", key="max_size_mb", section="log")

    fw = _table(ctx, data, "firewall", {"enabled", "min_ttl", "max_ttl", "ports", "record_connections",
                                        "connection_refresh_s"})
    firewall = FirewallSettings(
        enabled=_typed(ctx, fw, "firewall", "enabled", bool, False),
        min_ttl=_typed(ctx, fw, "firewall", "min_ttl", int, 30),
        max_ttl=_typed(ctx, fw, "firewall", "max_ttl", int, 86_400),
        ports=_ports(ctx, fw["ports"]) if "ports" in fw else FirewallSettings.ports,
        record_connections=_typed(ctx, fw, "firewall", "record_connections", bool, True),
        connection_refresh=float(_typed(ctx, fw, "firewall", "connection_refresh_s", (int, float), 30.0)),
    )
    if not 1 <= firewall.min_ttl <= firewall.max_ttl <= 2_147_483:
        raise ctx.fail("firewall: 1 <= min_ttl <= max_ttl <= 2147483 required (ipset's limits)",
                       key="min_ttl")
    if not 0 < firewall.connection_refresh <= 60:
        raise ctx.fail("firewall.connection_refresh_s must be more than 0 and at most 60 (seconds)",
                       key="connection_refresh_s")

    rp = _table(ctx, data, "report", {"upload_warn_mb"})
    warn_mb = _typed(ctx, rp, "report", "upload_warn_mb", (int, float), 10.0)
    report = ReportSettings(upload_warn_mb=float(warn_mb))
    if report.upload_warn_mb <= 0:
        raise ctx.fail("report.upload_warn_mb must be positive", key="upload_warn_mb")

    clients = _clients(ctx, data.get("clients", []), mode, allow, deny)
    metrics, dnstap = _observe(ctx, data)

    dk = _table(ctx, data, "docker", {"socket"})
    docker = DockerSettings(socket=_typed(ctx, dk, "docker", "socket", str, DockerSettings.socket))

    return Config(
        path=path, text=text, mode=mode, server=server, upstream=upstream, cache=cache, log=log,
        firewall=firewall, allow_domains=tuple(allow), deny_domains=tuple(deny),
        allow_cidrs=allow_cidrs, clients=clients, matcher=matcher, metrics=metrics, dnstap=dnstap,
        report=report, docker=docker,
    )


def parse_dnstap_address(text: str) -> str:
    """Check a dnstap address: ``unix:/path`` or ``tcp:HOST:PORT``; return it unchanged."""
    if text.startswith("unix:") and len(text) > 5:
        if len(text[5:].encode()) > 107:  # sun_path holds 108 bytes with the NUL
            raise ValueError(f"unix socket path too long: {text[5:]!r}")
        return text
    if text.startswith("tcp:"):
        host, port = parse_hostport(text[4:], 0)
        if port == 0:
            raise ValueError(f"{text!r} needs a port, e.g. tcp:127.0.0.1:6000")
        return text
    raise ValueError(f"{text!r} is not unix:/PATH or tcp:HOST:PORT")


def _observe(ctx: _Ctx, data: dict) -> tuple[MetricsSettings, DnstapSettings]:
    m = _table(ctx, data, "metrics", {"listen"})
    listen = _typed(ctx, m, "metrics", "listen", str, "")
    try:
        metrics = MetricsSettings(parse_hostport(listen, 9153) if listen else None)
    except ValueError as exc:
        raise ctx.fail(f"metrics.listen: {exc}", entry=listen, key="listen") from None
    t = _table(ctx, data, "dnstap", {"address", "identity", "version", "queue_max"})
    address = _typed(ctx, t, "dnstap", "address", str, "")
    try:
        address = parse_dnstap_address(address) if address else None
    except ValueError as exc:
        raise ctx.fail(f"dnstap.address: {exc}", entry=address, key="address") from None
    dnstap = DnstapSettings(address, _typed(ctx, t, "dnstap", "identity", str, ""),
                            _typed(ctx, t, "dnstap", "version", str, ""),
                            _typed(ctx, t, "dnstap", "queue_max", int, 100_000))
    if not 1 <= dnstap.queue_max <= 10_000_000:
        raise ctx.fail("dnstap.queue_max must be between 1 and 10000000", key="queue_max")
    return metrics, dnstap


def _clients(ctx: _Ctx, raw: Any, mode: str, allow: list[str], deny: list[str]) -> tuple[ClientPolicy, ...]:
    if not isinstance(raw, list):
        raise ctx.fail("clients must be an array of tables ([[clients]])", key="clients")
    out = []
    names = set()
    for i, entry in enumerate(raw):
        where = f"clients[{i}]"
        if not isinstance(entry, dict):
            raise ctx.fail(f"{where} must be a table", key="clients")
        unknown = sorted(set(entry) - {"name", "sources", "mode", "allow", "deny"})
        if unknown:
            raise ctx.fail(f"unknown key {where}.{unknown[0]}", key=unknown[0])
        name = entry.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ctx.fail(f"{where}.name must be a short word like 'openclaw'", entry=str(name), key="name")
        if name in names:
            raise ctx.fail(f"{where}.name {name!r} is used twice", entry=name)
        names.add(name)
        sources = _networks(ctx, _str_list(ctx, entry, where, "sources"), f"{where}.sources")
        if not sources:
            raise ctx.fail(f"{where}.sources must list at least one address or CIDR", key="sources")
        cmode = _mode(ctx, entry.get("mode", mode), f"{where}.mode")
        callow = _str_list(ctx, entry, where, "allow")
        cdeny = _str_list(ctx, entry, where, "deny")
        for list_name, items in (("allow", callow), ("deny", cdeny)):
            for idx, item in enumerate(items):
                try:
                    compile_rule(item)
                except RuleError as exc:
                    raise ctx.fail(f"{where}.{list_name}[{idx}]: {exc}", entry=item) from None
        # A client's lists add to the top-level ones; deny still wins over allow.
        matcher = _matcher(ctx, allow + callow, deny + cdeny, f"{where}.")
        out.append(ClientPolicy(name, sources, cmode, tuple(callow), tuple(cdeny), matcher))
    return tuple(out)


def load_config(path: str | Path) -> Config:
    """Read and validate a policy file."""
    p = Path(path)
    try:
        # Bytes decoded as they are (CRLF too), so policy history can restore them; in 1 MiB
        # pieces, so a reload reading a big file in a thread never holds the GIL for long.
        decoder = codecs.getincrementaldecoder("utf-8")()
        pieces = []
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                pieces.append(decoder.decode(chunk))
        pieces.append(decoder.decode(b"", final=True))
        text = "".join(pieces)
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy: {exc}", path=str(p)) from None
    return parse_config(text, str(p))


def default_policy_path() -> Path:
    """``./policy.toml`` when present (the repository's shipped policy), else the packaged copy."""
    local = Path("policy.toml")
    return local if local.is_file() else PACKAGED_POLICY
