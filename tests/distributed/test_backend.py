"""The TP group's collectives through a real process group of one rank: gloo on the CPU, and NCCL on a
CUDA machine (tp=1 with NCCL, as a one-GPU machine allows), including an all-reduce captured in a
CUDA graph as the decode graphs do under tensor parallelism."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distgen.distributed import parallel_state as ps
from distgen.executor.ports import free_port


def test_default_backend_is_nccl_on_cuda():
    assert ps.default_backend("cuda") == "nccl"
    assert ps.default_backend("cuda:1") == "nccl"
    assert ps.default_backend("cpu") == "gloo"


def test_no_group_without_init_method():
    ps.init_parallel_groups(0, 1, 1, "", "gloo")
    try:
        assert not dist.is_initialized()
        x = torch.ones(3)
        assert ps.all_reduce(x) is x and ps.gather(x) is x
    finally:
        ps.destroy_parallel_groups()


NCCL_OK = torch.cuda.is_available() and dist.is_nccl_available()


@pytest.mark.parametrize(
    "backend",
    ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(not NCCL_OK, reason="needs CUDA and NCCL"))],
)
def test_collectives_in_a_group_of_one(backend):
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)
    ps.init_parallel_groups(0, 1, 1, f"tcp://127.0.0.1:{free_port()}", backend)
    try:
        assert dist.is_initialized() and dist.get_backend() == backend
        assert (ps.tp_rank(), ps.tp_size()) == (0, 1)
        x = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
        assert torch.equal(ps.all_reduce(x.clone()), x)
        assert torch.equal(ps.gather(x, dim=-1), x)
        if device == "cuda":
            buf = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ps.all_reduce(buf.mul_(2))
            buf.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(buf, 2 * x)
    finally:
        ps.destroy_parallel_groups()
    assert not dist.is_initialized()
