"""Linear layers that shard themselves across the tensor-parallel group at construction.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies the rank's
slice of a checkpoint tensor into it. Column-parallel layers split the output features, row-parallel
layers split the input features and all-reduce their output.

On the CPU the model runner packs every weight once after loading (:class:`PackedMatmul`, which
the LM head shares; :mod:`distgen.kernels.cpu_gemm`): the plain weight is then released, and
``forward`` multiplies by the packed copy.

A checkpoint weight that arrives quantized (a :class:`~distgen.kernels.quant.QuantizedWeight`: GGUF
Q8_0/Q4_0/Q4_1, safetensors int8) stays quantized: the layer keeps it, releases its float weight and
multiplies with the dequantize-in-GEMM kernels (:func:`~distgen.kernels.quant.quant_linear`). Column
shards cut output rows; row shards cut input columns only between quantization blocks. A fused layer
whose parts arrive in different formats (or some float) runs in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distgen.distributed import parallel_state as ps
from distgen.kernels.cpu_gemm import PackedWeight
from distgen.kernels.dispatch import cpu_kernels
from distgen.kernels.quant import QuantizedWeight, dequantize, int8_activations_default, quant_linear
from distgen.layers.weights import LoadedWeight, copy_into, narrow, shape_of


@dataclass(frozen=True)
class HeadShard:
    """One tensor-parallel rank's attention heads: query heads ``q_start ..`` (``num_heads`` of them,
    split as evenly as the ranks allow) and the KV heads they read, ``kv_start ..``. Local query head j
    reads local KV head ``(j + head_offset) // group``. Where a rank's query heads start or end inside a
    KV group, that KV head is held by both ranks it straddles (as vLLM replicates KV heads when the TP
    size exceeds their number)."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int
    group: int
    head_offset: int

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
        if tp_size > num_heads:
            raise ValueError(
                f"tensor_parallel_size={tp_size} exceeds the model's {num_heads} attention heads: "
                "every rank needs at least one"
            )
        group = num_heads // num_kv_heads
        q_start, n = ps.split_range(num_heads, tp_size, tp_rank)
        kv_start, kv_end = q_start // group, (q_start + n - 1) // group + 1
        offset = q_start - kv_start * group
        if kv_end - kv_start == 1:  # all of them share one KV head: a plain group of n
            group, offset = n, 0
        return cls(q_start, n, kv_start, kv_end - kv_start, group, offset)


class PackedMatmul:
    """A weight [out, in] that the CPU path packs once for its GEMM (:mod:`distgen.kernels.cpu_gemm`)
    and multiplies in that layout; elsewhere ``F.linear`` on the plain weight."""

    weight: nn.Parameter
    packed: PackedWeight | None  # the weight in the CPU GEMM's layout, once packed
    quant: QuantizedWeight | None = None  # the weight kept quantized (then ``weight`` is empty)
    quant_int8: bool = False  # multiply ``quant`` with int8 activations (kernels/quant.py)

    def weight_is_shared(self) -> bool:
        """Whether another module reads the plain weight too (then packing keeps it)."""
        return False

    def pack_weights(self) -> None:
        """Pack the loaded weight and release the plain one (a no-op where it cannot be packed)."""
        if self.quant is not None:  # the quantized kernels read the weight as it is stored
            return
        packed = cpu_kernels().pack_linear(self.weight)
        if packed is not None:
            self.packed = packed
            if not self.weight_is_shared():
                self.weight.data = self.weight.data.new_empty(0)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return quant_linear(x, self.quant, bias, self.quant_int8)
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
        self.quant = None
        self.weight_shape = (out_features, in_features)  # ``weight`` is emptied when kept quantized
        self._float_loaded = False

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if param is self.weight:
            self.load_rows(0, loaded, type(self).__name__)
        else:
            copy_into(param.data, loaded, type(self).__name__)

    def load_rows(self, offset: int, part: LoadedWeight, what: str) -> None:
        """Load ``part`` (float, lazy or quantized) into the weight's rows ``offset ..``."""
        rows = shape_of(part)[0]
        if isinstance(part, QuantizedWeight):
            if self.quant is None and not self._float_loaded:
                self._start_quantized(part.fmt, part.in_features)
            if self.quant is not None and self.quant.fmt == part.fmt:
                self.quant.copy_rows_(offset, part, what)
                return
            self._to_float()  # parts in different formats
            part = dequantize(part)
        elif self.quant is not None:
            self._to_float()  # a float part after quantized ones
        self._float_loaded = True
        copy_into(self.weight.data.narrow(0, offset, rows), part, what)

    def _start_quantized(self, fmt: str, in_features: int) -> None:
        n, k = self.weight_shape
        if in_features != k:
            raise ValueError(f"{type(self).__name__}: a quantized part of width {in_features} for {k} inputs")
        self.quant = QuantizedWeight.empty(fmt, n, k, self.weight.device)
        self.quant_int8 = int8_activations_default(self.weight.device)
        for name, t in zip(("qweight_codes", "qweight_scales", "qweight_mins"), self.quant.tensors()):
            self.register_buffer(name, t, persistent=False)
        self.weight.data = self.weight.data.new_empty(0)

    def _to_float(self) -> None:
        if self.quant is None:
            return
        w = dequantize(self.quant)
        self.weight.data = w.to(device=self.weight.device, dtype=self.weight.dtype)
        for name in ("qweight_codes", "qweight_scales", "qweight_mins"):
            self._buffers.pop(name, None)
        self.quant = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks (as evenly as they divide); the output stays sharded (no
    communication)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        self.out_start, self.out_per_rank = ps.split_range(out_features, self.tp_size, self.tp_rank)
        super().__init__(in_features, self.out_per_rank, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        part = narrow(loaded, 0, self.out_start, self.out_per_rank)
        if param is self.weight:
            self.load_rows(0, part, type(self).__name__)
        else:
            copy_into(param.data, part, type(self).__name__)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one (gate and up projections): each is split on its
    own, so a rank holds its part of every one."""

    def __init__(
        self, in_features: int, out_sizes: list[int], bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        self.out_sizes = out_sizes
        self.parts = [ps.split_range(n, self.tp_size, self.tp_rank) for n in out_sizes]
        self.out_per_rank = sum(n for _, n in self.parts)
        LinearBase.__init__(self, in_features, self.out_per_rank, bias, dtype)
        # Set by an MLP that applies SiLU-and-mul to this output: the CPU path then packs the gate and
        # up halves for the GEMM that applies it in its epilogue (see :meth:`silu_and_mul`).
        self.feeds_silu_and_mul = False

    def pack_weights(self) -> None:
        fusable = len(self.parts) == 2 and self.parts[0][1] == self.parts[1][1] and self.bias is None
        if not (self.feeds_silu_and_mul and fusable and self.quant is None):
            return super().pack_weights()
        packed = cpu_kernels().pack_gate_up(self.weight)
        if packed is not None:
            self.packed = packed
            self.weight.data = self.weight.data.new_empty(0)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this projection of x in one GEMM where its weight is packed for it;
        None otherwise (the caller then applies its activation to ``self(x)``)."""
        if self.packed is None or not self.packed.gate_up:
            return None
        return cpu_kernels().packed_linear_silu(x, self.packed)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        start, size = self.parts[shard_id]
        offset = sum(n for _, n in self.parts[:shard_id])
        part = narrow(loaded, 0, start, size)
        what = f"{type(self).__name__}[{shard_id}]"
        if param is self.weight:
            self.load_rows(offset, part, what)
        else:
            copy_into(param.data.narrow(0, offset, size), part, what)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection with the heads split by rank (:class:`HeadShard`): any TP size up to
    the number of query heads. A KV head is held by every rank whose query heads read it."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        self.shard = HeadShard.of(num_heads, num_kv_heads, self.tp_size, self.tp_rank)
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = self.shard.num_heads, self.shard.num_kv_heads
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.out_per_rank = self.q_size + 2 * self.kv_size
        LinearBase.__init__(self, hidden, self.out_per_rank, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.shard.q_start * self.head_dim
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, start = self.kv_size, self.shard.kv_start * self.head_dim
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be q, k or v, got {shard_id!r}")
        if shape_of(loaded)[0] < start + size:
            raise ValueError(
                f"{shard_id}_proj has {shape_of(loaded)[0]} rows, too few for rank {self.tp_rank}"
            )
        part, what = narrow(loaded, 0, start, size), f"QKVParallelLinear[{shard_id}]"
        if param is self.weight:
            self.load_rows(offset, part, what)
        else:
            copy_into(param.data.narrow(0, offset, size), part, what)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce.

    The bias is added once, after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        unit: int = 1,
    ) -> None:
        """The input features are split in whole units of ``unit`` (a head's ``head_dim`` for an
        attention output projection, so that each rank takes the features of its own heads)."""
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        if in_features % unit:
            raise ValueError(f"{in_features} input features are not whole units of {unit}")
        start, n = ps.split_range(in_features // unit, self.tp_size, self.tp_rank)
        self.in_start, self.in_per_rank = start * unit, n * unit
        super().__init__(n * unit, out_features, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if param is not self.weight:  # bias: replicated
            copy_into(param.data, loaded, "RowParallelLinear.bias")
            return
        self.load_rows(0, narrow(loaded, 1, self.in_start, self.in_per_rank), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        if self.tp_size > 1:
            ps.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
