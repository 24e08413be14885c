"""Decode-only steps on the CPU kernels, recorded once per batch-size bucket and then replayed
(:mod:`distgen.kernels.cpu_record`): the CPU's counterpart of :mod:`distgen.workers.cuda_graphs`.

Batches of up to 16 sequences replay: there the Python between kernels is a large share of a step
(a third of a one-stream forward on the default model), and a bucket's recording holds that many rows
of every layer's activations. A batch of ``n`` runs the recording of the smallest bucket
``>= n`` (1, 2, 3, 4, 6, 8, 12, 16): rows ``n ..`` are padding that reads and writes only a spare KV
block no request ever owns, and their outputs are dropped. A decode row's GEMM cost is mostly the weights
streaming past, so a padded row costs little. Inputs live in static buffers that every bucket reads
(slices of the same tensors). A bucket is recorded the first time a step needs it, from a real step;
a model whose forward cannot be replayed (see cpu_record) runs that bucket eagerly on the same buffers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from distgen.kernels.cpu_record import Recording, record
from distgen.layers.attention import AttentionMetadata

logger = logging.getLogger("distgen")

# Rows of the int64 input buffer: one value per sequence each.
_IDS, _POS, _SLOT_BLOCK, _SLOT_OFFSET = range(4)
_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


def cpu_buckets(max_batch: int) -> list[int]:
    """The batch sizes that replay: the buckets up to ``max_batch`` (itself included when under 16)."""
    top = min(max_batch, _BUCKETS[-1])
    return [b for b in _BUCKETS if b < top] + [top]


class CpuDecodeReplay:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, pad_block: int) -> None:
        self.model = model
        self.buckets = cpu_buckets(max_batch)
        self.pad_block = pad_block
        n = self.buckets[-1]
        self._vec = torch.zeros(4, n, dtype=torch.int64)
        self._seq_lens = torch.ones(n, dtype=torch.int32)
        self._query_start = torch.arange(n + 1, dtype=torch.int32)
        self._table = torch.full((n, max_blocks_per_seq), pad_block, dtype=torch.int32)
        self._pad_rows(0, n)
        self._meta: dict[int, AttentionMetadata] = {}
        self._recordings: dict[int, Recording | None] = {}  # None: the bucket runs eagerly
        self._told = False  # whether the log says why the forward runs eagerly

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _meta_of(self, b: int) -> AttentionMetadata:
        if b not in self._meta:
            v = self._vec
            self._meta[b] = AttentionMetadata(
                slot_block=v[_SLOT_BLOCK, :b],
                slot_offset=v[_SLOT_OFFSET, :b],
                num_decode=b,
                num_prefill=0,
                path="cpu",
                block_tables=self._table[:b],
                seq_lens=self._seq_lens[:b],
                query_start=self._query_start[: b + 1],
            )
        return self._meta[b]

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self._vec[_IDS, :b], self._vec[_POS, :b], self._meta_of(b))

    def _pad_rows(self, lo: int, hi: int) -> None:
        """Padding rows: one token at position 0 of the spare block, attending to itself only."""
        if lo >= hi:
            return
        v = self._vec.numpy()
        v[:, lo:hi] = 0
        v[_SLOT_BLOCK, lo:hi] = self.pad_block
        self._seq_lens.numpy()[lo:hi] = 1
        self._table.numpy()[lo:hi, 0] = self.pad_block

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
        """The hidden states ``[n, hidden]`` of ``n`` decode rows, through the bucket's recording.
        ``fill`` = (rows, tokens) overrides those rows' input ids (async scheduling); ``rope_pos``,
        the rows' rotary table rows where they are not their positions (LongRoPE)."""
        n = len(input_ids)
        b = self.bucket(n)
        v = self._vec.numpy()
        v[_IDS, :n] = input_ids
        v[_POS, :n] = positions if rope_pos is None else rope_pos
        v[_SLOT_BLOCK, :n] = slot_block
        v[_SLOT_OFFSET, :n] = positions % block_size
        self._seq_lens.numpy()[:n] = seq_lens
        self._table.numpy()[:n, : block_table.shape[1]] = block_table
        self._pad_rows(n, b)
        if fill is not None:
            self._vec[_IDS][fill[0]] = fill[1]
        if b not in self._recordings:
            out, rec = record(lambda: self._forward(b))
            self._recordings[b] = rec if rec.refused is None else None
            if rec.refused is not None and not self._told:
                why = "the model's forward calls %s, which a replay cannot repeat"
                logger.info("decode steps run eagerly: " + why, rec.refused)
                self._told = True
            return out[:n]
        rec = self._recordings[b]
        return (self._forward(b) if rec is None else rec.replay())[:n]
