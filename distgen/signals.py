"""Signals in the command-line entry points: holding them back while a child process is handed its
arguments, and a Ctrl-C that can be caught for good.

A signal that unwinds the parent between starting a child and finishing writing the child's
arguments leaves the child reading half of them (a traceback on the terminal, from a process that
would have been stopped anyway). Inside :func:`held_signals` such a signal is noted and delivered
when the block ends, to whatever handled it before. A child started inside also begins its life
with Ctrl-C blocked (a signal mask survives ``exec``, a handler does not), so a Ctrl-C that reaches
the whole process group while the child's interpreter starts stays pending until the child calls
:func:`ignore_ctrl_c`, rather than unwinding that start with a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_signals() -> Iterator[None]:
    """Defer SIGINT and SIGTERM to the end of the block (only the main thread can swap handlers:
    elsewhere only the children's Ctrl-C is held). Signals that were ignored stay ignored. Children
    started inside must call :func:`ignore_ctrl_c` first thing."""
    if threading.current_thread() is not threading.main_thread():
        with _ctrl_c_blocked():
            yield
        return
    caught: list[int] = []
    before = {s: signal.getsignal(s) for s in HELD}
    for s, handler in before.items():
        if handler not in (signal.SIG_IGN, None):  # None: a handler not installed from Python
            signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        with _ctrl_c_blocked():
            yield
    finally:
        for s, handler in before.items():
            if handler is not None:
                signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


@contextmanager
def _ctrl_c_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread: a signal mask is per thread and inherited by the children it
    starts. This process still gets Ctrl-C through its other threads (Python runs the handler in
    the main thread), or when the block ends."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ignore_ctrl_c() -> None:
    """In a child started inside :func:`held_signals`: ignore Ctrl-C (the parent decides how its
    children stop), dropping one that arrived while the interpreter started, then unblock it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Interrupted(KeyboardInterrupt):
    """The KeyboardInterrupt that :func:`catchable_ctrl_c` raises.

    CPython notes a plain KeyboardInterrupt that escapes an ``exec()`` of a string (an import in
    progress runs some: every dataclass and namedtuple), and a ``python -m`` process then ends by
    SIGINT at exit, even after the interrupt was caught and everything shut down cleanly. It checks
    the exception's exact type, so a subclass is caught by ``except KeyboardInterrupt`` and leaves
    no such note."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted


def catchable_ctrl_c() -> None:
    """From now on Ctrl-C raises :class:`Interrupted`, where it raised KeyboardInterrupt. A process
    that ignores SIGINT (started in the background by a shell) goes on ignoring it."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
