"""The front end's handle on the engine core: in this process, or in its own over ZeroMQ.

- :class:`InprocClient` holds an :class:`EngineCore` and steps it when asked (debugging:
  ``DISTGEN_ENABLE_MULTIPROCESSING=0``).
- :class:`SyncMPClient` (``LLM``) and :class:`AsyncMPClient` (``AsyncLLM``, the server) start the
  engine core as ``python -m distgen.engine_core.main``: a fresh interpreter that never imports the
  user's ``__main__``, so scripts need no ``if __name__ == "__main__"`` guard. The front end binds
  two ipc sockets in a private temporary directory, hands their paths to the child, and waits for its
  :class:`EngineCoreReady` handshake (or its error) with a timeout.
- With ``data_parallel_size > 1``, :meth:`EngineCoreClient.make` returns a client over several of
  them (``frontend/dp_client.py``).

While waiting for outputs, the clients poll with a short timeout and check in between that the
engine-core process is alive: a dead core becomes :class:`EngineDeadError`, never a hang.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from distgen.config import EngineConfig
from distgen.engine_core.messages import (
    EngineCoreAbort,
    EngineCoreGetStats,
    EngineCoreMessage,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreShutdown,
    SchedulerStatsMsg,
)
from distgen.engine_core.proc import EngineCoreProcArgs
from distgen.envs import envs
from distgen.exceptions import (
    SETTING_ERRORS,
    EngineDeadError,
    EngineStartupError,
    WorkerStartupError,
    describe_exit,
)
from distgen.signals import held_signals

logger = logging.getLogger("distgen")

POLL_MS = 100  # how often a waiting client checks that the engine core is alive
SHUTDOWN_TIMEOUT_S = 10.0

# Startup errors the engine core reports by class name and the front end raises as themselves.
_RERAISABLE: dict[str, type[BaseException]] = {**SETTING_ERRORS, "WorkerStartupError": WorkerStartupError}


class EngineCoreClient(ABC):
    """What the front end needs from the engine core, wherever it runs."""

    ready: EngineCoreReady

    @property
    def max_model_len(self) -> int:
        return self.ready.max_model_len

    @property
    def num_blocks(self) -> int:
        return self.ready.num_blocks

    @abstractmethod
    def add_request(self, req: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    def get_stats(self) -> SchedulerStatsMsg:
        """The scheduler's stats now (synchronous clients). Step outputs arriving meanwhile are
        dropped: call it when no request of this front end is in flight."""
        self._send(EngineCoreGetStats())
        while True:
            out = self.get_output()
            if out.stats_reply:
                assert out.stats is not None
                return out.stats

    def _send(self, msg) -> None:
        raise NotImplementedError

    def get_output(self) -> EngineCoreOutputs:
        raise NotImplementedError

    @staticmethod
    def make(
        config: EngineConfig,
        asyncio_mode: bool = False,
        while_starting: Callable[[], None] | None = None,
    ) -> EngineCoreClient:
        """The client of a new engine core. ``while_starting`` is the caller's own start-up work (the
        tokenizer, ...): it runs while the engine core process boots and loads the model, and the core
        is stopped if it raises."""
        if config.parallel.data_parallel_size > 1:
            from distgen.frontend.dp_client import AsyncDPClient, SyncDPClient

            if asyncio_mode:
                return AsyncDPClient(config, while_starting)
            if not envs().enable_multiprocessing:
                raise ValueError(
                    "data_parallel_size > 1 runs each replica in an engine-core process of its own; "
                    "DISTGEN_ENABLE_MULTIPROCESSING=0 (the engine core in-process, for debugging) "
                    f"takes data_parallel_size=1, got {config.parallel.data_parallel_size}"
                )
            return SyncDPClient(config, while_starting)
        if asyncio_mode:
            return AsyncMPClient(config, while_starting)
        if envs().enable_multiprocessing:
            return SyncMPClient(config, while_starting)
        return InprocClient(config, while_starting)


class InprocClient(EngineCoreClient):
    def __init__(self, config: EngineConfig, while_starting: Callable[[], None] | None = None) -> None:
        from distgen.engine_core.core import EngineCore

        if while_starting is not None:
            while_starting()
        self.core = EngineCore(config)
        self.ready = EngineCoreReady(
            self.core.num_blocks,
            self.core.max_model_len,
            config.model.vocab_size,
            os.getpid(),
            self.core.worker_pids,
        )

    def add_request(self, req: EngineCoreRequest) -> None:
        self.core.add_request(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.core.step()

    def get_stats(self) -> SchedulerStatsMsg:
        self.core.step()  # hand out pending abort notices, as the process loop would
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()


@dataclass
class _CoreProcess:
    """The engine-core child and its sockets; a finalizer owns it, so a dropped client cleans up."""

    ipc_dir: str
    ctx: zmq.Context
    input: zmq.Socket  # PUSH: EngineCoreInput
    output: zmq.Socket  # PULL: EngineCoreMessage
    proc: subprocess.Popen | None = None
    # Past the handshake: it reads its input socket, or it reported a failure and is exiting.
    answered: bool = False

    @classmethod
    def start(cls, config: EngineConfig, env: dict[str, str] | None = None) -> _CoreProcess:
        """Spawn the engine core; ``env`` replaces the child's environment (default: this one's)."""
        ipc_dir = tempfile.mkdtemp(prefix="distgen-core-")
        ctx = zmq.Context()
        inp, out = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        # No high-water mark on the way in: past ZeroMQ's default 1000 queued messages a send blocks
        # until the core reads (between steps), and one request with a large n sends that many.
        inp.setsockopt(zmq.SNDHWM, 0)
        inp.bind(f"ipc://{ipc_dir}/input")
        out.bind(f"ipc://{ipc_dir}/output")
        res = cls(ipc_dir, ctx, inp, out)
        args = EngineCoreProcArgs(
            config,
            f"ipc://{ipc_dir}/input",
            f"ipc://{ipc_dir}/output",
            os.getpid(),
            logging.getLogger("distgen").getEffectiveLevel(),
            ipc_dir,
        )
        try:
            cmd = [sys.executable, "-m", "distgen.engine_core.main"]
            with held_signals():  # a stop now would leave the core reading half its arguments
                res.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env)
                assert res.proc.stdin is not None
                res.proc.stdin.write(pickle.dumps(args))
                res.proc.stdin.close()
        except BaseException:
            res.close()
            raise
        return res

    def exit_description(self) -> str | None:
        """None while the process runs; how it ended otherwise."""
        code = None if self.proc is None else self.proc.poll()
        return None if code is None else describe_exit(code)

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                self.input.send(msgspec.msgpack.encode(EngineCoreShutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            try:
                # A core still loading reads no input: waiting for it to read Shutdown is pointless.
                proc.wait(SHUTDOWN_TIMEOUT_S if self.answered else 0)
            except subprocess.TimeoutExpired:
                proc.terminate()  # SIGTERM: the core still stops its workers
                try:
                    proc.wait(SHUTDOWN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class _MPClientBase(EngineCoreClient):
    def __init__(
        self,
        config: EngineConfig,
        while_starting: Callable[[], None] | None = None,
        proc: _CoreProcess | None = None,
    ) -> None:
        """``proc``: an engine core already started (data parallelism starts its replicas together and
        then waits for each); this client owns it from here on."""
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineCoreMessage)
        self._dead: str | None = None
        t0 = time.monotonic()
        self._proc = proc if proc is not None else _CoreProcess.start(config)
        self._finalizer = weakref.finalize(self, self._proc.close)
        try:
            if while_starting is not None:
                while_starting()
            self.ready = self._handshake(t0 + envs().engine_ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        logger.info("engine core (pid %d) ready in %.1fs", self.ready.pid, time.monotonic() - t0)

    @property
    def ipc_dir(self) -> str:
        return self._proc.ipc_dir

    @property
    def pid(self) -> int:
        return self.ready.pid

    def _handshake(self, deadline: float) -> EngineCoreReady:
        sock = self._proc.output
        while not sock.poll(POLL_MS):
            how = self._proc.exit_description()
            if how is not None:
                raise EngineStartupError(
                    f"the engine core process ended before it was ready ({how}); see its log above"
                )
            if time.monotonic() > deadline:
                raise EngineStartupError(
                    f"the engine core was not ready within {envs().engine_ready_timeout_s:.0f}s "
                    "(DISTGEN_ENGINE_READY_TIMEOUT_S)"
                )
        msg = self._decoder.decode(sock.recv())
        # A core that failed to start exits by itself: a SIGTERM would land in its interpreter's exit.
        self._proc.answered = True
        if isinstance(msg, EngineCoreOutputs) and msg.error is not None:
            cls = _RERAISABLE.get(msg.error_type or "")
            if cls is not None:
                raise cls(msg.error.split(": ", 1)[-1])
            raise EngineStartupError(f"the engine core failed to start: {msg.error}")
        if not isinstance(msg, EngineCoreReady):
            raise EngineStartupError(f"protocol error: expected the ready handshake, got {msg!r}")
        return msg

    # -- input ------------------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        self._send(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self._dead is None:
            self._send(EngineCoreAbort(request_ids))

    def _send(self, msg) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self._proc.input.send(self._encoder.encode(msg))

    # -- output -----------------------------------------------------------------------------------
    def _decode_output(self, data: bytes) -> EngineCoreOutputs:
        msg = self._decoder.decode(data)
        if not isinstance(msg, EngineCoreOutputs):
            self._die(f"protocol error: expected step outputs, got {msg!r}")
        if msg.error is not None:
            self._die(f"the engine core failed: {msg.error}")
        return msg

    def _check_alive(self) -> None:
        how = self._proc.exit_description()
        if how is not None:
            self._die(f"the engine core process (pid {self.ready.pid}) died: {how}")

    def _die(self, why: str):
        self._dead = f"the engine is dead: {why}"
        self.shutdown()
        raise EngineDeadError(self._dead)

    @property
    def errored(self) -> bool:
        return self._dead is not None or self._proc.exit_description() is not None

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the engine was shut down"
        self._finalizer()


class SyncMPClient(_MPClientBase):
    def get_output(self) -> EngineCoreOutputs:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        sock = self._proc.output
        while not sock.poll(POLL_MS):
            self._check_alive()
        return self._decode_output(sock.recv())


class AsyncMPClient(_MPClientBase):
    def __init__(
        self,
        config: EngineConfig,
        while_starting: Callable[[], None] | None = None,
        proc: _CoreProcess | None = None,
    ) -> None:
        super().__init__(config, while_starting, proc)
        # The same socket, awaited on the event loop (inputs stay synchronous: a PUSH send queues).
        self._output = zmq.asyncio.Socket.from_socket(self._proc.output)

    async def get_output_async(self) -> EngineCoreOutputs:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        while not await self._output.poll(POLL_MS):
            self._check_alive()
        return self._decode_output(await self._output.recv())
