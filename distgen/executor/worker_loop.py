"""The body of one ``mp`` worker process: build the rank's Worker, then serve the executor's messages.

The process is started with the "spawn" context, so everything it gets (config, model source,
socket paths) is pickled. It exits when told to shut down, when a call raises (after sending the
traceback), or when its parent process is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq

from distgen.config import EngineConfig
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
    WorkerRequest,
)
from distgen.model_loader.loader import ModelSource

if TYPE_CHECKING:
    from distgen.workers.worker import Worker

PARENT_CHECK_S = 0.5  # how often a worker checks that its parent is still alive


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    config: EngineConfig
    source: ModelSource
    init_method: str  # torch.distributed rendezvous, tcp://127.0.0.1:PORT
    ipc_dir: str  # holds the executor's sockets: req-RANK (pulled from) and reply (pushed to)
    parent_pid: int


def run_worker(args: WorkerArgs) -> None:
    """Process entry point (the target of ``multiprocessing.Process``)."""
    # Ctrl-C reaches the whole process group: the executor shuts the workers down, they don't die alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(args,), name="orphan-watch", daemon=True).start()
    import torch

    tp = args.config.parallel.tensor_parallel_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    ctx = zmq.Context()
    requests = ctx.socket(zmq.PULL)
    requests.connect(f"ipc://{args.ipc_dir}/req-{args.rank}")
    replies = ctx.socket(zmq.PUSH)
    replies.connect(f"ipc://{args.ipc_dir}/reply")
    encoder = msgspec.msgpack.Encoder()
    worker = None
    try:
        from distgen.workers.worker import Worker

        worker = Worker(args.config, args.source, rank=args.rank, init_method=args.init_method)
        replies.send(encoder.encode(Ready(args.rank, os.getpid())))
        _serve(args, worker, requests, replies, encoder)
    except BaseException:
        try:
            replies.send(encoder.encode(Failed(args.rank, traceback.format_exc())), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # nobody listens any more
        raise SystemExit(1) from None
    finally:
        if worker is not None:
            worker.shutdown()
        else:
            from distgen.distributed import parallel_state as ps

            ps.destroy_tp_group()
        requests.close(linger=0)
        replies.close(linger=1000)  # let a last Failed message leave
        ctx.term()


def _exit_when_orphaned(args: WorkerArgs) -> None:
    """Watchdog thread: if the executor's process dies without shutting us down, exit at once, even
    while the main thread is loading the model or blocked in a collective."""
    while os.getppid() == args.parent_pid:
        time.sleep(PARENT_CHECK_S)
    if args.rank == 0:
        shutil.rmtree(args.ipc_dir, ignore_errors=True)
    os._exit(1)


def _serve(
    args: WorkerArgs,
    worker: Worker,
    requests: zmq.Socket,
    replies: zmq.Socket,
    encoder: msgspec.msgpack.Encoder,
) -> None:
    decoder = msgspec.msgpack.Decoder(WorkerRequest)
    rank = args.rank
    while True:
        msg = decoder.decode(requests.recv())
        if isinstance(msg, ExecuteModel):
            out = worker.execute_model(msg.sched)
            if rank == 0:
                assert out is not None
                replies.send(encoder.encode(StepResult(out)))
        elif isinstance(msg, DetermineNumBlocks):
            replies.send(encoder.encode(NumBlocks(rank, worker.determine_num_blocks())))
        elif isinstance(msg, InitKVCache):
            worker.init_kv_cache(msg.num_blocks)
            replies.send(encoder.encode(Ack(rank)))
        elif isinstance(msg, Shutdown):
            return
