"""``held_signals``: a signal inside the block reaches its handler when the block ends, not before."""

from __future__ import annotations

import os
import signal
import threading

from distgen.signals import held_signals


def test_a_signal_in_the_block_is_delivered_after_it():
    seen: list[str] = []
    before = signal.signal(signal.SIGTERM, lambda *_: seen.append("handler"))
    try:
        with held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # twice: delivered once, as a pending signal would be
            seen.append("end of block")
        assert seen == ["end of block", "handler"]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_ignored_signal_stays_ignored():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with held_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_outside_the_main_thread_it_changes_nothing():
    handlers: list[object] = []

    def run() -> None:
        with held_signals():
            handlers.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert handlers == [signal.getsignal(signal.SIGINT)]
