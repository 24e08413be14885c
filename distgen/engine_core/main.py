"""``python -m distgen.engine_core.main``: the engine-core process's entry point.

Reads its :class:`EngineCoreProcArgs` (pickled) from stdin. A module of its own, so that the module
run as ``__main__`` is not also imported by the ``distgen`` package.
"""

import pickle
import sys

from distgen.signals import ignore_ctrl_c

if __name__ == "__main__":
    # Before anything heavy loads: a Ctrl-C (sent to the whole process group) while torch imports
    # here would print a traceback; the front end decides how to stop the core.
    ignore_ctrl_c()
    from distgen.engine_core.proc import run_engine_core

    run_engine_core(pickle.load(sys.stdin.buffer))
