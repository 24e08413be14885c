"""Decode-only steps on the CPU kernels, replayed from a recording of their forward
(:mod:`distgen.kernels.cpu_record`): the CPU's counterpart of :mod:`distgen.workers.cuda_graphs`.

The inputs live in static buffers (every batch size reads slices of the same tensors). A batch size
is recorded the second time a decode-only step has it, from that real step, and replayed from then
on: a size seen once (a batch draining one request at a time) is not worth the recording, which runs
the forward under a dispatch mode. Sizes are exact, not padded to buckets as the CUDA graphs are: a
padded row costs the GEMMs real work once a batch is compute-bound. The :data:`KEPT` most recently
used recordings are kept; each holds about one layer's activations for its rows. A model whose
forward cannot be replayed (see cpu_record) runs eagerly on the same buffers.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import numpy as np
import torch
from torch import nn

from distgen.kernels.cpu_record import Recording, record
from distgen.layers.attention import AttentionMetadata

logger = logging.getLogger("distgen")

# Rows of the int64 input buffer: one value per sequence each.
_IDS, _POS, _SLOT_BLOCK, _SLOT_OFFSET = range(4)
KEPT = 32  # recordings kept, the most recently used


class CpuDecodeReplay:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self._vec = torch.zeros(4, max_batch, dtype=torch.int64)
        self._seq_lens = torch.ones(max_batch, dtype=torch.int32)
        self._query_start = torch.arange(max_batch + 1, dtype=torch.int32)
        self._table = torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32)
        self._seen: Counter[int] = Counter()  # decode-only steps of each batch size so far
        self._recordings: OrderedDict[int, Recording] = OrderedDict()
        self.eager_reason: str | None = None  # set once a recording is refused: then all run eagerly

    def _meta(self, n: int) -> AttentionMetadata:
        v = self._vec
        return AttentionMetadata(
            slot_block=v[_SLOT_BLOCK, :n],
            slot_offset=v[_SLOT_OFFSET, :n],
            num_decode=n,
            num_prefill=0,
            path="cpu",
            block_tables=self._table[:n],
            seq_lens=self._seq_lens[:n],
            query_start=self._query_start[: n + 1],
        )

    def _forward(self, n: int) -> torch.Tensor:
        return self.model(self._vec[_IDS, :n], self._vec[_POS, :n], self._meta(n))

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_block: np.ndarray,
        seq_lens: np.ndarray,
        block_table: np.ndarray,
        block_size: int,
        fill: tuple[slice | torch.Tensor, torch.Tensor] | None = None,
        rope_pos: np.ndarray | None = None,
    ) -> torch.Tensor:
        """The hidden states ``[n, hidden]`` of ``n`` decode rows, replayed where their size is recorded.
        ``fill`` = (rows, tokens) overrides those rows' input ids (async scheduling); ``rope_pos``,
        the rows' rotary table rows where they are not their positions (LongRoPE)."""
        n = len(input_ids)
        v = self._vec.numpy()
        v[_IDS, :n] = input_ids
        v[_POS, :n] = positions if rope_pos is None else rope_pos
        v[_SLOT_BLOCK, :n] = slot_block
        v[_SLOT_OFFSET, :n] = positions % block_size
        self._seq_lens.numpy()[:n] = seq_lens
        self._table.numpy()[:n, : block_table.shape[1]] = block_table
        if fill is not None:
            self._vec[_IDS][fill[0]] = fill[1]
        rec = self._recordings.get(n)
        if rec is not None:
            self._recordings.move_to_end(n)
            return rec.replay()
        self._seen[n] += 1
        if self.eager_reason is not None or self._seen[n] < 2:
            return self._forward(n)
        return self._record(n)

    def _record(self, n: int) -> torch.Tensor:
        out, rec = record(lambda: self._forward(n))
        if rec.refused is not None:
            self.eager_reason = f"the model's forward calls {rec.refused}, which a replay cannot repeat"
            logger.info("decode steps run eagerly: %s", self.eager_reason)
            return out
        self._recordings[n] = rec
        if len(self._recordings) > KEPT:
            self._recordings.popitem(last=False)
        return out
