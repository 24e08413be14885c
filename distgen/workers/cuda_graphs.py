"""CUDA graphs of the decode-only forward: one per batch-size bucket, captured at start, one memory pool.

A decode step of ``n`` sequences runs the graph of the smallest bucket ``>= n``. Its inputs live in
static device buffers that every graph reads (slices of the same tensors), refreshed each step by two
asynchronous, contiguous copies from pinned host buffers (all five per-row vectors, and the bucket's
full block-table rows); rows ``n ..`` of the bucket are padding that reads and writes only a spare KV
block no request ever owns, and whose outputs are dropped. Only the Triton
attention path can be captured (the torch path builds per-step shapes on the host), so graphs are
used only when :mod:`distgen.kernels.dispatch` picks Triton for the device.

The graphs are captured largest first into one shared pool, so smaller ones reuse its memory.
Capturing needs the KV cache bound to the attention layers and a warm-up forward per bucket first
(Triton compiles a kernel variant on its first launch, which a capture must not contain). A bucket
with no captured graph runs the same forward eagerly on the same static buffers: that is how tests
check the buffers and the padding on a machine without CUDA.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from distgen.layers.attention import AttentionMetadata

logger = logging.getLogger("distgen")

# Rows of the int64 staging buffer: one value per sequence each.
_IDS, _POS, _SLOT_BLOCK, _SLOT_OFFSET, _SEQ_LEN = range(5)


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to ``max_batch`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        max_batch: int,
        max_blocks_per_seq: int,
        pad_block: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = decode_buckets(max_batch)
        self.pad_block = pad_block
        self.cuda = device.type == "cuda"
        n = self.buckets[-1]
        self._vec = torch.zeros(5, n, dtype=torch.int64, device=device)
        self._table = torch.full((n, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device)
        self._host_vec = torch.zeros(5, n, dtype=torch.int64, pin_memory=self.cuda)
        self._host_table = torch.full(
            (n, max_blocks_per_seq), pad_block, dtype=torch.int32, pin_memory=self.cuda
        )
        self._pad_rows(0, n)
        self._vec.copy_(self._host_vec)
        self._copied = torch.cuda.Event() if self.cuda else None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _meta(self, b: int) -> AttentionMetadata:
        v = self._vec
        return AttentionMetadata(
            slot_block=v[_SLOT_BLOCK, :b],
            slot_offset=v[_SLOT_OFFSET, :b],
            num_decode=b,
            num_prefill=0,
            path="triton",
            block_tables=self._table[:b],
            seq_lens=v[_SEQ_LEN, :b],
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self._vec[_IDS, :b], self._vec[_POS, :b], self._meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        assert self.cuda, "CUDA graphs need a CUDA device"
        t0 = time.perf_counter()
        pool = None
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: compiles the kernel variants outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            pool = graph.pool()
            self._graphs[b], self._outputs[b] = graph, out
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1fs",
            len(self.buckets),
            self.buckets[0],
            self.buckets[-1],
            time.perf_counter() - t0,
        )

    def _pad_rows(self, lo: int, hi: int) -> None:
        """Padding rows: one token at position 0 of the spare block, attending to itself only."""
        if lo >= hi:
            return
        hv = self._host_vec.numpy()  # numpy indexing: a few times cheaper on the host than torch's
        hv[:, lo:hi] = 0
        hv[_SLOT_BLOCK, lo:hi] = self.pad_block
        hv[_SEQ_LEN, lo:hi] = 1
        self._host_table.numpy()[lo:hi, 0] = self.pad_block

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
        """Replay the bucket's graph for ``n`` decode rows; returns the hidden states ``[n, hidden]``.
        ``fill`` = (rows, tokens on the device) overrides those rows' input ids (async scheduling);
        ``rope_pos``, the rows' rotary table rows where they are not their positions (LongRoPE)."""
        n = len(input_ids)
        b = self.bucket(n)
        nb = block_table.shape[1]
        # The previous step's copies must be done before the pinned buffers are overwritten.
        if self._copied is not None:
            self._copied.synchronize()
        hv = self._host_vec.numpy()
        hv[_IDS, :n] = input_ids
        hv[_POS, :n] = positions if rope_pos is None else rope_pos
        hv[_SLOT_BLOCK, :n] = slot_block
        hv[_SLOT_OFFSET, :n] = positions % block_size
        hv[_SEQ_LEN, :n] = seq_lens
        self._host_table.numpy()[:n, :nb] = block_table
        self._pad_rows(n, b)
        # Contiguous regions only (a strided host-to-device copy goes through pageable temporaries).
        self._vec.copy_(self._host_vec, non_blocking=True)
        self._table[:b].copy_(self._host_table[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if fill is not None:
            self._vec[_IDS][fill[0]] = fill[1]
        graph = self._graphs.get(b)
        if graph is None:
            return self._forward(b)[:n]
        graph.replay()
        return self._outputs[b][:n]
