"""Quantized weights against the float paths on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF):
decode tok/s of one stream, tok/s of a batch, and weight memory, for float32 and bfloat16 (the file
dequantized at load) and each quantized format; llama.cpp on the same file where llama-cpp-python is
installed (``--llamacpp-python``, a venv's python).

    .venv/bin/python benchmarks/quantized.py
    .venv/bin/python benchmarks/quantized.py --llamacpp-python /work/llamacpp-venv/bin/python

The file holds Q4_1 only; the Q8_0 and Q4_0 rows re-quantize its weights to those formats at load (the
kernels' speed and memory on the same shapes; their tokens say nothing about those formats' quality).
The engine core runs in this process (``DISTGEN_ENABLE_MULTIPROCESSING=0``) so that the re-quantizing
hook reaches the loader. Every row is one warm-up and one timed run, one after the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("DISTGEN_ENABLE_MULTIPROCESSING", "0")

import torch  # noqa: E402

from distgen import LLM, SamplingParams  # noqa: E402
from distgen.kernels import quant  # noqa: E402
from distgen.model_loader import gguf  # noqa: E402
from distgen.model_loader.gguf import default_model_path  # noqa: E402
from distgen.model_loader.loader import build_model, resolve_model  # noqa: E402


def requantize(w: quant.QuantizedWeight, fmt: str) -> quant.QuantizedWeight:
    """``w`` dequantized and quantized again to ``fmt`` (round to nearest, ggml's Q8_0/Q4_0 scales)."""
    x = quant.dequantize(w)
    n, k = x.shape
    blocks = x.reshape(n, k // quant.BLOCK, quant.BLOCK)
    out = quant.QuantizedWeight.empty(fmt, n, k)
    if fmt == "q8_0":
        d = blocks.abs().amax(-1) / 127
        q = torch.round(blocks / d.clamp(min=1e-12).unsqueeze(-1)).clamp(-127, 127)
        out.codes.copy_(q.reshape(n, k).to(torch.int8))
    else:  # q4_0: d = max / -8 of the value of largest magnitude, as ggml
        idx = blocks.abs().argmax(-1, keepdim=True)
        d = blocks.gather(-1, idx).squeeze(-1) / -8
        q = torch.round(blocks / d.where(d != 0, 1.0).unsqueeze(-1) + 8).clamp(0, 15).to(torch.uint8)
        out.codes.copy_((q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2))
    out.scales.copy_(d.to(torch.float16))
    return out


def install_requantizing_hook(fmt: str) -> None:
    original = gguf.GGUFCheckpoint._convert

    def convert(self, tensor, hf_name, quantized):
        w = original(self, tensor, hf_name, quantized)
        return requantize(w, fmt) if isinstance(w, quant.QuantizedWeight) else w

    gguf.GGUFCheckpoint._convert = convert


def weight_mib(quantization: str | None, dtype: torch.dtype) -> float:
    source = dataclasses.replace(resolve_model(None), quantization=quantization)
    model = build_model(source, dtype, "cpu")
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def run_distgen(label: str, quantization: str, dtype: str, args) -> dict:
    llm = LLM(dtype=dtype, quantization=quantization, max_model_len=1024, seed=0)
    g = torch.Generator().manual_seed(0)
    one = [{"prompt_token_ids": torch.randint(3, 49000, (16,), generator=g).tolist()}]
    batch = [{"prompt_token_ids": torch.randint(3, 49000, (32,), generator=g).tolist()} for _ in range(16)]
    p_one = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    p_batch = SamplingParams(temperature=0, max_tokens=args.batch_tokens, ignore_eos=True)
    llm.generate(one, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    t = time.perf_counter()
    one_out = llm.generate(one, p_one, use_tqdm=False)
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(batch, p_batch, use_tqdm=False)
    batch_s = time.perf_counter() - t
    llm.shutdown()
    return {
        "engine": label,
        "decode_tok_s": args.decode_tokens / one_s,
        "batch_tok_s": 16 * args.batch_tokens / batch_s,
        "tokens": list(one_out[0].outputs[0].token_ids),
    }


_LLAMACPP = """
import json, sys, time
from llama_cpp import Llama
path, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
prompt = list(range(100, 116))
llm.eval(prompt); llm.reset()
t = time.perf_counter()
toks = []
for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
    toks.append(tok)
    if len(toks) == n:
        break
print(json.dumps({"decode_tok_s": n / (time.perf_counter() - t)}))
"""


def run_llamacpp(python: str, args) -> dict | None:
    proc = subprocess.run(
        [
            python,
            "-c",
            _LLAMACPP,
            default_model_path(),
            str(args.decode_tokens),
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        print(f"llama.cpp failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return {"engine": "llama.cpp (Q4_1 file)", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the one-stream run")
    ap.add_argument("--batch-tokens", type=int, default=64, help="new tokens of each of the 16 requests")
    ap.add_argument("--llamacpp-python", default=None, help="a python with llama-cpp-python installed")
    ap.add_argument("--only", default=None, help="comma-separated row labels to run")
    args = ap.parse_args()
    rows = [
        ("float32", "none", "float32", None),
        ("bfloat16", "none", "bfloat16", None),
        ("q4_1", "gguf", "float32", None),
        ("q4_1 bf16-act", "gguf", "bfloat16", None),
        ("q8_0", "gguf", "float32", "q8_0"),
        ("q4_0", "gguf", "float32", "q4_0"),
    ]
    only = set(args.only.split(",")) if args.only else None
    results = []
    original = gguf.GGUFCheckpoint._convert
    for label, quantization, dtype, requant in rows:
        if only and label not in only:
            continue
        gguf.GGUFCheckpoint._convert = original
        if requant:
            install_requantizing_hook(requant)
        qz = None if quantization == "none" else quantization
        mib = weight_mib(qz, getattr(torch, dtype))
        r = run_distgen(label, quantization, dtype, args)
        r["weights_mib"] = mib
        results.append(r)
        print(
            f"{label:16s} decode {r['decode_tok_s']:7.1f} tok/s  batch 16x{args.batch_tokens} "
            f"{r['batch_tok_s']:7.1f} tok/s  weights {mib:6.0f} MiB",
            flush=True,
        )
    gguf.GGUFCheckpoint._convert = original
    if args.llamacpp_python:
        r = run_llamacpp(args.llamacpp_python, args)
        if r:
            results.append(r)
            print(f"{r['engine']:16s} decode {r['decode_tok_s']:7.1f} tok/s", flush=True)
    base = next((r for r in results if r["engine"] == "float32"), None)
    if base:
        for r in results:
            if r is not base and "tokens" in r:
                same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
                print(
                    f"{r['engine']:16s} decode x{r['decode_tok_s'] / base['decode_tok_s']:.2f} of float32, "
                    f"batch x{r['batch_tok_s'] / base['batch_tok_s']:.2f}; "
                    f"one-stream tokens equal to float32's: {same}/{len(base['tokens'])}"
                )


if __name__ == "__main__":
    main()
