"""``held_signals``: a signal inside the block reaches its handler when the block ends, not before, and
a child started inside begins life with Ctrl-C held; ``catchable_ctrl_c``: a caught Ctrl-C exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from distgen.signals import catchable_ctrl_c, held_signals


@pytest.fixture(autouse=True)
def ctrl_c_as_a_terminal_delivers_it():
    """Python's own SIGINT handler in this process, so its children start with SIGINT at its default: a
    runner that started the tests with SIGINT ignored (a background job of a non-interactive shell does)
    would otherwise pass the ignoring on to every child, and these tests are about Ctrl-C itself."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


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


def test_outside_the_main_thread_no_handler_is_swapped():
    handlers: list[object] = []

    def run() -> None:
        with held_signals():
            handlers.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert handlers == [signal.getsignal(signal.SIGINT)]


SCRIPT = """
import os, signal, sys
from distgen.signals import catchable_ctrl_c
if sys.argv[1] == "catchable":
    catchable_ctrl_c()
try:  # Ctrl-C while a dataclass is being made, as an import in progress does
    exec("os.kill(os.getpid(), signal.SIGINT)\\nimport time\\ntime.sleep(5)")
except KeyboardInterrupt:
    print("caught")
"""


@pytest.mark.parametrize("mode", ["default", "catchable"])
def test_a_caught_ctrl_c_inside_exec_exits_0_only_when_catchable(mode, tmp_path):
    """CPython ends a process by SIGINT at exit when a plain KeyboardInterrupt escaped an exec(),
    however it was caught afterwards: the cause of a server that stopped cleanly on Ctrl-C and
    still exited -2."""
    script = tmp_path / "interrupt.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "caught", proc.stderr
    assert proc.returncode == (0 if mode == "catchable" else -signal.SIGINT), proc.stderr


def test_catchable_ctrl_c_leaves_an_ignored_sigint_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        catchable_ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


CHILD = """
import time
time.sleep(1.0)  # an interpreter still starting: a Ctrl-C now would unwind it with a traceback
from distgen.signals import ignore_ctrl_c
ignore_ctrl_c()
time.sleep(0.2)
print("alive")
"""


@pytest.mark.parametrize("where", ["held", "held in a thread", "not held"])
def test_a_child_started_in_the_block_survives_ctrl_c_while_it_starts(where, tmp_path):
    """The group-wide Ctrl-C that reached an engine core while its interpreter started printed a
    "Fatal Python error" from it; a child started inside the block lets the parent decide."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    children: list[subprocess.Popen] = []

    def start() -> None:
        cmd = [sys.executable, str(script)]
        children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    if where == "held":
        with held_signals():
            start()
    elif where == "held in a thread":  # an LLM built off the main thread starts its workers so

        def start_held() -> None:
            with held_signals():
                start()

        thread = threading.Thread(target=start_held)
        thread.start()
        thread.join()
    else:
        start()
    child = children[0]
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    if where != "not held":
        assert (child.returncode, out.strip()) == (0, "alive"), err
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # unblocked here
    else:
        assert child.returncode != 0 and "alive" not in out
