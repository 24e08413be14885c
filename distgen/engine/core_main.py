"""``python -m distgen.engine.core_main``: the engine-core process's entry point.

Reads its :class:`EngineCoreProcArgs` (pickled) from stdin. A module of its own, so that the module
run as ``__main__`` is not also imported by the ``distgen`` package.
"""

import pickle
import sys

from distgen.engine.core_proc import run_engine_core

if __name__ == "__main__":
    run_engine_core(pickle.load(sys.stdin.buffer))
