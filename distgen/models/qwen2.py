"""Qwen2: the Llama layout with biases on the q/k/v projections."""

from distgen.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
