"""Quantized checkpoints run quantized: the default model (GGUF Q4_1) against its float path, its
weight memory, tp 2 against tp 1, the shard check; and a safetensors int8 weight-only checkpoint
(compressed-tensors ``int-quantized``) against transformers on the dequantized weights."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from distgen import LLM, SamplingParams
from distgen.distributed import parallel_state as ps
from distgen.kernels.quant import QuantizedWeight
from distgen.model_loader.gguf import default_model_path
from distgen.model_loader.gguf_file import GGUFFile
from distgen.model_loader.loader import build_model, resolve_model
from tests.conftest import check_greedy_close, hf_greedy, random_prompts

MAX_NEW = 12
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village,",
    "List three primary colors:",
]


def _greedy(llm: LLM, prompts, logprobs: int | None = None):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=logprobs)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def float_refs():
    """The float32 path's greedy tokens on the default model and its top-5 at each step."""
    llm = LLM(dtype="float32", quantization="none", kv_cache_memory=64 << 20)
    outs = _greedy(llm, TEXTS, logprobs=5)
    llm.shutdown()
    top5 = [[sorted(d, key=lambda t: -d[t].logprob)[:5] for d in o.logprobs] for o in outs]
    return [(list(o.token_ids), t) for o, t in zip(outs, top5)]


@pytest.fixture(scope="module")
def quantized_tokens():
    llm = LLM(dtype="float32", kv_cache_memory=64 << 20)  # quantized: a GGUF file's default
    outs = _greedy(llm, TEXTS)
    llm.shutdown()
    return [list(o.token_ids) for o in outs]


def test_default_model_quantized_agrees_with_the_float_path(float_refs, quantized_tokens):
    """DESIGN.md's rule for a path that rounds differently: identical, or within the float path's
    top-5 at the first divergence; the exact-match rate is reported."""
    rate = check_greedy_close(float_refs, quantized_tokens, "smollm2/q4_1-vs-float32")
    print(f"Q4_1 kernels vs float32 (dequantized) greedy: {rate:.0%} of {len(TEXTS)} sequences identical")
    assert rate >= 0.5


def test_int8_activations_agree_with_the_float_path_by_the_top5_rule(float_refs, monkeypatch):
    """DISTGEN_QUANT_ACTIVATIONS=int8 (the VNNI kernel): a coarser path, held to the same rule."""
    monkeypatch.setenv("DISTGEN_QUANT_ACTIVATIONS", "int8")
    llm = LLM(dtype="float32", kv_cache_memory=64 << 20)
    got = [list(o.token_ids) for o in _greedy(llm, TEXTS)]
    llm.shutdown()
    rate = check_greedy_close(float_refs, got, "smollm2/q4_1-int8-activations-vs-float32")
    print(f"Q4_1 with int8 activations vs float32 greedy: {rate:.0%} of {len(TEXTS)} sequences identical")
    assert rate >= 0.5


@pytest.mark.slow
def test_tp2_quantized_gives_tp1_quantized_tokens(quantized_tokens):
    llm = LLM(
        dtype="float32", tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=64 << 20
    )
    got = [list(o.token_ids) for o in _greedy(llm, TEXTS)]
    llm.shutdown()
    assert got == quantized_tokens


def _weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_quantized_weights_take_the_files_bytes():
    """The linear layers hold the file's blocks, byte for byte (5 bits per Q4_1 weight); the model's
    weights are well under half the float32 model's (the float32 embedding, 108 MiB, stays)."""
    source = resolve_model(None)
    model = build_model(dataclasses.replace(source, quantization="gguf"), torch.float32, "cpu")
    layers = [m for m in model.modules() if getattr(m, "quant", None) is not None]
    assert len(layers) == 30 * 4  # qkv, o, gate_up, down of every layer
    assert all(m.weight.numel() == 0 and m.quant.fmt == "q4_1" for m in layers)
    tensors = GGUFFile(default_model_path()).tensors
    linear_bytes = sum(t.data.nbytes for t in tensors if t.name.startswith("blk.") and "norm" not in t.name)
    assert sum(m.quant.nbytes() for m in layers) == linear_bytes
    float_bytes = sum(4 * math.prod(t.shape) for t in tensors)  # every tensor dequantized to float32
    total = _weight_bytes(model)
    print(f"weights: float32 {float_bytes / 2**20:.0f} MiB, quantized {total / 2**20:.0f} MiB")
    assert total < 0.4 * float_bytes


def test_a_tp_size_whose_shards_cut_a_block_is_refused(monkeypatch):
    """tp 5: the MLP's 1536 inputs split 308/307..., not whole blocks of 32."""
    monkeypatch.setitem(ps._STATE, "tp", ps._TPGroup(0, 5, None))
    source = resolve_model(None)
    source = dataclasses.replace(source, quantization="gguf")
    with pytest.raises(ValueError, match="cuts a block"):
        build_model(source, torch.float32, "cpu")


# -- safetensors int8 weight-only --------------------------------------------------------------


def _int8_checkpoint(src: str, dst: str) -> str:
    """``src`` (a float checkpoint) quantized per output channel, in compressed-tensors'
    ``int-quantized`` layout; ``dst`` gets it, and ``dst``-float the dequantized float weights."""
    state = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in state.items():
        if name.endswith("_proj.weight"):
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            quantized[name], quantized[name + "_scale"] = q, scale.to(torch.bfloat16)
            dequantized[name] = q.float() * scale.to(torch.bfloat16).float()
        else:
            quantized[name] = dequantized[name] = w
    for d, tensors, qc in ((dst, quantized, True), (dst + "-float", dequantized, False)):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if f not in ("model.safetensors", "config.json"):
                with open(os.path.join(src, f), "rb") as a, open(os.path.join(d, f), "wb") as b:
                    b.write(a.read())
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        if qc:
            cfg["quantization_config"] = {
                "quant_method": "compressed-tensors",
                "format": "int-quantized",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                        "input_activations": None,
                    }
                },
                "ignore": ["lm_head"],
            }
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "model.safetensors"))
    return dst


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_weight_only_checkpoint_matches_transformers_on_its_dequantized_weights(
    tp, tiny_model_dir, tmp_path
):
    import transformers as tf

    path = _int8_checkpoint(tiny_model_dir("llama"), str(tmp_path / "int8"))
    ref_model = tf.AutoModelForCausalLM.from_pretrained(path + "-float", dtype=torch.float32).eval()
    prompts = random_prompts(4, seed=7)
    refs = hf_greedy(ref_model, prompts, MAX_NEW)
    kwargs = {"distributed_executor_backend": "mp"} if tp > 1 else {}
    llm = LLM(path, dtype="float32", tensor_parallel_size=tp, kv_cache_memory=16 << 20, **kwargs)
    got = [list(o.token_ids) for o in _greedy(llm, [{"prompt_token_ids": p} for p in prompts])]
    llm.shutdown()
    rate = check_greedy_close(refs, got, f"int8/tp{tp}")
    assert rate >= 0.75


def test_int8_layers_hold_int8(tiny_model_dir, tmp_path):
    path = _int8_checkpoint(tiny_model_dir("llama"), str(tmp_path / "int8"))
    source = resolve_model(path)
    source = dataclasses.replace(source, quantization="compressed-tensors")
    model = build_model(source, torch.float32, "cpu")
    quant = [m.quant for m in model.modules() if getattr(m, "quant", None) is not None]
    assert quant and all(isinstance(q, QuantizedWeight) and q.codes.dtype == torch.int8 for q in quant)
    with pytest.raises(ValueError, match="quantization='gguf', but the checkpoint holds compressed-tensors"):
        LLM(path, quantization="gguf")
