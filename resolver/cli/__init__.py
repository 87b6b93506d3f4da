"""The ``dnsguard`` command: click groups, thin. Each command parses its options, calls one
library function and turns ``DnsguardError`` into a message and an exit code.

One module per command group: ``main`` (serve, check, the group itself), ``report``,
``learn`` (learn and policy history/rollback), ``firewall``; ``common`` holds what they share.
May import anything below it.
"""

from resolver.cli.main import main

__all__ = ["main"]
