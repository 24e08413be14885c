"""Messages between the ``mp`` executor and its worker processes (msgspec msgpack, tagged unions).

Executor -> every worker: one :data:`WorkerRequest` per call. Worker -> executor: :data:`WorkerReply`;
for ``ExecuteModel`` only rank 0 answers, for the other calls every rank does.
"""

from __future__ import annotations

import msgspec

from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput


class DetermineNumBlocks(msgspec.Struct, tag=True, array_like=True):
    pass


class InitKVCache(msgspec.Struct, tag=True, array_like=True):
    num_blocks: int


class ExecuteModel(msgspec.Struct, tag=True, array_like=True):
    sched: SchedulerOutput


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


WorkerRequest = DetermineNumBlocks | InitKVCache | ExecuteModel | Shutdown


class Ready(msgspec.Struct, tag=True, array_like=True):
    rank: int
    pid: int


class Failed(msgspec.Struct, tag=True, array_like=True):
    """The worker raised (at start or in a call) and is exiting; ``error`` is the traceback."""

    rank: int
    error: str
    error_type: str = ""  # the exception's class name and message, to raise a setting error as itself
    message: str = ""


class NumBlocks(msgspec.Struct, tag=True, array_like=True):
    rank: int
    num_blocks: int


class Ack(msgspec.Struct, tag=True, array_like=True):
    rank: int


class StepResult(msgspec.Struct, tag=True, array_like=True):
    output: ModelRunnerOutput


WorkerReply = Ready | Failed | NumBlocks | Ack | StepResult
