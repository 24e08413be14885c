"""Vocabulary-parallel embedding and LM head.

Each rank holds a contiguous range of vocabulary rows. The embedding looks up the ids that fall
in its range, zeroes the rest and all-reduces; the LM head computes its slice of the logits and
gathers them on rank 0, the only rank that samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgen.distributed import parallel_state as ps
from distgen.layers.linear import PackedMatmul
from distgen.layers.weights import LoadedWeight, copy_into, narrow, shape_of


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = ps.tp_rank(), ps.tp_size()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp_size)  # padded so every rank has the same count
        self.start = self.tp_rank * self.rows_per_rank
        self.end = min(self.start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if shape_of(loaded)[0] != self.vocab_size:
            raise ValueError(
                f"embedding has {shape_of(loaded)[0]} rows, the config says vocab {self.vocab_size}"
            )
        n = self.end - self.start
        copy_into(param.data.narrow(0, 0, n), narrow(loaded, 0, self.start, n), type(self).__name__)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids < self.start) | (ids >= self.end)
        out = F.embedding((ids - self.start).masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return ps.all_reduce(out)


class ParallelLMHead(PackedMatmul, VocabParallelEmbedding):
    """Logits from the final hidden states; full logits exist only on rank 0."""

    def __init__(
        self, vocab_size: int, hidden: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(vocab_size, hidden, dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.rows_per_rank, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

        self.packed = None
        self.tied = False

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def weight_is_shared(self) -> bool:
        return self.tied  # the embedding still looks rows up in the plain weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = self.matmul(hidden, self.bias)
        if self.tp_size > 1:
            logits = ps.gather(logits, dim=-1)
            if logits is None:
                return None
        return logits[..., : self.vocab_size]
