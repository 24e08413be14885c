"""Qwen3: the Llama layout with an RMSNorm over each query and key head before rotary."""

from distgen.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
