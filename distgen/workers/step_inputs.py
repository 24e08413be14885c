"""A step's model inputs: token ids, positions and the attention metadata every layer shares.

The runner lays the batch out as decodes first (shortest context first), then prefill chunks. The
metadata depends on the attention path :mod:`distgen.kernels.dispatch` picks for the device:

- the Triton kernels take block tables, context lengths and the prefill rows' query offsets;
- the CPU kernels take block tables, context lengths and every row's query offsets (one call);
- the torch path (CPU) reads each sequence's cached K/V tiles into a workspace kept across steps, so
  it needs the tile indices and masks: decodes in up to four groups of similar context length (each
  padded only to its own longest), prefill chunks with a causal mask over cached context plus chunk.

Decode-only steps on CUDA do not come here: they replay a CUDA graph (:mod:`distgen.workers.cuda_graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distgen.host_to_device import to_device
from distgen.kernels.dispatch import attention_path
from distgen.layers.attention import AttentionMetadata, ContextRead, tile_index
from distgen.layers.rotary import LongRopeSwitch
from distgen.workers.input_batch import CachedRequestState


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] (LongRoPE: the tokens' rotary table rows)
    cu: np.ndarray  # [B + 1] offsets of each row's tokens in the flattened batch
    meta: AttentionMetadata


class StepInputBuilder:
    def __init__(
        self,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        long_rope: LongRopeSwitch | None = None,
    ) -> None:
        """``long_rope``: the model's LongRoPE switch; the model then gets each token's rotary table
        row in place of its position (the slots still come from the positions)."""
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.long_rope = long_rope
        self._ws: tuple[torch.Tensor, torch.Tensor] | None = None

    def build(self, rows: list[CachedRequestState], counts: list[int], table: np.ndarray) -> StepInputs:
        """Token ids, positions and attention metadata for ``rows`` (decodes first, then prefill
        chunks) scheduling ``counts`` tokens each; ``table`` holds their block ids (0 past the end)."""
        bs, dev = self.block_size, self.device
        starts = [s.num_computed_tokens for s in rows]
        ids: list[int] = []
        for s, st, n in zip(rows, starts, counts):
            ids.extend(s.token_ids[st : st + n])
        counts_np = np.asarray(counts, dtype=np.int64)
        starts_np = np.asarray(starts, dtype=np.int64)
        row_of_tok = np.repeat(np.arange(len(rows)), counts_np)
        cu = np.concatenate(([0], np.cumsum(counts_np)))
        offs = np.arange(cu[-1]) - cu[row_of_tok]
        positions = starts_np[row_of_tok] + offs
        slot_block = table[row_of_tok, positions // bs].astype(np.int64)

        nd = 0
        while nd < len(counts) and counts[nd] == 1:
            nd += 1
        seq_lens = starts_np + counts_np
        rope_pos = positions
        if self.long_rope is not None:
            prompt_lens = np.asarray([s.num_prompt_tokens for s in rows], dtype=np.int64)
            rope_pos = self.long_rope.rows(positions, prompt_lens[row_of_tok])
        input_ids, positions_t = to_device(ids, dev, torch.long), to_device(rope_pos, dev)
        path = attention_path(dev, self.dtype)
        if path == "triton":
            meta = self._triton_metadata(table, slot_block, positions, seq_lens, counts_np, nd)
            return StepInputs(input_ids, positions_t, cu, meta)
        if path == "cpu":
            meta = self._cpu_metadata(table, slot_block, positions, seq_lens, cu, nd)
            return StepInputs(input_ids, positions_t, cu, meta)
        meta = AttentionMetadata(
            slot_block=to_device(slot_block, dev),
            slot_offset=to_device(positions % bs, dev),
            num_decode=nd,
            num_prefill=len(rows) - nd,
        )
        need = 0  # workspace elements for the largest context read
        if nd:
            meta.decode_groups = self._decode_groups(table[:nd], seq_lens[:nd])
            need = max(g[2].tile_index.numel() for g in meta.decode_groups)
        if len(rows) > nd:
            p_counts, p_starts, p_lens = counts_np[nd:], starts_np[nd:], seq_lens[nd:]
            mq = int(p_counts.max())
            bp = len(p_counts)
            p_row = row_of_tok[cu[nd] :] - nd
            q_index = p_row * mq + offs[cu[nd] :]
            meta.prefill_max_q = mq
            meta.prefill_q_index = to_device(q_index, dev)
            q_pos = torch.arange(mq, device=dev)
            starts_t = to_device(p_starts, dev)[:, None, None]
            lens_t = to_device(p_lens, dev)[:, None, None]
            fresh = p_starts.max() == 0
            # Fresh prompts: keys are the new tokens themselves, padded like the queries.
            nb = 0 if fresh else int(-(-p_lens.max() // bs))
            kv_pos = torch.arange(mq if fresh else nb * bs, device=dev)
            mask = (kv_pos[None, None, :] <= starts_t + q_pos[None, :, None]) & (
                kv_pos[None, None, :] < lens_t
            )
            mask = mask.view(bp, 1, mq, -1)
            if fresh:
                meta.prefill_mask = mask
            else:
                block_table = to_device(table[nd:, :nb], dev)
                meta.prefill_context = ContextRead(
                    tile_index(block_table, self.num_kv_heads), bp, nb * bs, mask
                )
                need = max(need, meta.prefill_context.tile_index.numel())
        if need:
            meta.workspace = self._workspace(need * bs * self.head_dim)
        return StepInputs(input_ids, positions_t, cu, meta)

    def _cpu_metadata(self, table, slot_block, positions, seq_lens, cu, nd: int) -> AttentionMetadata:
        """The CPU kernels' metadata: block tables, lengths and every row's query offsets (host
        tensors sharing the arrays' memory)."""
        return AttentionMetadata(
            slot_block=torch.from_numpy(slot_block),
            slot_offset=torch.from_numpy(positions % self.block_size),
            num_decode=nd,
            num_prefill=len(seq_lens) - nd,
            path="cpu",
            block_tables=torch.from_numpy(np.ascontiguousarray(table, dtype=np.int32)),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            query_start=torch.from_numpy(cu.astype(np.int32)),
        )

    def _triton_metadata(self, table, slot_block, positions, seq_lens, counts, nd: int) -> AttentionMetadata:
        """The kernels' metadata: block tables, lengths and the prefill rows' query offsets."""
        dev = self.device
        p_counts = counts[nd:]
        query_start = np.concatenate(([0], np.cumsum(p_counts))).astype(np.int32)
        return AttentionMetadata(
            slot_block=to_device(slot_block, dev),
            slot_offset=to_device(positions % self.block_size, dev),
            num_decode=nd,
            num_prefill=len(counts) - nd,
            prefill_max_q=int(p_counts.max()) if len(p_counts) else 0,
            path="triton",
            block_tables=to_device(np.asarray(table, dtype=np.int32), dev),  # no copy: already int32
            seq_lens=to_device(seq_lens.astype(np.int32), dev),
            prefill_query_start=to_device(query_start, dev),
        )

    def _decode_groups(self, table: np.ndarray, seq_lens: np.ndarray) -> list:
        """Split decode rows (sorted by context length) into up to 4 equal-count groups when their
        lengths differ enough that padding everything to the longest would waste real work."""
        bs, dev, nd = self.block_size, self.device, len(seq_lens)
        num_groups = 1
        if nd >= 8 and seq_lens[-1] > 2 * seq_lens[0] + 4 * bs:
            num_groups = 4 if nd >= 32 else 2
        bounds = [round(i * nd / num_groups) for i in range(num_groups + 1)]
        groups = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            nb = int(-(-seq_lens[end - 1] // bs))
            kv_pos = torch.arange(nb * bs, device=dev)
            lens = to_device(seq_lens[start:end], dev)
            mask = (kv_pos[None, :] < lens[:, None]).view(end - start, 1, 1, nb * bs)
            tiles = tile_index(to_device(table[start:end, :nb], dev), self.num_kv_heads)
            groups.append((start, end, ContextRead(tiles, end - start, nb * bs, mask)))
        return groups

    def _workspace(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V scratch for context reads, grown (by half again) when a step needs more."""
        if self._ws is None or self._ws[0].numel() < numel:
            numel = int(numel * 1.5)
            self._ws = tuple(torch.empty(numel, dtype=self.dtype, device=self.device) for _ in range(2))
        return self._ws
