"""A child process's watch on its parent: when the parent is gone, clean up what it left and exit."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable

PARENT_CHECK_S = 0.5  # how often a child looks at its parent


def start_orphan_watch(parent_pid: int, cleanup_dir: str | None, exit_now: Callable[[], None]) -> None:
    """In a daemon thread: once ``parent_pid`` is no longer this process's parent, remove
    ``cleanup_dir`` (sockets the dead parent can no longer remove) and call ``exit_now``."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        if cleanup_dir is not None:
            shutil.rmtree(cleanup_dir, ignore_errors=True)
        exit_now()

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
