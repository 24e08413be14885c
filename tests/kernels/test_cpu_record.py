"""Recorded CPU forwards: a replay computes what a fresh run on the buffers' new contents computes, and
a run that a replay could not repeat is marked as such."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from distgen.kernels import cpu_build, cpu_ops, cpu_record
from distgen.kernels.cpu_gemm import pack

pytestmark = pytest.mark.skipif(cpu_build.try_load() is None, reason="no C++ compiler to build the kernels")


class Block:
    """A small chain over a fixed input buffer: an embedding lookup (torch), RMSNorm and a packed GEMM
    (kernels), then a bias add (torch)."""

    def __init__(self, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        self.table = torch.randn(50, 64).to(dtype)
        self.norm_w = torch.randn(64).to(dtype)
        self.w = pack(torch.randn(96, 64).to(dtype)).data
        self.bias = torch.randn(96).to(dtype)
        self.ids = torch.zeros(3, dtype=torch.long)

    def __call__(self) -> torch.Tensor:
        x = torch.nn.functional.embedding(self.ids, self.table)
        h = cpu_ops.rms_norm(x, self.norm_w, 1e-5)
        y = x.new_empty(3, 96)
        cpu_ops.linear(y, h, self.w, None)
        return y + self.bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inference", [True, False])
def test_replay_computes_what_a_fresh_run_does(dtype, inference):
    f = Block(dtype)
    with torch.inference_mode(inference):
        f.ids.copy_(torch.tensor([1, 2, 3]))
        first, rec = cpu_record.record(f)
        assert rec.refused is None
        kinds = [fn for fn, _ in rec.steps]
        assert kinds.count(cpu_record._rerun_into) == 2  # the embedding and the bias add
        assert len(kinds) == 4  # and the two kernel calls
        first = first.clone()
    for ids in ([7, 0, 41], [1, 2, 3], [49, 49, 5]):
        f.ids.copy_(torch.tensor(ids))
        got = rec.replay()
        with torch.inference_mode(inference):
            want = f()
        assert got is rec.result
        assert torch.equal(got, want)
        assert torch.equal(got, first) == (ids == [1, 2, 3])
        # Memory freed and taken again after the recording must not be what its calls point at.
        junk = [torch.full((3, 96), 7.0, dtype=dtype) for _ in range(20)]
        del junk


def test_in_place_ops_rerun_on_the_recorded_tensor():
    x, acc = torch.ones(4), torch.zeros(4)

    def f():
        acc.add_(x)
        return acc

    _, rec = cpu_record.record(f)
    assert rec.refused is None
    x.fill_(2.0)
    assert rec.replay().tolist() == [3.0] * 4


@pytest.mark.parametrize(
    "body, op",
    [
        (lambda x: x[0].item(), "_local_scalar_dense"),
        (lambda x: x.nonzero(), "nonzero"),
        (lambda x: torch.rand(3), "rand"),
        (lambda x: x + torch.tensor([1.0, 2.0, 3.0]), "lift_fresh"),
    ],
)
def test_what_a_replay_cannot_repeat_is_refused(body, op):
    x = torch.tensor([1.0, 0.0, 2.0])
    result, rec = cpu_record.record(lambda: body(x))
    assert rec.refused is not None and op in rec.refused
    assert result is not None  # the run itself still happened
    with pytest.raises(AssertionError, match="cannot be replayed"):
        rec.replay()


def test_call_recorded_is_replayed_as_the_same_call():
    seen = []
    buf = torch.zeros(2)

    def collective(t: torch.Tensor, scale: float) -> None:
        seen.append(scale)
        t.mul_(scale).add_(1.0)  # its own torch ops are not recorded, only the call

    cpu_record.call_recorded(collective, buf, scale=1.0)  # outside a recording: just the call
    assert seen == [1.0]

    def f():
        cpu_record.call_recorded(collective, buf, scale=3.0)
        return buf

    _, rec = cpu_record.record(f)
    assert rec.refused is None and len(rec.steps) == 1 and seen == [1.0, 3.0]
    buf.fill_(1.0)
    assert rec.replay().tolist() == [4.0, 4.0] and seen == [1.0, 3.0, 3.0]


def test_recordings_do_not_nest_and_end_cleanly():
    def inner():
        cpu_record.record(lambda: None)

    with pytest.raises(AssertionError, match="do not nest"):
        cpu_record.record(inner)
    assert getattr(cpu_ops._recording, "calls", None) is None
    assert getattr(cpu_record._active, "recorder", None) is None
    _, rec = cpu_record.record(lambda: torch.ones(2) * 2)  # a recording after a failed one works
    assert rec.refused is None


def test_recording_does_not_import_dynamo():
    # Importing torch._dynamo takes seconds: a recording made inside a step must not pull it in.
    code = (
        "import sys, torch\n"
        "from distgen.kernels import cpu_record\n"
        "_, rec = cpu_record.record(lambda: torch.ones(3) + 1)\n"
        "assert rec.refused is None\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_recording_sees_only_its_own_thread():
    x, w = torch.randn(2, 64), torch.randn(64)
    inside, done = threading.Event(), threading.Event()

    def f():
        y = cpu_ops.rms_norm(x, w, 1e-5)
        inside.set()
        done.wait(timeout=30)
        return y

    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rec", cpu_record.record(f)[1]))
    t.start()
    assert inside.wait(timeout=30)
    cpu_ops.rms_norm(x, w, 1e-5) + 1  # another thread's kernel call and torch op, mid-recording
    cpu_record.call_recorded(lambda: None)
    done.set()
    t.join()
    assert [fn for fn, _ in result["rec"].steps] == [cpu_ops._functions()[("dg_rms_norm", torch.float32)]]
