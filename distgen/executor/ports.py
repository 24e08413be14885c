"""Free TCP ports for rendezvous and servers, picked where nothing else is handed them.

A port the kernel gives to ``bind(0)`` comes from its ephemeral range, the same range it hands to
every outgoing connection: between the moment one is found free and the moment its user binds it,
any process that connects somewhere (Ray starts many) can be given it, and the bind fails with
EADDRINUSE (seen at the tensor-parallel rendezvous). Ports just below that range are only ever taken
by an explicit bind, so a port picked there stays free until its user takes it.
"""

from __future__ import annotations

import random
import socket

_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range
_SPAN = 12000  # how far below the ephemeral range to look
_MIN_ROOM = 1000  # fewer ports than this below the range (a custom setting): let the kernel pick
_rng = random.SystemRandom()  # not random's shared state: forked processes would pick alike


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range when there is room (else one the kernel
    picks)."""
    lo, _ = ephemeral_range()
    start = max(1024, lo - _SPAN)
    if lo - start >= _MIN_ROOM:
        for _ in range(100):
            port = _rng.randrange(start, lo)
            if _bindable(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
