"""The lookup log: the SQLite schema and its migrations, the batching writer and the child
process it runs in, and the queries behind ``dnsguard report``.

May import ``resolver.policy`` and ``resolver.core``. Never imports the query path or the
fence: records arrive as plain tuples through the submit function ``resolver.app`` wires up.
"""
