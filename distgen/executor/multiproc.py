"""Tensor parallelism on one host: one spawned worker process per rank.

Control plane: ZeroMQ over ipc:// sockets in a private temporary directory. Each call is encoded
once and pushed to every rank; replies come back on one PULL socket. While waiting, the executor
polls with a short timeout and checks between polls that every worker is still alive, so a dead
worker turns into :class:`EngineDeadError` instead of a hang. The data plane (all-reduce, gather)
is torch.distributed, rendezvousing on a free loopback port chosen at start.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import msgspec
import zmq

from distgen.config import EngineConfig
from distgen.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from distgen.engine.exceptions import EngineDeadError, WorkerStartupError
from distgen.executor.base import Executor
from distgen.executor.messages import (
    Ack,
    DetermineNumBlocks,
    ExecuteModel,
    Failed,
    InitKVCache,
    NumBlocks,
    Ready,
    Shutdown,
    StepResult,
    WorkerReply,
    WorkerRequest,
)
from distgen.executor.mp_worker import WorkerArgs, run_worker
from distgen.model_loader.loader import ModelSource

logger = logging.getLogger("distgen")
_Reply = TypeVar("_Reply", NumBlocks, Ack, StepResult)

STARTUP_TIMEOUT_S = 120.0  # every rank must report ready (model loaded) within this
POLL_MS = 100  # how often a waiting executor checks that its workers are alive
FAILURE_GRACE_S = 1.0  # after a first failure, how long to collect the other ranks' reports
SHUTDOWN_TIMEOUT_S = 5.0
_SPAWN_HINT = (
    " before reporting (see its stderr; the workers are spawned, so a script that starts the engine "
    "needs an `if __name__ == '__main__':` guard)"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Resources:
    """Everything to release at shutdown; held apart from the executor so a finalizer can own it."""

    ipc_dir: str
    ctx: zmq.Context
    requests: list[zmq.Socket]
    replies: zmq.Socket
    procs: list[mp.process.BaseProcess] = field(default_factory=list)

    def close(self) -> None:
        encoded = msgspec.msgpack.encode(Shutdown())
        for sock, proc in zip(self.requests, self.procs):
            if proc.is_alive():
                try:
                    sock.send(encoded, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for sock in [*self.requests, self.replies]:
            sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        super().__init__(config, source)
        self.world_size = config.parallel.tensor_parallel_size
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WorkerReply)
        self._dead: str | None = None  # the error message once the engine is dead
        ipc_dir = tempfile.mkdtemp(prefix="distgen-mp-")
        ctx = zmq.Context()
        requests = []
        for rank in range(self.world_size):
            sock = ctx.socket(zmq.PUSH)
            sock.bind(f"ipc://{ipc_dir}/req-{rank}")
            requests.append(sock)
        replies = ctx.socket(zmq.PULL)
        replies.bind(f"ipc://{ipc_dir}/reply")
        self._res = _Resources(ipc_dir, ctx, requests, replies)
        self._finalizer = weakref.finalize(self, self._res.close)
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise

    @property
    def ipc_dir(self) -> str:
        return self._res.ipc_dir

    @property
    def worker_pids(self) -> list[int | None]:
        return [p.pid for p in self._res.procs]

    # -- startup ---------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        spawn = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(self.world_size):
            args = WorkerArgs(
                rank,
                self.config,
                self.source,
                init_method,
                self._res.ipc_dir,
                os.getpid(),
            )
            proc = spawn.Process(target=run_worker, args=(args,), name=f"distgen-worker-{rank}", daemon=True)
            proc.start()
            self._res.procs.append(proc)
        t0 = time.monotonic()
        ready: set[int] = set()
        while len(ready) < self.world_size:
            msg = self._recv(t0 + STARTUP_TIMEOUT_S, starting=True)
            if msg is None:
                missing = sorted(set(range(self.world_size)) - ready)
                self._die(f"ranks {missing} were not ready within {STARTUP_TIMEOUT_S:.0f}s", True)
            if not isinstance(msg, Ready):
                self._die(f"protocol error: expected Ready from a starting worker, got {msg!r}", True)
            ready.add(msg.rank)
        logger.info("%d mp workers ready in %.1fs", self.world_size, time.monotonic() - t0)

    # -- the calls -------------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        self._broadcast(DetermineNumBlocks())
        counts: dict[int, int] = {}
        while len(counts) < self.world_size:
            msg = self._expect(NumBlocks)
            counts[msg.rank] = msg.num_blocks
        return min(counts.values())

    def init_kv_cache(self, num_blocks: int) -> None:
        self._broadcast(InitKVCache(num_blocks))
        acked: set[int] = set()
        while len(acked) < self.world_size:
            acked.add(self._expect(Ack).rank)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._broadcast(ExecuteModel(sched))
        return self._expect(StepResult).output

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the engine was shut down"
        self._finalizer()

    # -- plumbing --------------------------------------------------------------------------------
    def _broadcast(self, msg: WorkerRequest) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        data = self._encoder.encode(msg)
        for sock in self._res.requests:
            while True:
                try:
                    sock.send(data, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self._check_alive(starting=False)
                    sock.poll(POLL_MS, zmq.POLLOUT)

    def _expect(self, kind: type[_Reply]) -> _Reply:
        msg = self._recv(None, starting=False)
        if not isinstance(msg, kind):
            self._die(f"protocol error: expected {kind.__name__} from the workers, got {msg!r}", False)
        return msg

    def _recv(self, deadline: float | None, starting: bool) -> object | None:
        """Next reply (None once ``deadline`` passes); raises if a worker reports a failure or dies."""
        sock = self._res.replies
        try:
            while not sock.poll(POLL_MS):
                self._check_alive(starting)
                if deadline is not None and time.monotonic() > deadline:
                    return None
        except KeyboardInterrupt:
            # The workers are mid-call: their next answer would be out of step with the caller.
            self._dead = "the engine is dead: interrupted while waiting for the workers"
            self.shutdown()
            raise
        msg = self._decoder.decode(sock.recv())
        if isinstance(msg, Failed):
            self._die(self._failure_report([msg], starting), starting)
        return msg

    def _check_alive(self, starting: bool) -> None:
        if any(p.exitcode is not None for p in self._res.procs):
            self._die(self._failure_report([], starting), starting)

    def _failure_report(self, failed: list[Failed], starting: bool) -> str:
        """Wait briefly for the other ranks' reports, then describe every rank that failed or died."""
        deadline = time.monotonic() + FAILURE_GRACE_S
        sock = self._res.replies
        while time.monotonic() < deadline:
            if sock.poll(POLL_MS):
                msg = self._decoder.decode(sock.recv())
                if isinstance(msg, Failed):
                    failed.append(msg)
            elif all(p.exitcode is not None for p in self._res.procs):
                break
        reported = {f.rank for f in failed}
        lines = []
        for rank, proc in enumerate(self._res.procs):
            code = proc.exitcode
            if code is not None and code < 0 and rank not in reported:
                lines.append(f"worker rank {rank} (pid {proc.pid}) died: {_describe_exit(code)}")
        for rank, proc in enumerate(self._res.procs):
            code = proc.exitcode
            if code is not None and code >= 0 and rank not in reported:
                hint = _SPAWN_HINT if starting else ""
                lines.append(f"worker rank {rank} (pid {proc.pid}) exited with {_describe_exit(code)}{hint}")
        for f in sorted(failed, key=lambda f: f.rank):
            last = f.error.strip().splitlines()[-1] if f.error.strip() else "?"
            lines.append(f"worker rank {f.rank} raised {last}\n{f.error}")
        return "\n".join(lines) or "a worker failed"

    def _die(self, why: str, starting: bool) -> NoReturn:
        self._dead = f"the engine is dead: {why}"
        self.shutdown()
        if starting:
            raise WorkerStartupError(f"tensor-parallel workers failed to start: {why}")
        raise EngineDeadError(self._dead)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
