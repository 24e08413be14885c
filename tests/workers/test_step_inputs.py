"""The step's inputs and attention metadata, checked value by value on a mixed batch: three decodes
of very different context lengths, then a prefill chunk continuing a cached prefix and a fresh one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distgen.kernels import dispatch
from distgen.sampling_params import SamplingParams
from distgen.workers.input_batch import CachedRequestState
from distgen.workers.step_inputs import StepInputBuilder

BS, HKV, D = 4, 2, 8


def _row(rid: str, num_tokens: int, computed: int, blocks: list[int]) -> CachedRequestState:
    tokens = [100 * (ord(rid) - 96) + i for i in range(num_tokens)]  # a: 100.., b: 200.., ...
    return CachedRequestState(rid, tokens, num_tokens, SamplingParams(), blocks, computed)


def _batch() -> tuple[list[CachedRequestState], list[int]]:
    rows = [
        _row("a", 3, 2, [5]),  # decode at position 2
        _row("b", 6, 5, [1, 9]),  # decode at position 5
        _row("c", 14, 13, [2, 3, 4, 7]),  # decode at position 13
        _row("d", 10, 4, [6, 8, 10]),  # prefill chunk: positions 4..9 after 4 cached tokens
        _row("e", 3, 0, [11]),  # fresh prefill of 3 tokens
    ]
    return rows, [1, 1, 1, 6, 3]


def _build(rows: list[CachedRequestState], counts: list[int]):
    table = np.zeros((len(rows), max(len(r.block_ids) for r in rows)), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r.block_ids)] = r.block_ids
    return StepInputBuilder(BS, HKV, D, torch.float32, torch.device("cpu")).build(rows, counts, table)


def test_ids_positions_slots_and_offsets():
    rows, counts = _batch()
    with dispatch.kernel_mode("torch"):
        step = _build(rows, counts)
    assert step.cu.tolist() == [0, 1, 2, 3, 9, 12]
    assert step.input_ids.tolist() == [102, 205, 313, *range(404, 410), 500, 501, 502]
    assert step.positions.tolist() == [2, 5, 13, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    # The block holding each new token's position, and the offset inside it.
    assert step.meta.slot_block.tolist() == [5, 9, 7, 8, 8, 8, 8, 10, 10, 11, 11, 11]
    assert step.meta.slot_offset.tolist() == [2, 1, 1, 0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert (step.meta.num_decode, step.meta.num_prefill, step.meta.prefill_max_q) == (3, 2, 6)


def test_torch_metadata_masks_and_tile_reads():
    rows, counts = _batch()
    with dispatch.kernel_mode("torch"):
        meta = _build(rows, counts).meta
    # Three decodes are too few to split into groups: one group padded to the longest context (4 blocks).
    [(start, end, ctx)] = meta.decode_groups
    assert (start, end, ctx.num_seqs, ctx.length) == (0, 3, 3, 16)
    assert ctx.mask.reshape(3, 16).sum(-1).tolist() == [3, 6, 14]  # each row attends to its own context
    # Tiles in (seq, head, block) order; a row's missing blocks read block 0 and are masked out.
    tiles = ctx.tile_index.view(3, HKV, 4)
    assert tiles[2, 1].tolist() == [2 * HKV + 1, 3 * HKV + 1, 4 * HKV + 1, 7 * HKV + 1]
    assert tiles[0, 0].tolist() == [5 * HKV, 0, 0, 0]
    # Prefill: d continues after cached context, so both rows read from the cache (3 blocks each).
    pc = meta.prefill_context
    assert pc is not None and (pc.num_seqs, pc.length) == (2, 12)
    mask = pc.mask.reshape(2, 6, 12)
    # d's query at position 4 + i sees keys 0 .. 4 + i; e's 3 queries see 1, 2, 3 keys. e's padding
    # queries see its whole context (an all-masked row would be NaN in SDPA); their outputs are dropped.
    assert mask[0].sum(-1).tolist() == [5, 6, 7, 8, 9, 10]
    assert mask[1].sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert not mask[1, 0, 1:].any()  # causal: e's first query sees only itself
    assert meta.prefill_q_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert meta.workspace is not None and meta.workspace[0].numel() >= 2 * HKV * 3 * BS * D


def test_decodes_of_very_different_lengths_split_into_groups():
    rows = [_row(chr(97 + i), 2 + 6 * i, 1 + 6 * i, list(range(1, 2 + (1 + 6 * i) // BS))) for i in range(8)]
    with dispatch.kernel_mode("torch"):
        meta = _build(rows, [1] * 8).meta
    bounds = [(s, e) for s, e, _ in meta.decode_groups]
    assert bounds == [(0, 4), (4, 8)]
    lengths = [ctx.length for _, _, ctx in meta.decode_groups]
    assert lengths == [BS * -(-(1 + 6 * 3 + 1) // BS), BS * -(-(1 + 6 * 7 + 1) // BS)]  # each group its own


def test_kernel_metadata_is_block_tables_and_lengths():
    pytest.importorskip("triton", reason="the Triton path's metadata is built only where triton exists")
    rows, counts = _batch()
    with dispatch.kernel_mode("triton"):
        meta = _build(rows, counts).meta
    assert meta.path == "triton" and meta.decode_groups == [] and meta.prefill_context is None
    assert meta.seq_lens.tolist() == [3, 6, 14, 10, 3]
    assert meta.prefill_query_start.tolist() == [0, 6, 9]
    assert meta.block_tables.dtype == torch.int32
    expected = np.zeros((5, 4), dtype=np.int32)
    for i, r in enumerate(rows):
        expected[i, : len(r.block_ids)] = r.block_ids
    assert meta.block_tables.tolist() == expected.tolist()
