"""What is allowed: ``policy.toml`` parsed into a Config, the name matcher, the exfiltration
detector, policy history and rollback, and ``learn`` (observed lookups -> a minimal policy).

May import ``resolver.core`` only. Pure: no sockets, no asyncio; ``learn`` and ``history``
read and write the log database through plain sqlite3 (the vocabulary is in
``resolver.core.logdb``).
"""
