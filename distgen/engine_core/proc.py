"""The engine-core process: an :class:`EngineCore` behind two ZeroMQ sockets.

The front end binds both sockets (addresses chosen at start) and spawns this process, which connects,
builds the engine core (executor, workers, KV cache), answers with :class:`EngineCoreReady`, then
loops: take every pending input (add / abort / shutdown), run one step when there is work, push its
:class:`EngineCoreOutputs`. Steps run back to back while requests are in flight; the front end
detokenizes step k while the core computes step k+1.

If anything raises, the core pushes an ``EngineCoreOutputs`` with ``error`` set (the front end fails
every request with :class:`EngineDeadError`) and exits. It also exits when its parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from dataclasses import dataclass

import msgspec
import zmq

from distgen.config import EngineConfig
from distgen.engine_core.messages import (
    EngineCoreAbort,
    EngineCoreGetStats,
    EngineCoreInput,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreShutdown,
)
from distgen.exceptions import SETTING_ERRORS
from distgen.orphan_watch import start_orphan_watch

logger = logging.getLogger("distgen")

IDLE_POLL_MS = 1000  # how long an idle core blocks on its input socket before looking again


@dataclass(frozen=True)
class EngineCoreProcArgs:
    config: EngineConfig
    input_addr: str  # the core PULLs EngineCoreInput from here
    output_addr: str  # and PUSHes EngineCoreReady / EngineCoreOutputs here
    parent_pid: int
    log_level: int = logging.INFO
    ipc_dir: str | None = None  # the front end's socket directory, removed here if the front end died


def run_engine_core(args: EngineCoreProcArgs) -> None:
    """The engine-core process's work, run by ``engine_core.main`` (which already ignores Ctrl-C: it reaches
    the whole process group, and the front end decides how to shut the core down)."""
    # SIGTERM unwinds through the ``finally`` below, so the executor stops its workers.
    signal.signal(signal.SIGTERM, lambda *_: _raise_exit())
    _configure_logging(args.log_level)
    # Orphaned: remove the front end's socket directory, then SIGTERM ourselves (a graceful unwind).
    start_orphan_watch(args.parent_pid, args.ipc_dir, lambda: os.kill(os.getpid(), signal.SIGTERM))

    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)  # requests queue here, unbounded (see core_client)
    inp.connect(args.input_addr)
    out = ctx.socket(zmq.PUSH)
    out.connect(args.output_addr)
    encoder = msgspec.msgpack.Encoder()
    core = None
    try:
        from distgen.engine_core.core import EngineCore

        core = EngineCore(args.config)
        ready = EngineCoreReady(
            core.num_blocks, core.max_model_len, args.config.model.vocab_size, os.getpid(), core.worker_pids
        )
        out.send(encoder.encode(ready))
        _busy_loop(core, inp, out, encoder)
    except SystemExit:
        pass
    except BaseException as e:  # report, then exit: the front end turns it into EngineDeadError
        # A setting the model cannot take (a KV budget under one block): the front end raises it with
        # its message, and the stack is only for debugging. Anything else is a bug, logged in full.
        setting = core is None and type(e).__name__ in SETTING_ERRORS
        logger.log(
            logging.DEBUG if setting else logging.ERROR, "engine core failed:\n%s", traceback.format_exc()
        )
        error = f"{type(e).__name__}: {e}"
        try:
            out.send(encoder.encode(EngineCoreOutputs(error=error, error_type=type(e).__name__)))
        except zmq.ZMQError:
            pass
    finally:
        if core is not None:
            core.shutdown()
        inp.close(linger=0)
        out.close(linger=1000)  # let the last message (an error) leave
        ctx.term()
        # Nothing left to unwind: a SIGTERM from here on ends the process rather than raising
        # SystemExit inside the interpreter's exit handlers (a traceback on the terminal).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _busy_loop(core, inp: zmq.Socket, out: zmq.Socket, encoder: msgspec.msgpack.Encoder) -> None:
    decoder = msgspec.msgpack.Decoder(EngineCoreInput)
    while True:
        # Block only when idle; otherwise take what has arrived and step.
        timeout = 0 if core.has_work() else IDLE_POLL_MS
        while inp.poll(timeout):
            msg = _decode(decoder, inp.recv(), core)
            if isinstance(msg, EngineCoreRequest):
                _add(core, msg)
            elif isinstance(msg, EngineCoreAbort):
                core.abort_requests(msg.request_ids)
            elif isinstance(msg, EngineCoreGetStats):
                out.send(encoder.encode(EngineCoreOutputs(stats=core.stats(), stats_reply=True)))
            elif isinstance(msg, EngineCoreShutdown):
                return
            timeout = 0
        if core.has_work():
            out.send(encoder.encode(core.step()))


def _decode(decoder: msgspec.msgpack.Decoder, raw: bytes, core):
    """One input message; one that does not decode (which the front end's own checks should make
    impossible) ends only its own request, if it names one, instead of the engine."""
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as e:  # ValidationError included
        try:
            fields = msgspec.msgpack.decode(raw)
        except msgspec.DecodeError:
            fields = None
        if isinstance(fields, list) and len(fields) > 1 and fields[0] == "add" and isinstance(fields[1], str):
            logger.error("request %s rejected by the engine core: it did not decode (%s)", fields[1], e)
            core.reject_request(fields[1])
        else:
            logger.error("an input message did not decode and was dropped: %s", e)
        return None


def _add(core, req: EngineCoreRequest) -> None:
    """The front end validated the prompt already; a request that still fails is ended, not fatal."""
    try:
        core.add_request(req)
    except ValueError as e:
        logger.warning("request %s rejected by the engine core: %s", req.request_id, e)
        core.reject_request(req.request_id)


def _raise_exit() -> None:
    raise SystemExit(0)


def _configure_logging(level: int) -> None:
    log = logging.getLogger("distgen")
    log.setLevel(level)
    if not log.handlers or all(isinstance(h, logging.NullHandler) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [engine-core] %(message)s"))
        log.addHandler(handler)
