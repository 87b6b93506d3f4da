"""Plain values and helpers every layer uses: the decision and log-record model, the
exception root, DNS names (text <-> wire), IP-address classification, and the lookup log's
on-disk vocabulary (verdict/mode codes, read-only opening).

Imports nothing else from ``resolver``; no sockets, no asyncio.
"""
