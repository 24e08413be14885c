"""Holding Ctrl-C and SIGTERM back while a child process is handed its arguments.

A signal that unwinds the parent between starting a child and finishing writing the child's
arguments leaves the child reading half of them (a traceback on the terminal, from a process that
would have been stopped anyway). Inside :func:`held_signals` such a signal is noted and delivered
when the block ends, to whatever handled it before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_signals() -> Iterator[None]:
    """Defer SIGINT and SIGTERM to the end of the block (only the main thread can: elsewhere, a
    no-op). Signals that were ignored stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {s: signal.getsignal(s) for s in HELD}
    for s, handler in before.items():
        if handler not in (signal.SIG_IGN, None):  # None: a handler not installed from Python
            signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is not None:
                signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)
