"""Architecture name (config.json ``architectures``) -> model class."""

from __future__ import annotations

from torch import nn

from distgen.models.gemma2 import Gemma2ForCausalLM
from distgen.models.gemma3 import Gemma3ForCausalLM
from distgen.models.llama import LlamaForCausalLM
from distgen.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from distgen.models.opt import OPTForCausalLM
from distgen.models.phi3 import Phi3ForCausalLM
from distgen.models.qwen2 import Qwen2ForCausalLM
from distgen.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def resolve_model_class(architectures: list[str] | None) -> type[nn.Module]:
    for arch in architectures or []:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(
        f"model architecture {architectures!r} is not supported; supported architectures: "
        f"{', '.join(sorted(MODELS))}"
    )
