"""Linear layers that shard themselves across the tensor-parallel group at construction.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies the rank's
slice of a checkpoint tensor into it. Column-parallel layers split the output features, row-parallel
layers split the input features and all-reduce their output.

On the CPU the model runner packs every weight once after loading (:class:`PackedMatmul`, which
the LM head shares; :mod:`distgen.kernels.cpu_gemm`): the plain weight is then released, and
``forward`` multiplies by the packed copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgen.distributed import parallel_state as ps
from distgen.kernels.cpu_gemm import PackedWeight
from distgen.kernels.dispatch import cpu_kernels
from distgen.layers.weights import LoadedWeight, copy_into, narrow, shape_of


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by the tensor-parallel size ({b})")
    return a // b


class PackedMatmul:
    """A weight [out, in] that the CPU path packs once for its GEMM (:mod:`distgen.kernels.cpu_gemm`)
    and multiplies in that layout; elsewhere ``F.linear`` on the plain weight."""

    weight: nn.Parameter
    packed: PackedWeight | None  # the weight in the CPU GEMM's layout, once packed

    def weight_is_shared(self) -> bool:
        """Whether another module reads the plain weight too (then packing keeps it)."""
        return False

    def pack_weights(self) -> None:
        """Pack the loaded weight and release the plain one (a no-op where it cannot be packed)."""
        packed = cpu_kernels().pack_linear(self.weight)
        if packed is not None:
            self.packed = packed
            if not self.weight_is_shared():
                self.weight.data = self.weight.data.new_empty(0)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            return cpu_kernels().packed_linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)


class LinearBase(PackedMatmul, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed = None

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        copy_into(param.data, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays sharded (no communication)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        self.out_per_rank = _divide(out_features, self.tp_size, "output features")
        super().__init__(in_features, self.out_per_rank, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        n = param.shape[0]
        copy_into(param.data, narrow(loaded, 0, self.tp_rank * n, n), type(self).__name__)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one (gate and up projections)."""

    def __init__(
        self, in_features: int, out_sizes: list[int], bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        size = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        part = narrow(loaded, 0, self.tp_rank * size, size)
        copy_into(param.data.narrow(0, offset, size), part, f"{type(self).__name__}[{shard_id}]")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection with heads split by rank.

    When the TP size exceeds the number of KV heads (and is a multiple of it), each KV head is
    replicated on ``tp_size // num_kv_heads`` consecutive ranks.
    """

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        tp = ps.tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "attention heads")
        if tp >= num_kv_heads:
            _divide(tp, num_kv_heads, "tensor-parallel size vs KV heads")
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = _divide(num_kv_heads, tp, "KV heads"), 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden, total, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be q, k or v, got {shard_id!r}")
        if shape_of(loaded)[0] < (rank + 1) * size:
            raise ValueError(
                f"{shard_id}_proj has {shape_of(loaded)[0]} rows, too few for rank {self.tp_rank}"
            )
        copy_into(
            param.data.narrow(0, offset, size),
            narrow(loaded, 0, rank * size, size),
            f"QKVParallelLinear[{shard_id}]",
        )

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce.

    The bias is added once, after the reduction.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        super().__init__(_divide(in_features, self.tp_size, "input features"), out_features, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            copy_into(param.data, loaded, "RowParallelLinear.bias")
            return
        n = param.shape[1]
        copy_into(param.data, narrow(loaded, 1, self.tp_rank * n, n), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        if self.tp_size > 1:
            ps.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
