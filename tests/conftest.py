"""Shared fixtures: tiny random-weight models of each architecture, saved as Hugging Face directories,
and greedy references computed by ``transformers`` on the same weights."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt"]
VOCAB = 49152  # the SmolLM2 tokenizer's, saved beside every tiny model
PHI3_ORIGINAL_MAX = 32  # the tiny phi3's original_max_position_embeddings (LongRoPE's switch)


def _tiny_config(arch: str, layers: int = 2):
    import transformers as tf

    if arch.endswith("-4l"):  # enough layers for 3 and 4 pipeline stages
        return _tiny_config(arch[:-3], 4)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return tf.LlamaConfig(
            **common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
        )
    if arch == "llama-gqa3":  # groups of 3 query heads: uneven TP splits start ranks inside a group
        return tf.LlamaConfig(
            **{**common, "num_attention_heads": 6, "hidden_size": 96},
            intermediate_size=120,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    if arch == "mistral":
        return tf.MistralConfig(
            **common,
            intermediate_size=128,
            num_key_value_heads=1,
            sliding_window=None,
            tie_word_embeddings=False,
        )
    if arch == "qwen2":
        return tf.Qwen2Config(
            **common,
            intermediate_size=128,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            use_sliding_window=False,
        )
    if arch == "qwen3":
        return tf.Qwen3Config(
            **common,
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if arch == "phi3":
        # LongRoPE over the 12 turning dims of 16 (Phi-4-mini's partial rotary 0.75): 6 factors each,
        # and an original length of 32 that prompts and decodes in tests cross.
        return tf.Phi3Config(
            **common,
            intermediate_size=128,
            num_key_value_heads=2,
            original_max_position_embeddings=PHI3_ORIGINAL_MAX,
            partial_rotary_factor=0.75,
            rope_scaling=dict(
                type="longrope",
                short_factor=[1.0, 1.05, 1.1, 1.2, 1.3, 1.5],
                long_factor=[1.0, 1.5, 3.0, 6.0, 12.0, 32.0],
            ),
            sliding_window=None,
            tie_word_embeddings=False,
            pad_token_id=0,
        )
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=1024,
            word_embed_proj_dim=64,
            init_std=0.1,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    raise ValueError(arch)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from distgen.model_loader.gguf import default_model_path, read_gguf

    return read_gguf(default_model_path()).load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """``tiny_model_dir(arch)`` -> path of a saved tiny random model (built once per session)."""
    import transformers as tf

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            model.save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir):
    """``hf_reference(arch, prompts, max_new)`` -> transformers' greedy continuations (see ``hf_greedy``),
    computed once per session for each (arch, prompts, max_new)."""
    import transformers as tf

    cache: dict = {}

    def get(arch: str, prompts: list[list[int]], max_new: int):
        key = (arch, tuple(map(tuple, prompts)), max_new)
        if key not in cache:
            model = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
            cache[key] = hf_greedy(model, prompts, max_new)
        return cache[key]

    return get


def random_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_greedy(
    model, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[list[int], list[list[int]]]]:
    """Greedy continuation of each prompt by the transformers model (one at a time, no padding, its own
    KV cache, never stopping at EOS) and the top-5 ids at each step."""
    out = []
    with torch.inference_mode():
        for p in prompts:
            res = model(torch.tensor([p]), use_cache=True)
            toks, top5 = [], []
            for _ in range(max_new_tokens):
                logits = res.logits[0, -1].float()
                t = int(logits.argmax())
                toks.append(t)
                top5.append(logits.topk(5).indices.tolist())
                res = model(torch.tensor([[t]]), past_key_values=res.past_key_values, use_cache=True)
            out.append((toks, top5))
    return out


def process_alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until none of ``pids`` runs; returns those still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if process_alive(p)]


def assert_engine_idle_and_empty(llm) -> None:
    """No request left in the engine core and every KV block back in the free list (no leak)."""
    st = llm.llm_engine.get_stats()
    assert (st.num_running, st.num_waiting) == (0, 0)
    assert st.kv_cache_usage == 0.0, f"{st.kv_cache_usage:.1%} of the KV cache is still held"


def check_greedy_close(refs, outputs, tag: str = "") -> float:
    """DESIGN.md's rule: identical tokens, or at the first divergence our token is in the reference's
    top-5 there (a float near-tie flip; the rest of that sequence is not compared). Returns the
    exact-match rate (sequences identical to the reference)."""
    exact = 0
    for i, ((ref, top5), ours) in enumerate(zip(refs, outputs)):
        assert len(ours) == len(ref), f"{tag} prompt {i}: {len(ours)} tokens, reference has {len(ref)}"
        for j, (a, b) in enumerate(zip(ref, ours)):
            if a != b:
                assert b in top5[j], (
                    f"{tag} prompt {i}: token {j} is {b}, reference {a}; not in the reference top-5 {top5[j]}"
                )
                break
        else:
            exact += 1
    rate = exact / len(refs)
    print(f"[{tag}] exact-match rate {rate:.2%} ({exact}/{len(refs)})")
    return rate


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        # Triton kernels run in the interpreter on a CPU-only machine; set before anything imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
