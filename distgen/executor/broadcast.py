"""The control plane shared by the ``mp`` and ``ray`` executors: one ZeroMQ broadcast per call.

The executor binds one PUSH socket per rank and one PULL socket for the replies; each call is encoded
once and pushed to every rank, and the workers (``worker_loop.serve``) answer on the PULL socket. While
waiting, the executor polls with a short timeout and asks its :class:`WorkerHandles` between polls
whether a worker is gone, so a dead worker turns into :class:`EngineDeadError` instead of a hang. The
backends differ only in how workers start, how their death is seen and how they are stopped.
"""

from __future__ import annotations

import logging
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import msgspec
import zmq

from distgen.config import EngineConfig
from distgen.exceptions import SETTING_ERRORS, EngineDeadError, WorkerStartupError
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
from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("distgen")
_Reply = TypeVar("_Reply", NumBlocks, Ack, StepResult)

STARTUP_TIMEOUT_S = 120.0  # every rank must report ready (model loaded) within this
POLL_MS = 100  # how often a waiting executor checks that its workers are alive
FAILURE_GRACE_S = 1.0  # after a first failure, how long to collect the other ranks' reports
SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerExit:
    """A worker that is gone: ``died`` (killed, crashed) or stopped on its own; ``line`` says how."""

    rank: int
    died: bool
    line: str


class WorkerHandles(ABC):
    """The backend's side: the started workers, whether they are gone, and how to stop them."""

    ready = False  # every rank reported Ready: from then on each reads its requests

    @abstractmethod
    def exits(self, starting: bool) -> list[WorkerExit]:
        """The workers that are gone (an empty list while all run)."""

    @abstractmethod
    def all_gone(self) -> bool: ...

    @abstractmethod
    def stop(self, deadline: float) -> None:
        """After Shutdown was sent: wait until ``deadline`` for the workers to stop, then kill them."""


class Channel:
    """The executor's sockets: one PUSH per rank and one PULL for the replies, each bound at every one
    of ``bases`` (``ipc://DIR``: DIR/req-RANK and DIR/reply; ``ipc://@NAME``: abstract, Linux;
    ``tcp://HOST``: free ports). A worker connects to one base's pair: see :meth:`endpoints`."""

    def __init__(self, world_size: int, bases: list[str]) -> None:
        self.ctx = zmq.Context()
        self.requests: list[zmq.Socket] = []
        self._request_addrs: list[list[str]] = []  # [rank][base]
        try:
            for rank in range(world_size):
                sock = self.ctx.socket(zmq.PUSH)
                self.requests.append(sock)
                self._request_addrs.append([_bind(sock, base, f"req-{rank}") for base in bases])
            self.replies = self.ctx.socket(zmq.PULL)
            self._reply_addrs = [_bind(self.replies, base, "reply") for base in bases]
        except BaseException:
            self.ctx.destroy(linger=0)
            raise

    def endpoints(self, rank: int, base: int = 0) -> tuple[str, str]:
        """(request address, reply address) of ``rank`` through ``bases[base]``."""
        return self._request_addrs[rank][base], self._reply_addrs[base]

    def close(self) -> None:
        for sock in [*self.requests, self.replies]:
            sock.close(linger=0)
        self.ctx.term()


def _bind(sock: zmq.Socket, base: str, name: str) -> str:
    if base.startswith("ipc://"):
        addr = f"{base}/{name}"
        sock.bind(addr)
        return addr
    port = sock.bind_to_random_port(base)
    return f"{base}:{port}"


def _release(channel: Channel, handles: WorkerHandles, alive: list[bool], timeout_s: float) -> None:
    """Tell every worker to stop, stop them (killed after ``timeout_s``), close the sockets (a
    finalizer: holds no executor)."""
    encoded = msgspec.msgpack.encode(Shutdown())
    for sock, ok in zip(channel.requests, alive):
        if ok:
            try:
                sock.send(encoded, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
    handles.stop(time.monotonic() + timeout_s)
    channel.close()


class _LaunchedStep:
    """A step sent to the workers; :meth:`get` waits for rank 0's answer."""

    def __init__(self, executor: BroadcastExecutor, seq: int) -> None:
        self._executor, self._seq = executor, seq
        self._output: ModelRunnerOutput | None = None

    def get(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self._executor._collect(self._seq)
        return self._output


class BroadcastExecutor(Executor):
    """Subclasses bind ``self.channel``, then call :meth:`_start` with their handles; their
    ``_start_workers`` starts the ranks and calls :meth:`_wait_ready`."""

    backend_name = "?"
    startup_hint = ""  # appended to "exited" lines while starting
    restartable = True  # the engine core may replace lost workers with new ones (EngineCore)

    def __init__(self, config: EngineConfig, channel: Channel, worker_cls: type | None = None) -> None:
        super().__init__(config)
        self.worker_cls = worker_cls  # what each rank runs: None = distgen's Worker
        self.world_size = config.parallel.world_size
        self.channel = channel
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WorkerReply)
        self._dead: str | None = None  # the error message once the engine is dead
        self._handles: WorkerHandles | None = None
        self._finalizer: weakref.finalize | None = None
        self._launched = self._collected = 0  # steps sent by submit / answered

    def _start(self, handles: WorkerHandles) -> None:
        """Own ``handles`` (from now on shutdown, garbage collection and interpreter exit release them
        and the channel), then start the workers; if that fails, stop whatever started."""
        self._handles = handles

        def release(channel: Channel = self.channel) -> None:
            gone = {e.rank for e in handles.exits(starting=False)}
            alive = [r not in gone for r in range(len(channel.requests))]
            # Ranks still loading their shard read no Shutdown: stop them at once, so a Ctrl-C while
            # the model loads does not wait out the whole timeout.
            _release(channel, handles, alive, SHUTDOWN_TIMEOUT_S if handles.ready else 0.0)

        self._finalizer = weakref.finalize(self, release)
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self) -> None:
        raise NotImplementedError

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
        return self._expect_step()

    def submit(self, sched: SchedulerOutput) -> _LaunchedStep:
        """Send the step to the workers and return at once; rank 0 answers the steps in order."""
        self._broadcast(ExecuteModel(sched))
        self._launched += 1
        return _LaunchedStep(self, self._launched)

    def _collect(self, seq: int) -> ModelRunnerOutput:
        if seq != self._collected + 1:
            raise RuntimeError(f"step {seq} collected out of order (step {self._collected + 1} is next)")
        self._collected = seq
        return self._expect_step()

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the engine was shut down"
        if self._finalizer is not None:
            self._finalizer()
        else:
            self.channel.close()

    # -- plumbing --------------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        t0 = time.monotonic()
        ready: set[int] = set()
        while len(ready) < self.world_size:
            msg = self._recv(t0 + timeout_s, starting=True)
            if msg is None:
                missing = sorted(set(range(self.world_size)) - ready)
                self._die(f"ranks {missing} were not ready within {timeout_s:.0f}s", True)
            if not isinstance(msg, Ready):
                self._die(f"protocol error: expected Ready from a starting worker, got {msg!r}", True)
            ready.add(msg.rank)
        assert self._handles is not None
        self._handles.ready = True
        logger.info("%d %s workers ready in %.1fs", self.world_size, self.backend_name, time.monotonic() - t0)

    def _broadcast(self, msg: WorkerRequest) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        data = self._encoder.encode(msg)
        for sock in self.channel.requests:
            while True:
                try:
                    sock.send(data, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self._check_alive(starting=False)
                    sock.poll(POLL_MS, zmq.POLLOUT)

    def _expect_step(self) -> ModelRunnerOutput:
        """Rank 0's answer to the next step; a worker silent past the step timeout (hung, stopped)
        is a failure like a dead one."""
        return self._expect(StepResult, self.config.parallel.worker_step_timeout_s).output

    def _expect(self, kind: type[_Reply], timeout_s: float | None = None) -> _Reply:
        msg = self._recv(None if timeout_s is None else time.monotonic() + timeout_s, starting=False)
        if msg is None:
            self._die(f"no answer to a step within {timeout_s:g}s (worker_step_timeout_s)", False)
        if not isinstance(msg, kind):
            self._die(f"protocol error: expected {kind.__name__} from the workers, got {msg!r}", False)
        return msg

    def _recv(self, deadline: float | None, starting: bool) -> object | None:
        """Next reply (None once ``deadline`` passes); raises if a worker reports a failure or dies."""
        sock = self.channel.replies
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
            self._fail([msg], starting)
        return msg

    def _check_alive(self, starting: bool) -> None:
        if self._handles is not None and self._handles.exits(starting):
            self._fail([], starting)

    def _fail(self, failed: list[Failed], starting: bool) -> NoReturn:
        """Stop, and raise what the ranks reported: a setting error that every rank raised alike (a
        KV budget under one block) as itself, anything else (one rank's failure names the rank) as
        the workers' failure."""
        unreported = self._other_failures(failed, starting)
        why = self._failure_report(failed, unreported, starting)
        kinds = {(f.error_type, f.message) for f in failed}
        if len({f.rank for f in failed}) == self.world_size and len(kinds) == 1:
            kind, message = kinds.pop()
            if kind in SETTING_ERRORS:
                logger.debug("workers failed:\n%s", why)
                self._die(why, starting, SETTING_ERRORS[kind](message))
        self._die(why, starting)

    def _other_failures(self, failed: list[Failed], starting: bool) -> list[WorkerExit]:
        """Wait briefly for the other ranks' reports, added to ``failed``; the ranks that are gone
        without one."""
        deadline = time.monotonic() + FAILURE_GRACE_S
        sock = self.channel.replies
        while time.monotonic() < deadline:
            if sock.poll(POLL_MS):
                msg = self._decoder.decode(sock.recv())
                if isinstance(msg, Failed):
                    failed.append(msg)
            elif self._handles is None or self._handles.all_gone():
                break
        reported = {f.rank for f in failed}
        gone = self._handles.exits(starting) if self._handles is not None else []
        return [e for e in gone if e.rank not in reported]

    def _failure_report(self, failed: list[Failed], exits: list[WorkerExit], starting: bool) -> str:
        """Every rank that failed or died."""
        lines = [e.line for e in exits if e.died]
        lines += [e.line + (self.startup_hint if starting else "") for e in exits if not e.died]
        for f in sorted(failed, key=lambda f: f.rank):
            last = f.error.strip().splitlines()[-1] if f.error.strip() else "?"
            lines.append(f"worker rank {f.rank} raised {last}\n{f.error}")
        return "\n".join(lines) or "a worker failed"

    def _die(self, why: str, starting: bool, error: Exception | None = None) -> NoReturn:
        """Stop the workers, then raise ``error``, or the failure ``why`` describes."""
        self._dead = f"the engine is dead: {why}"
        self.shutdown()
        if error is not None:
            raise error
        if starting:
            raise WorkerStartupError(f"tensor-parallel workers failed to start: {why}")
        raise EngineDeadError(self._dead)
