"""Offline throughput: distgen's ``LLM.generate`` against Hugging Face ``transformers`` ``generate``.

Both engines run in this process, one after the other, on the same random prompts and the same weights
(the default model, SmolLM2-135M-Instruct, dequantized from its GGUF file), greedy, ignoring EOS so every
request produces exactly its requested number of tokens. Only generation is timed (not loading), after a
short warm-up of each side. The figure to read is the distgen/HF ratio: absolute numbers on a shared
machine are noise.

Hugging Face runs in batches of ``--hf-batch-size`` requests, in request order, left-padded; each batch
decodes up to the longest output requested in it, and only the requested tokens of each request count.

Examples::

    .venv/bin/python benchmarks/throughput.py                      # 64 requests, float32, vs HF
    .venv/bin/python benchmarks/throughput.py --dtype bfloat16
    .venv/bin/python benchmarks/throughput.py --llamacpp-shape     # 64 x (32 prompt, 64 new) tokens
    .venv/bin/python benchmarks/throughput.py --skip-hf --num-requests 8 --profile /tmp/distgen.prof
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger("benchmarks.throughput")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class Result:
    engine: str
    num_requests: int
    output_tokens: int
    seconds: float
    outputs: list[list[int]]  # the requested tokens of each request, in request order

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------- workload


def special_token_ids(hf_config: dict, tokenizer) -> set[int]:
    """Ids to keep out of random prompts: the tokenizer's special and added tokens, bos/eos/pad."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf_config.get(key)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(i for i in v if isinstance(i, int))
    return ids


def make_requests(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: list[int], seed: int
) -> list[Request]:
    """``n`` requests with uniform random lengths (inclusive ranges) and random prompt tokens."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        o = rng.randint(*output_range)
        reqs.append(Request([rng.choice(vocab) for _ in range(p)], o))
    return reqs


# -------------------------------------------------------------------------------------------- distgen


def run_distgen(llm, requests: list[Request], profile: str | None = None) -> Result:
    from distgen import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    if prof is not None:
        prof.dump_stats(profile)
        logger.info(
            "cProfile of distgen's generate written to %s (read with `python -m pstats %s`)", profile, profile
        )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    for r, t in zip(requests, tokens, strict=True):
        if len(t) != r.max_tokens:
            raise RuntimeError(
                f"distgen returned {len(t)} tokens for a request of {r.max_tokens} "
                "(ignore_eos should make them equal)"
            )
    return Result("distgen", len(requests), sum(len(t) for t in tokens), seconds, tokens)


# ---------------------------------------------------------------------------------------- transformers


def build_hf_model(path: str, dtype: torch.dtype):
    """transformers' ``LlamaForCausalLM`` holding the GGUF file's weights, dequantized by distgen's reader.

    The weights are exactly those transformers' own GGUF loader produces (tests/model_loader/test_gguf.py
    checks that), without its requirement that ``accelerate`` be installed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from distgen.model_loader.gguf import read_gguf

    ckpt = read_gguf(path)
    if ckpt.hf_config.get("model_type") != "llama":
        raise ValueError(f"the HF baseline handles llama GGUF files only, not {ckpt.hf_config['model_type']}")
    cfg = {k: v for k, v in ckpt.hf_config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = model.load_state_dict(dict(ckpt.iter_weights()), strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.get("tie_word_embeddings") else set()
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(f"HF model load: missing {missing}, unexpected {unexpected}")
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(dtype).eval()
    gen = model.generation_config
    # Greedy, and no EOS: every row runs to max_new_tokens, like distgen's ignore_eos (which does not mask
    # EOS either, so the two engines can pick the same tokens). Padding, on the left, is EOS.
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    gen.pad_token_id = cfg.get("eos_token_id")
    gen.eos_token_id = None
    return model


@torch.inference_mode()
def hf_generate_batch(model, batch: list[Request], pad_id: int) -> list[list[int]]:
    """One left-padded batch, decoded to its longest requested output; returns each request's tokens."""
    width = max(len(r.prompt_token_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        input_ids[i, width - n :] = torch.tensor(r.prompt_token_ids)
        mask[i, width - n :] = 1
    new = max(r.max_tokens for r in batch)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new)
    gen = out[:, width:]
    if gen.shape[1] != new:
        raise RuntimeError(f"HF generated {gen.shape[1]} tokens for a batch asking {new}")
    return [gen[i, : r.max_tokens].tolist() for i, r in enumerate(batch)]


def run_hf(model, requests: list[Request], batch_size: int, pad_id: int) -> Result:
    gc.collect()
    t0 = time.perf_counter()
    tokens: list[list[int]] = []
    for i in range(0, len(requests), batch_size):
        tokens.extend(hf_generate_batch(model, requests[i : i + batch_size], pad_id))
    seconds = time.perf_counter() - t0
    return Result(
        f"HF transformers (batch {batch_size})", len(requests), sum(len(t) for t in tokens), seconds, tokens
    )


# --------------------------------------------------------------------------------------------- report


def print_report(results: list[Result], args: argparse.Namespace, requests: list[Request]) -> None:
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    print()
    print(
        f"model: SmolLM2-135M-Instruct (GGUF, dequantized)  dtype: {args.dtype}  "
        f"torch threads: {torch.get_num_threads()}  seed: {args.seed}  distgen tp: {args.tp} "
        f"({args.backend or ('uni' if args.tp == 1 else 'mp')})"
    )
    print(
        f"workload: {len(requests)} requests, prompt {args.min_prompt_len}-{args.max_prompt_len} tokens "
        f"({prompt_tokens} in all), output {args.min_output_len}-{args.max_output_len} tokens, "
        "greedy, ignore_eos"
    )
    name_w = max(len("engine"), *(len(r.engine) for r in results))
    header = (
        f"{'engine':<{name_w}}  {'requests':>8}  {'output tokens':>13}  {'seconds':>8}  {'output tok/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.engine:<{name_w}}  {r.num_requests:>8}  {r.output_tokens:>13}  {r.seconds:>8.2f}  "
            f"{r.tok_per_s:>12.1f}"
        )
    if len(results) == 2:
        dg, hf = results
        print(f"ratio distgen/HF (output tok/s): {dg.tok_per_s / hf.tok_per_s:.2f}x")
        same = sum(a == b for a, b in zip(dg.outputs, hf.outputs, strict=True))
        print(f"greedy agreement: {same}/{len(requests)} requests produced identical tokens in both engines")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Offline generation throughput of distgen against Hugging Face transformers, on the "
        "default model (SmolLM2-135M-Instruct), same prompts and weights, in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--num-requests", type=int, default=64, help="number of requests")
    ap.add_argument("--min-prompt-len", type=int, default=16, help="shortest prompt (tokens)")
    ap.add_argument("--max-prompt-len", type=int, default=512, help="longest prompt (tokens)")
    ap.add_argument("--min-output-len", type=int, default=16, help="fewest output tokens of a request")
    ap.add_argument("--max-output-len", type=int, default=256, help="most output tokens of a request")
    ap.add_argument(
        "--llamacpp-shape",
        action="store_true",
        help="llama.cpp's batched-bench shape: 64 requests of 32 prompt and 64 new tokens "
        "(overrides the four length flags and --num-requests)",
    )
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both engines")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="requests per transformers generate call")
    ap.add_argument(
        "--tp",
        type=int,
        default=1,
        help="distgen's tensor_parallel_size (SmolLM2: 1, 3 or 9: it has 9 heads)",
    )
    ap.add_argument(
        "--backend",
        choices=["uni", "mp", "ray"],
        default=None,
        help="distgen's distributed_executor_backend (default: uni for --tp 1, mp above)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths")
    ap.add_argument("--skip-hf", action="store_true", help="run distgen only")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for both engines; None keeps torch's choice (one per "
        "core). On a machine shared with other busy processes, fewer threads than cores "
        "avoids OpenMP threads spinning while they wait on each other",
    )
    ap.add_argument(
        "--profile", metavar="PATH", default=None, help="write a cProfile of distgen's timed generate to PATH"
    )
    args = ap.parse_args(argv)
    if args.llamacpp_shape:
        args.num_requests = 64
        args.min_prompt_len = args.max_prompt_len = 32
        args.min_output_len = args.max_output_len = 64
    if args.num_requests < 1 or args.hf_batch_size < 1:
        ap.error("--num-requests and --hf-batch-size must be positive")
    if not 1 <= args.min_prompt_len <= args.max_prompt_len:
        ap.error("need 1 <= --min-prompt-len <= --max-prompt-len")
    if not 1 <= args.min_output_len <= args.max_output_len:
        ap.error("need 1 <= --min-output-len <= --max-output-len")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if torch.get_num_threads() > 1 and load > 0.5:
        logger.warning(
            "load average %.1f before start with %d torch threads: if other processes keep cores "
            "busy, every op can get many times slower; consider --threads 1",
            load,
            torch.get_num_threads(),
        )
    from distgen import LLM, SamplingParams
    from distgen.model_loader.gguf import default_model_path

    path = default_model_path()
    t0 = time.perf_counter()
    # The default model, the GGUF file at `path`.
    llm = LLM(dtype=args.dtype, tensor_parallel_size=args.tp, distributed_executor_backend=args.backend)
    logger.info("distgen loaded in %.1fs", time.perf_counter() - t0)
    hf_config = llm.llm_engine.config.model.hf_config
    bad = special_token_ids(hf_config, llm.get_tokenizer())
    vocab = [i for i in range(int(hf_config["vocab_size"])) if i not in bad]
    requests = make_requests(
        args.num_requests,
        (args.min_prompt_len, args.max_prompt_len),
        (args.min_output_len, args.max_output_len),
        vocab,
        args.seed,
    )
    # Warm-up prompts come from another seed, so they share no prefix (cache) with the measured ones.
    warmup = make_requests(2, (16, 16), (4, 4), vocab, args.seed + 1_000_003)

    logger.info("distgen: warm-up")
    llm.generate(
        [{"prompt_token_ids": r.prompt_token_ids} for r in warmup],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    logger.info("distgen: %d requests", len(requests))
    results = [run_distgen(llm, requests, args.profile)]
    logger.info("distgen: %.2fs", results[0].seconds)
    llm.shutdown()
    del llm
    gc.collect()

    if not args.skip_hf:
        t0 = time.perf_counter()
        model = build_hf_model(path, DTYPES[args.dtype])
        logger.info("transformers loaded in %.1fs", time.perf_counter() - t0)
        pad_id = int(hf_config["eos_token_id"])
        logger.info("transformers: warm-up")
        run_hf(model, warmup, args.hf_batch_size, pad_id)
        logger.info("transformers: %d requests in batches of %d", len(requests), args.hf_batch_size)
        results.append(run_hf(model, requests, args.hf_batch_size, pad_id))
        logger.info("transformers: %.2fs", results[1].seconds)

    print_report(results, args, requests)


if __name__ == "__main__":
    main()
