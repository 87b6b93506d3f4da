"""The query path: wire parsing and locally built answers, the answer cache, upstream
exchanges and reply cleaning, the chain of steps (``chain.py`` says the order and why), and
the UDP/TCP server transports.

May import ``resolver.policy`` and ``resolver.core``. Never imports the log or the fence:
``resolver.app`` hands the chain a log ``submit`` function and a firewall feeder.
"""
