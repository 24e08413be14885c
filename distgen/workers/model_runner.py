"""Turns a scheduler step into tensors, runs the model shard, and (on rank 0) samples.

Per step: fold the diff into the request states, lay the batch out as decodes first then prefill
chunks, build its inputs and attention metadata once for all layers (:mod:`distgen.workers.step_inputs`),
run the forward, compute logits only for the rows that sample (and prompt-logprob positions), and
sample them in one batched call.

A decode-only step instead replays unless ``enforce_eager`` is set: on CUDA the CUDA graph of its
batch-size bucket (:mod:`distgen.workers.cuda_graphs`), on the CPU kernels the recording of its
kernel calls for its batch size (:mod:`distgen.workers.cpu_decode`).

:meth:`ModelRunner.submit` returns as soon as the step is launched, its tokens still on their way to
the host (:class:`~distgen.workers.sampled_output.SampledOutput`). With async scheduling the next step
is scheduled before those tokens are known: each row that sampled gets a placeholder token, and a
step whose input is a placeholder takes the token from the previous step's samples on the device.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from distgen.config import EngineConfig
from distgen.distributed import parallel_state as ps
from distgen.host_to_device import to_device
from distgen.kernels.dispatch import attention_path, use_triton_on
from distgen.layers.sampler import Sampler
from distgen.layers.sampling_metadata import SamplingMetadata, build_sampling_metadata
from distgen.model_loader.loader import build_model
from distgen.workers import heap
from distgen.workers.cpu_decode import CpuDecodeReplay
from distgen.workers.cuda_graphs import DecodeGraphs
from distgen.workers.grammar_matchers import GrammarMatchers
from distgen.workers.input_batch import CachedRequestState, RequestStates
from distgen.workers.sampled_output import SampledOutput
from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput
from distgen.workers.step_inputs import StepInputBuilder, StepInputs

logger = logging.getLogger("distgen")

_SEED_MIX = 0x9E3779B97F4A7C15


def pack_weights(model: torch.nn.Module) -> None:
    """Pack every linear layer's weight for the CPU GEMM, once (see :mod:`distgen.kernels.cpu_gemm`)."""
    for module in model.modules():
        if hasattr(module, "pack_weights"):
            module.pack_weights()


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.model.dtype
        self.block_size = config.cache.block_size
        self.model = build_model(config.model.source, self.dtype, config.device)
        if attention_path(self.device, self.dtype) == "cpu":
            pack_weights(self.model)
        self.vocab_size = config.model.vocab_size
        self.sampler = Sampler()
        self.states = RequestStates(-(-config.model.max_model_len // self.block_size))
        self.kv_cache = torch.empty(0)  # [layers, 2 (K, V), blocks, kv heads, block size, head dim]
        attn = self.model.attention_layers()[0]
        self.long_rope = attn.rotary.long_rope if attn.rotary is not None else None
        self.inputs = StepInputBuilder(
            self.block_size, attn.num_kv_heads, attn.head_dim, self.dtype, self.device, self.long_rope
        )
        self.is_driver = ps.is_driver()
        self.hidden_size = config.model.arch.hidden_size
        self.graphs: DecodeGraphs | CpuDecodeReplay | None = None  # decode-only steps replay these
        self._meta_cache: tuple[tuple[int, list[str]], SamplingMetadata] | None = None
        # Structured outputs: rank 0 loads the tokenizer only when a request first asks for them.
        self.grammars = GrammarMatchers(
            lambda: config.model.source.load_tokenizer(config.model.tokenizer), self.vocab_size
        )
        # Async scheduling: the last sampling step's tokens on the device, and each request's row.
        # Under pipeline parallelism no step reads a token still being sampled (the scheduler holds
        # back requests in flight), so there is nothing to keep.
        self.async_scheduling = config.scheduler.async_scheduling and ps.pp_size() == 1
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    def _use_graphs(self) -> bool:
        eager = self.config.model.enforce_eager
        cuda = self.device.type == "cuda" and use_triton_on(self.device)
        return cuda and not eager and ps.pp_size() == 1

    def _use_cpu_replay(self) -> bool:
        eager = self.config.model.enforce_eager
        cpu = attention_path(self.device, self.dtype) == "cpu"
        return cpu and not eager and ps.pp_size() == 1

    # -- KV cache -------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()
        a = attn[0]
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * len(attn) * self.block_size * a.num_kv_heads * a.head_dim * elem

    def num_blocks_for(self) -> int:
        """How many blocks fit the configured KV cache memory (this rank's slice)."""
        cc = self.config.cache
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * cc.gpu_memory_utilization) - (total - free)
        else:
            budget = cc.kv_cache_memory if cc.kv_cache_memory is not None else 4 << 30
        n = budget // self.kv_bytes_per_block()
        if n < 1:
            raise ValueError(
                f"the KV cache budget ({budget} bytes) does not fit one block "
                f"({self.kv_bytes_per_block()} bytes); raise kv_cache_memory"
            )
        return int(n)

    def init_kv_cache(self, num_blocks: int) -> None:
        graphs = self._use_graphs()
        # CUDA graphs pad a decode batch to its bucket; the padding rows write to one spare block.
        allocated = num_blocks + 1 if graphs else num_blocks
        layers = self.model.attention_layers()
        a = layers[0]
        # One tensor for every layer's cache, so one launch zeroes a block in all of them.
        shape = (len(layers), 2, allocated, a.num_kv_heads, self.block_size, a.head_dim)
        # Attention reads whole blocks and masks the slots past a sequence's end, but a NaN left in
        # never-written memory would still poison the weighted sum (0 * NaN). On the CPU the cache is a
        # fresh mapping, zeros until written, whose pages the kernel supplies as the steps first write
        # them (a separate zeroing pass faulted them in from one thread, 2.5% of a bf16 prefill step).
        # Elsewhere each block is zeroed the first time it is handed out (cheaper at start than zeroing
        # gigabytes up front).
        self._zero_on_first_use = self.device.type != "cpu"
        if self._zero_on_first_use:
            self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.kv_cache[:, :, num_blocks:].zero_()
        else:
            self.kv_cache = heap.zeroed_tensor(shape, self.dtype)
        self._never_used = np.full(num_blocks, self._zero_on_first_use)
        for attn, cache in zip(layers, self.kv_cache):
            attn.kv_cache = cache
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB per rank)",
            num_blocks,
            self.block_size,
            num_blocks * self.kv_bytes_per_block() / 2**20,
        )
        max_blocks = min(-(-self.config.model.max_model_len // self.block_size), num_blocks)
        max_batch = self.config.scheduler.max_num_seqs
        if graphs:
            self.graphs = DecodeGraphs(self.model, max_batch, max_blocks, num_blocks, self.device)
            self.graphs.capture()
        elif self._use_cpu_replay():  # recorded from the steps themselves
            self.graphs = CpuDecodeReplay(self.model, max_batch, max_blocks)

    # -- the step ------------------------------------------------------------------------------
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one step and wait for its output (rank 0; the other ranks return None)."""
        pending = self.submit(sched)
        return None if pending is None else pending.get()

    @torch.inference_mode()
    def submit(self, sched: SchedulerOutput) -> SampledOutput | None:
        """Launch one step; rank 0 returns its output on the way to the host."""
        self._take_new_blocks(sched)  # first: a bad block id leaves the runner's state as it was
        self.states.apply(sched)
        if sched.is_empty:
            return SampledOutput([], None) if self.is_driver else None
        rows = [self.states[rid] for rid in sched.num_scheduled_tokens]
        counts = [sched.num_scheduled_tokens[s.req_id] for s in rows]
        # Decodes (one token) first, shortest context first; then prefill chunks.
        order = sorted(range(len(rows)), key=lambda i: (counts[i] != 1, rows[i].num_computed_tokens))
        rows = [rows[i] for i in order]
        counts = [counts[i] for i in order]
        sample_rows = [i for i, s in enumerate(rows) if s.num_computed_tokens + counts[i] == len(s.token_ids)]
        lp_rows = [
            i
            for i, s in enumerate(rows)
            if s.sampling_params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens
        ]
        keep = None
        if self.graphs is not None and counts[-1] == 1 and len(rows) <= self.graphs.max_batch:
            hidden, cu = self._replay_decode(rows)
        else:
            table = self.states.block_table(rows, max(len(s.block_ids) for s in rows))
            step = self.inputs.build(rows, counts, table)
            fill = self._placeholder_fill(rows, step.cu)
            if fill is not None:
                step.input_ids[fill[0]] = fill[1]
            keep = self._kept_rows(sample_rows, lp_rows, step.cu)
            hidden, cu = self._forward(step, keep), step.cu
            if hidden is None:  # a stage before the last: its output went on to the next stage
                return None
        return self._sample(rows, counts, hidden, cu, sample_rows, lp_rows, keep is not None)

    def _kept_rows(self, sample_rows: list[int], lp_rows: list[int], cu: np.ndarray) -> torch.Tensor | None:
        """The rows the model's last layer carries past its attention (``keep`` of
        LlamaForCausalLM.forward): each sampling row's last position, where those are fewer than the
        step's tokens and no prompt logprobs need the rest; None for all of them."""
        if not getattr(self.model, "keeps_rows", False) or not ps.is_last_stage():
            return None
        if lp_rows or not sample_rows or len(sample_rows) == int(cu[-1]):
            return None
        return to_device(cu[np.asarray(sample_rows) + 1] - 1, self.device)

    def _forward(self, step: StepInputs, keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model on this step's inputs: the whole model, or this rank's pipeline stage, which takes
        its input from the previous stage and sends its output to the next."""
        kept = {} if keep is None else {"keep": keep}
        if ps.pp_size() == 1:
            return self.model(step.input_ids, step.positions, step.meta, **kept)
        intermediate = None
        if not ps.is_first_stage():
            shape = (len(step.input_ids), self.hidden_size)
            x, residual = ps.recv_from_prev([shape, shape], self.dtype, self.device)
            intermediate = (x, residual)
        out = self.model(step.input_ids, step.positions, step.meta, intermediate, **kept)
        if ps.is_last_stage():
            return out
        ps.send_to_next(list(out))
        return None

    def _placeholder_fill(
        self, rows: list[CachedRequestState], cu: np.ndarray
    ) -> tuple[slice | torch.Tensor, torch.Tensor] | None:
        """Where this step's input tokens are placeholders (sampled by the last step, not yet seen by
        the host): their indices in the flattened batch, and the tokens, on the device."""
        if self._last_sampled is None:  # nothing sampled on the device yet (always, without async)
            return None
        marked = [i for i, s in enumerate(rows) if s.num_placeholders]
        if not marked:
            return None
        # A placeholder is always a row's last token (decode rows: their only one).
        dst = [int(cu[i + 1]) - 1 for i in marked]
        try:
            src = [self._last_rows[rows[i].req_id] for i in marked]
        except KeyError as e:
            msg = f"request {e.args[0]} has a placeholder token that the last step did not sample"
            raise RuntimeError(msg) from None
        n = len(dst)
        if dst[-1] == n - 1 and src == list(range(n)):  # the usual decode step: same rows, same order
            return slice(0, n), self._last_sampled[:n]
        dev = self._last_sampled.device
        return to_device(np.asarray(dst), dev), self._last_sampled[to_device(np.asarray(src), dev)]

    def _replay_decode(self, rows: list[CachedRequestState]) -> tuple[torch.Tensor, np.ndarray]:
        """A decode-only step through its bucket's CUDA graph or its batch size's CPU recording."""
        assert self.graphs is not None
        bs = self.block_size
        n = len(rows)
        positions = np.fromiter((s.num_computed_tokens for s in rows), dtype=np.int64, count=n)
        ids = np.fromiter((s.token_ids[p] for s, p in zip(rows, positions)), dtype=np.int64, count=n)
        table = self.states.block_table(rows, int(positions.max()) // bs + 1)
        slot_block = table[np.arange(n), positions // bs]
        cu = np.arange(n + 1)
        fill = self._placeholder_fill(rows, cu)
        rope_pos = positions
        if self.long_rope is not None:
            prompt_lens = np.fromiter((s.num_prompt_tokens for s in rows), dtype=np.int64, count=n)
            rope_pos = self.long_rope.rows(positions, prompt_lens)
        hidden = self.graphs.run(ids, positions, slot_block, positions + 1, table, bs, fill, rope_pos)
        return hidden, cu

    def _take_new_blocks(self, sched: SchedulerOutput) -> None:
        """Checks the blocks a step hands out and zeroes those never used before (where the cache is
        not born zero). A block id past the cache would have the kernels write outside it: it raises
        here, in this rank's step, instead."""
        ids = [b for r in sched.new_reqs for b in r.block_ids]
        ids += [b for r in sched.cached_reqs for b in r.new_block_ids]
        if not ids:
            return
        ids_np = np.unique(np.asarray(ids, dtype=np.int64))
        n = len(self._never_used)
        if ids_np[0] < 0 or ids_np[-1] >= n:
            bad = ids_np[(ids_np < 0) | (ids_np >= n)][:4].tolist()
            raise IndexError(f"block ids {bad} are outside the KV cache's {n} blocks")
        if not self._zero_on_first_use:  # born zero (init_kv_cache)
            return
        fresh = ids_np[self._never_used[ids_np]]
        if len(fresh):
            self._never_used[fresh] = False
            self.kv_cache.index_fill_(2, to_device(fresh, self.device), 0)

    # -- sampling --------------------------------------------------------------------------
    def _sample(self, rows, counts, hidden, cu, sample_rows, lp_rows, kept: bool) -> SampledOutput | None:
        """``kept``: hidden holds only the sampling rows' last positions (see :meth:`_kept_rows`)."""
        logits = None
        if sample_rows:
            last = cu[np.asarray(sample_rows) + 1] - 1  # each sampling row's last position
            if kept or len(last) == len(hidden):  # or decode-only: every position samples, in order
                logits = self.model.compute_logits(hidden)
            else:
                logits = self.model.compute_logits(hidden[to_device(last, hidden.device)])
        prompt_lp = self._prompt_logprobs(rows, counts, hidden, cu, lp_rows)
        srows = [rows[i] for i in sample_rows]
        if not self.is_driver:
            if self.async_scheduling and srows:  # rank 0's samples, for the next step's inputs
                self._remember(
                    srows, ps.broadcast(torch.empty(len(srows), dtype=torch.long, device=self.device))
                )
            return None
        if not srows:
            return SampledOutput([], None, prompt_lp)
        out = self.sampler(logits, self._sampling_metadata(srows))  # it widens to float32 if it must
        if self.async_scheduling:
            self._remember(srows, ps.broadcast(out.sampled_token_ids))
        return SampledOutput([s.req_id for s in srows], out, prompt_lp)

    def _remember(self, srows: list[CachedRequestState], sampled: torch.Tensor) -> None:
        """Async scheduling: keep the samples on the device for the next step, whose inputs may be
        placeholders for them (see :meth:`_placeholder_fill`)."""
        self._last_sampled = sampled
        self._last_rows = {s.req_id: i for i, s in enumerate(srows)}
        for s in srows:
            s.add_placeholder()

    def _prompt_logprobs(self, rows, counts, hidden, cu, lp_rows) -> dict:
        """Logprobs of each prompt token given the ones before it, for this step's chunk."""
        out: dict = {}
        for i in lp_rows:
            s = rows[i]
            start = s.num_computed_tokens
            # Hidden state at position p predicts token p + 1; stay inside the prompt.
            n = min(counts[i], s.num_prompt_tokens - 1 - start)
            if n <= 0:
                out[s.req_id] = []
                continue
            logits = self.model.compute_logits(hidden[int(cu[i]) : int(cu[i]) + n])
            if logits is None:
                continue
            lp = torch.log_softmax(logits.float(), dim=-1)
            targets = to_device(s.token_ids[start + 1 : start + 1 + n], lp.device, torch.long)
            tgt_lp = lp.gather(1, targets[:, None])
            ranks = (lp > tgt_lp).sum(-1) + 1
            k = s.sampling_params.prompt_logprobs
            top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], targets[:, None][:, :0])
            ids = torch.cat([targets[:, None], top_ids], 1).tolist()
            vals = torch.cat([tgt_lp, top_lp], 1).tolist()
            out[s.req_id] = [(a, b, r) for a, b, r in zip(ids, vals, ranks.tolist())]
        return out

    def _sampling_metadata(self, rows: list[CachedRequestState]) -> SamplingMetadata:
        """The step's sampling metadata; the previous step's when the same requests sample in the
        same order and nothing in it changes per step (seeded generators, blocked ids).
        Penalties read the rows' token lists by reference, so they stay current."""
        key = (self.states.version, [s.req_id for s in rows])
        if self._meta_cache is not None and self._meta_cache[0] == key:
            return self._meta_cache[1]
        meta = self._build_sampling_metadata(rows)
        reusable = (
            not meta.generators
            and not meta.blocked
            and meta.grammar is None
            and not any(s.sampling_params.bad_words_token_ids for s in rows)
        )
        self._meta_cache = (key, meta) if reusable else None
        return meta

    def _build_sampling_metadata(self, rows: list[CachedRequestState]) -> SamplingMetadata:
        params = [s.sampling_params for s in rows]
        generators = {}
        for i, (s, p) in enumerate(zip(rows, params)):
            if p.seed is not None and not p.is_greedy:
                # Seeded per output position: the same tokens whatever the batch or preemptions.
                g = torch.Generator(device=self.device)
                g.manual_seed((p.seed * _SEED_MIX + len(s.token_ids) - s.num_prompt_tokens) % (1 << 63))
                generators[i] = g
        return build_sampling_metadata(
            params,
            [s.prompt_token_ids for s in rows],
            [s.output_token_ids for s in rows],
            generators,
            self.vocab_size,
            self.device,
            self.grammars.bitmask(rows),
        )
