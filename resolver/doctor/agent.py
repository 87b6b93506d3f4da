"""doctor's agent side: where the checks run (a container through Docker's exec API, or a local
user through setpriv) and how the output of whatever tools the agent has is read.
"""

from __future__ import annotations

import pwd
import re
import subprocess

from resolver.core.addrs import user_source
from resolver.core.errors import DnsguardError
from resolver.log.clients import DockerAPI, DockerError, container_addresses

# User mode asks this (documentation) server: the fence must redirect it to dnsguard, and
# if it does not, the query goes nowhere that matters.
PROBE_RESOLVER = "192.0.2.53"


# ------------------------------------------------------------------ the agent side

# POSIX sh, for whatever the agent's image or the user's PATH offers (busybox, glibc, node).
_NODE_DNS = "require('dns').resolve4(process.argv[1],e=>console.log(e?e.code:'ANSWERED'))"
_NODE_TCP = ("const s=require('net').connect(+process.argv[2],process.argv[1]);"
             "s.setTimeout(3000,()=>{console.log('TIMEOUT');process.exit(0)});"
             "s.on('connect',()=>{console.log('CONNECTED');process.exit(0)});"
             "s.on('error',e=>{console.log(e.code);process.exit(0)})")
# $2, if given, is the server to ask (user mode: the fence redirects DNS to *any* server).
_DNS_SCRIPT = "\n".join([
    'n="$1"; s="$2"',
    'if command -v dig >/dev/null 2>&1; then dig +tries=1 +time=3 ${s:+@$s} "$n" A 2>&1',
    'elif command -v nslookup >/dev/null 2>&1; then nslookup "$n" $s 2>&1',
    f'elif [ -z "$s" ] && command -v node >/dev/null 2>&1; then node -e "{_NODE_DNS}" "$n"',
    'elif command -v getent >/dev/null 2>&1; then getent hosts "$n"; echo "getent-rc=$?"',
    'else echo "NO-TOOL"; fi',
])
_CONNECT_SCRIPT = "\n".join([
    'h="$1"; p="$2"',
    f'if command -v node >/dev/null 2>&1; then node -e "{_NODE_TCP}" "$h" "$p"',
    "elif command -v bash >/dev/null 2>&1; then",
    "  timeout 4 bash -c 'exec 3<>\"/dev/tcp/$0/$1\" && echo CONNECTED' \"$h\" \"$p\" 2>&1; echo \"rc=$?\"",
    'elif command -v nc >/dev/null 2>&1; then nc -w 3 "$h" "$p" </dev/null 2>&1 && echo CONNECTED',
    'elif command -v wget >/dev/null 2>&1; then',
    '  wget -T 3 -q -O /dev/null "http://$h:$p/" 2>&1 && echo CONNECTED',
    'else echo "NO-TOOL"; fi',
])


def classify_dns(output: str) -> str:
    """'nxdomain', 'answered', 'refused', 'timeout', 'no-tool' or 'unknown'."""
    text = output.lower()
    if "no-tool" in text:
        return "no-tool"
    if "nxdomain" in text or "enotfound" in text or "getent-rc=2" in text:
        return "nxdomain"
    if "refused" in text and "status: refused" not in text:
        return "refused"
    if "timed out" in text or "timeout" in text or "no servers could be reached" in text:
        return "timeout"
    if "answered" in text or "status: noerror" in text or re.search(r"address( \d)?:\s*\d", text):
        return "answered"
    return "unknown"


def classify_connect(output: str) -> str:
    """'refused', 'connected', 'timeout', 'no-tool' or 'unknown'."""
    text = output.lower()
    if "no-tool" in text:
        return "no-tool"
    if "refused" in text:
        return "refused"
    if "connected" in text:
        return "connected"
    if "timeout" in text or "timed out" in text or "rc=124" in text:
        return "timeout"
    return "unknown"


class Agent:
    """Where the agent-side checks run: in a container, or as a local user."""

    label: str = ""
    resolver: str = ""  # the DNS server the agent-side query names ("" = the agent's own)

    def run(self, script: str, *args: str) -> str:
        raise NotImplementedError

    def sources(self) -> list[str]:
        """Addresses the agent's DNS reaches dnsguard from."""
        raise NotImplementedError


class ContainerAgent(Agent):
    def __init__(self, api: DockerAPI, name: str, info: dict) -> None:
        self.api, self.name, self.info = api, name, info
        self.label = f"container {name}"

    def run(self, script: str, *args: str) -> str:
        try:
            _, out = self.api.exec(self.name, ["sh", "-c", script, "doctor", *args], timeout=20)
        except DockerError as exc:
            return f"exec failed: {exc}"
        return out

    def sources(self) -> list[str]:
        return list(container_addresses(self.info))


class UserAgent(Agent):
    def __init__(self, user: str, netns: str | None = None) -> None:
        try:
            self.pw = pwd.getpwnam(user)
        except KeyError:
            raise DnsguardError(f"no such user: {user!r}") from None
        self.netns = netns
        self.label = f"user {user}"
        self.resolver = PROBE_RESOLVER

    def run(self, script: str, *args: str) -> str:
        argv = ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}", "--init-groups",
                "sh", "-c", script, "doctor", *args]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not run as {self.pw.pw_name}: {exc}"
        return p.stdout + p.stderr

    def sources(self) -> list[str]:
        src = user_source(self.pw.pw_uid)
        return [src] if src else []
