"""Tensor and pipeline parallelism on one host: one spawned worker process per rank.

Control plane: the ZeroMQ broadcast of :mod:`distgen.executor.broadcast` over ipc:// sockets in a
private temporary directory; a worker is gone when its process has an exit code. The data plane
(all-reduce, gather) is torch.distributed, rendezvousing on a free loopback port chosen at start.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time

from distgen.config import EngineConfig
from distgen.exceptions import describe_exit
from distgen.executor.broadcast import BroadcastExecutor, Channel, WorkerExit, WorkerHandles
from distgen.executor.ports import free_port
from distgen.executor.worker_loop import WorkerArgs, run_mp_worker
from distgen.signals import held_signals

logger = logging.getLogger("distgen")

_SPAWN_HINT = (
    " before reporting (see its stderr; the workers are spawned, so a script that starts the engine "
    "needs an `if __name__ == '__main__':` guard)"
)


class _Processes(WorkerHandles):
    def __init__(self, ipc_dir: str) -> None:
        self.ipc_dir = ipc_dir
        self.procs: list[mp.process.BaseProcess] = []

    def exits(self, starting: bool) -> list[WorkerExit]:
        out = []
        for rank, proc in enumerate(self.procs):
            code = proc.exitcode
            if code is not None:
                how = "died: " if code < 0 else "exited with "
                line = f"worker rank {rank} (pid {proc.pid}) {how}{describe_exit(code)}"
                out.append(WorkerExit(rank, code < 0, line))
        return out

    def all_gone(self) -> bool:
        return all(p.exitcode is not None for p in self.procs)

    def stop(self, deadline: float) -> None:
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class MultiprocExecutor(BroadcastExecutor):
    backend_name = "mp"
    startup_hint = _SPAWN_HINT

    def __init__(self, config: EngineConfig, worker_cls: type | None = None) -> None:
        ipc_dir = tempfile.mkdtemp(prefix="distgen-mp-")
        try:
            channel = Channel(config.parallel.world_size, [f"ipc://{ipc_dir}"])
        except BaseException:
            shutil.rmtree(ipc_dir, ignore_errors=True)
            raise
        super().__init__(config, channel, worker_cls)
        self._procs = _Processes(ipc_dir)
        self._start(self._procs)

    @property
    def ipc_dir(self) -> str:
        return self._procs.ipc_dir

    @property
    def worker_pids(self) -> list[int | None]:
        return [p.pid for p in self._procs.procs]

    def _start_workers(self) -> None:
        spawn = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(self.world_size):
            args = WorkerArgs(
                rank,
                self.config,
                init_method,
                *self.channel.endpoints(rank),
                local_rank=rank,
                local_size=self.world_size,
                worker_cls=self.worker_cls,
                parent_pid=os.getpid(),
                cleanup_dir=self.ipc_dir,
            )
            proc = spawn.Process(
                target=run_mp_worker, args=(args,), name=f"distgen-worker-{rank}", daemon=True
            )
            with held_signals():  # a stop now would leave the child reading half its arguments
                proc.start()
                self._procs.procs.append(proc)
        self._wait_ready()
