"""Mixture-of-experts MLP: a replicated router and experts sharded across the tensor-parallel ranks.

Each rank holds a slice of every expert's intermediate dimension (as vLLM does by default): the
stacked gate/up weight ``w13 [E, 2 * I_rank, H]`` (gate rows, then up rows) is column-sharded and the
down weight ``w2 [E, H, I_rank]`` row-sharded, with ``I`` split as evenly as the ranks allow
(:func:`~distgen.distributed.parallel_state.split_range`). Every rank routes all tokens (the router is
small and replicated), computes its partial sums for the experts the tokens chose, and the partials are
all-reduced once per layer, as :class:`~distgen.layers.linear.RowParallelLinear` does.

The expert computation groups the (token, choice) pairs by expert: the Triton grouped GEMM on CUDA
(:mod:`distgen.kernels.fused_moe`), its plain-torch reference elsewhere
(:func:`~distgen.kernels.reference.fused_moe_ref`); the choice goes through
:mod:`distgen.kernels.dispatch`.
"""

from __future__ import annotations

import torch
from torch import nn

from distgen.distributed import parallel_state as ps
from distgen.kernels.cpu_gemm import PackedWeight
from distgen.kernels.dispatch import cpu_kernels, triton_ops, use_triton
from distgen.kernels.reference import fused_moe_ref, moe_route_ref
from distgen.layers.activation import SiluAndMul
from distgen.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from distgen.layers.weights import LoadedWeight, copy_into, narrow, shape_of

GATE_UP_PARTS = ("gate", "up")


class FusedMoE(nn.Module):
    """The experts of one layer. ``forward(x, router_logits)`` routes each token to its ``top_k``
    experts (softmax in float32, the top ``top_k``, renormalised if ``renormalize``) and returns their
    weighted sum, all-reduced across the ranks unless ``reduce_results`` is False.

    ``weight_loader(param, w, (part, expert))`` takes one expert's checkpoint tensor (``part`` gate, up
    [I, H] or down [H, I]) or, with ``expert`` None, every expert's at once (``gate_up`` [E, 2 * I, H] or
    ``down`` [E, H, I], the fused layout transformers' in-memory modules use)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden: int,
        intermediate: int,
        renormalize: bool,
        dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be between 1 and num_experts {num_experts}")
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        if self.tp_size > intermediate:
            raise ValueError(
                f"tensor_parallel_size={self.tp_size} exceeds the experts' intermediate size {intermediate}"
            )
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate, self.reduce_results = intermediate, reduce_results
        self.inter_start, n = ps.split_range(intermediate, self.tp_size, self.tp_rank)
        self.inter_per_rank = n
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * n, hidden, dtype=dtype), requires_grad=False
        )
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, n, dtype=dtype), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self._loaded: set[tuple[str, int]] = set()
        self.packed: list[tuple[PackedWeight, PackedWeight]] | None = None  # the CPU GEMM's, per expert

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        y = self.experts(x, router_logits)
        if self.reduce_results and self.tp_size > 1:
            ps.all_reduce(y)
        return y

    def experts(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum (its slice of every expert), not reduced."""
        weights, ids = moe_route_ref(router_logits, self.top_k, self.renormalize)
        if use_triton(x):
            return triton_ops().fused_moe(x, self.w13_weight, self.w2_weight, weights, ids)
        mlp = self._packed_expert if self.packed is not None else None
        return fused_moe_ref(x, self.w13_weight, self.w2_weight, weights, ids, mlp)

    def pack_weights(self) -> None:
        """Pack each expert's gate/up and down weights for the CPU GEMM (:mod:`distgen.kernels.cpu_gemm`)
        and release the plain ones; a no-op where they cannot be packed."""
        cpu = cpu_kernels()
        packed = [
            (cpu.pack_linear(w13), cpu.pack_linear(w2)) for w13, w2 in zip(self.w13_weight, self.w2_weight)
        ]
        if any(p is None for pair in packed for p in pair):
            return
        self.packed = packed
        self.w13_weight.data = self.w13_weight.data.new_empty(0)
        self.w2_weight.data = self.w2_weight.data.new_empty(0)

    def _packed_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        cpu = cpu_kernels()
        w13, w2 = self.packed[e]
        return cpu.packed_linear(cpu.silu_and_mul(cpu.packed_linear(rows, w13, None)), w2, None)

    # -- weights ------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2):
            raise ValueError(f"FusedMoE weights load with a (part, expert) shard id, got {shard_id!r}")
        part, expert = shard_id
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range: the model has {self.num_experts} experts")
        experts = range(self.num_experts) if expert is None else [expert]
        what = "all experts" if expert is None else f"expert {expert}"
        # A per-expert tensor goes into the parameter's row for that expert; a fused one fills them all
        # and has the experts' dimension in front.
        dst, lead = (param.data, 1) if expert is None else (param.data[expert], 0)
        start, n = self.inter_start, self.inter_per_rank
        if param is self.w2_weight and part == "down":
            self._check_inter(loaded, lead + 1, self.intermediate, part)
            copy_into(dst, narrow(loaded, lead + 1, start, n), f"FusedMoE.down ({what})")
            self._loaded.update(("down", e) for e in experts)
            return
        if param is not self.w13_weight or part not in (*GATE_UP_PARTS, "gate_up"):
            raise ValueError(f"FusedMoE weight part {part!r} does not fit this parameter")
        if part == "gate_up":
            if expert is not None:
                raise ValueError(
                    "a fused gate_up weight holds all experts: its shard id is ('gate_up', None)"
                )
            self._check_inter(loaded, lead, 2 * self.intermediate, part)
            pieces = [("gate", start), ("up", self.intermediate + start)]
        else:
            self._check_inter(loaded, lead, self.intermediate, part)
            pieces = [(part, start)]
        for name, row in pieces:
            offset = 0 if name == "gate" else n
            copy_into(dst.narrow(lead, offset, n), narrow(loaded, lead, row, n), f"FusedMoE.{name} ({what})")
            self._loaded.update((name, e) for e in experts)

    @staticmethod
    def _check_inter(loaded: LoadedWeight, dim: int, want: int, part: str) -> None:
        """The checkpoint tensor's intermediate dim must be the whole (unsharded) size."""
        shape = shape_of(loaded)
        if len(shape) <= dim or shape[dim] != want:
            raise ValueError(f"expert weight {part}: checkpoint shape {shape} has not {want} in dim {dim}")

    def loaded_params(self) -> set[str]:
        """The names of the parameters every expert's parts have been loaded into."""
        full = set(range(self.num_experts))
        done = set()
        if all({e for p, e in self._loaded if p == part} == full for part in GATE_UP_PARTS):
            done.add("w13_weight")
        if {e for p, e in self._loaded if p == "down"} == full:
            done.add("w2_weight")
        return done


class SparseMoeBlock(nn.Module):
    """A decoder layer's MoE MLP: the router ``gate`` (replicated), the ``experts``, and optionally a
    ``shared_expert`` that every token runs, scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).
    The experts' and the shared expert's partial sums are added before the one all-reduce."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        renormalize: bool,
        dtype: torch.dtype | None = None,
        shared_intermediate: int = 0,
        hidden_act: str = "silu",
    ) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported for mixture-of-experts (silu)")
        self.gate = ReplicatedLinear(hidden, num_experts, bias=False, dtype=dtype)
        self.experts = FusedMoE(num_experts, top_k, hidden, intermediate, renormalize, dtype, False)
        self.shared_expert = None
        if shared_intermediate:
            self.shared_expert = SharedExpert(hidden, shared_intermediate, dtype)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False, dtype=dtype)
        self.tp_size = ps.tp_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts.experts(x, self.gate(x))
        if self.shared_expert is not None:
            # sigmoid(g) * sum of the ranks' partials = sum of sigmoid(g) * partial: one all-reduce.
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.partial(x)
        if self.tp_size > 1:
            ps.all_reduce(y)
        return y


class SharedExpert(nn.Module):
    """A dense SiLU MLP, TP-sharded like Llama's; :meth:`partial` leaves its output unreduced."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate, hidden, dtype=dtype)
        self.act = SiluAndMul()

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.matmul(self.act(self.gate_up_proj(x)), None)
