"""One exception root for everything dnsguard raises on purpose."""

from __future__ import annotations


class DnsguardError(Exception):
    """Root of dnsguard's own errors; the CLI turns these into clean messages."""


class PolicyError(DnsguardError):
    """A policy file (or override) that cannot be used.

    The message always names the file, the line where TOML reports one, and the
    offending entry, so an operator can fix it without guessing.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 entry: str | None = None) -> None:
        self.path = path
        self.line = line
        self.entry = entry
        self.detail = message
        where = path or "<policy>"
        if line is not None:
            where += f":{line}"
        text = f"{where}: {message}"
        if entry is not None and entry not in message:
            text += f" (entry {entry!r})"
        super().__init__(text)


class UpstreamError(DnsguardError):
    """No upstream produced a usable answer in time.

    ``unparseable`` says that at least one upstream answered with a reply that could not
    be parsed (the client's EDE then says "Network Error", not "No Reachable Authority").
    """

    def __init__(self, message: str, *, unparseable: bool = False) -> None:
        super().__init__(message)
        self.unparseable = unparseable
