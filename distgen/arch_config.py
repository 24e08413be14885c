"""The model's architecture as one typed, frozen object, resolved once from config.json (or the dict a
GGUF file's metadata gives, model_loader/gguf_config.py).

Every default the models apply lives here, per family where families differ: the model code reads
:class:`ArchConfig` fields and never the raw dict. Families are keyed by architecture name: Gemma 2
and 3 tie their LM head and default to longer positions, OPT ties its head, Phi-3 reads LongRoPE and a
partial rotary, Gemma 3 has a second rotary for its sliding layers; every other architecture takes
Llama's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"

_FAMILY_OF = {
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "OPTForCausalLM": "opt",
}
_TIED_FAMILIES = frozenset({"gemma2", "gemma3", "opt"})
_GEMMA_FAMILIES = frozenset({"gemma2", "gemma3"})
# The rotary table's length where config.json gives no max_position_embeddings (OPT requires one).
_DEFAULT_POSITIONS = {"llama": 4096, "phi3": 4096, "gemma2": 8192, "gemma3": 32768}
# Gemma's older configs: every n-th layer attends fully, the others through the window.
_DEFAULT_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
# Model types whose ``sliding_window`` transformers applies to every layer (Mistral v0.1's 4096, Mixtral's,
# Phi-3's); others (Llama, Qwen2/3 without ``use_sliding_window``) carry the key but attend to everything.
_WINDOWED_MODEL_TYPES = frozenset({"mistral", "mixtral", "phi3"})


def family_of(architectures: list[str] | None) -> str:
    """The defaults family of the first architecture distgen knows apart, else Llama's."""
    for arch in architectures or []:
        if arch in _FAMILY_OF:
            return _FAMILY_OF[arch]
    return "llama"


def rope_settings(cfg: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(theta, scaling) from either generation of config.json: ``rope_theta`` and ``rope_scaling``
    (written by transformers 4), or one ``rope_parameters`` dict holding both (transformers 5)."""
    params = cfg.get("rope_parameters")
    if params:
        return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0), params
    return float(cfg.get("rope_theta") or 10000.0), cfg.get("rope_scaling")


def gemma3_rope(cfg: Mapping[str, Any], layer_type: str) -> tuple[float, dict | None]:
    """Gemma 3's (theta, scaling) of a layer type: the local base (``rope_local_base_freq``, 10000) on
    sliding layers, the global one (``rope_theta``, 1e6, with its ``rope_scaling``) on full layers;
    transformers 5 writes both in ``rope_parameters``, one dict per layer type."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):
        p = params[layer_type]
        return float(p.get("rope_theta") or (10000.0 if layer_type == SLIDING else 1e6)), p
    if layer_type == SLIDING:
        return float(cfg.get("rope_local_base_freq") or 10000.0), None
    return float(cfg.get("rope_theta") or 1e6), cfg.get("rope_scaling")


def phi3_rope(cfg: Mapping[str, Any], head_dim: int) -> tuple[float, dict | None, int]:
    """(theta, scaling, rotary_dim) as transformers' Phi3Config reads them: ``su`` and ``yarn`` mean
    longrope, ``original_max_position_embeddings`` may sit beside ``rope_scaling``, and
    ``partial_rotary_factor`` inside ``rope_parameters`` or at the top level."""
    theta, scaling = rope_settings(cfg)
    scaling = dict(scaling) if scaling else {}
    partial = float(scaling.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or (head_dim - rotary_dim) % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"partial_rotary_factor {partial} gives an odd rotary dim of head_dim {head_dim}")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type in ("su", "yarn", "longrope"):
        scaling["rope_type"] = "longrope"
        original = cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 4096)
        scaling.setdefault("original_max_position_embeddings", original)
    return theta, (scaling or None), rotary_dim


def layer_types(num_layers: int, types: list[str] | None, pattern: int) -> tuple[str, ...]:
    """Each layer's attention, ``sliding_attention`` or ``full_attention``: the config's ``layer_types``
    (transformers 5), else every ``pattern``-th layer full and the others sliding."""
    if types is None:
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise ValueError(
            f"layer_types must name {SLIDING!r} or {FULL!r} for each of {num_layers} layers: {types}"
        )
    return tuple(types)


def uniform_sliding_window(cfg: Mapping[str, Any]) -> int | None:
    """The window every layer attends through, or None; ValueError for ``use_sliding_window`` (Qwen's
    per-layer windows past ``max_window_layers``, which distgen does not run)."""
    if cfg.get("use_sliding_window"):
        raise ValueError(
            f"use_sliding_window is not supported for {(cfg.get('architectures') or ['this model'])[0]}"
        )
    window = cfg.get("sliding_window")
    if window is None or cfg.get("model_type") not in _WINDOWED_MODEL_TYPES:
        return None
    if int(window) < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {window}")
    return int(window)


def _required_int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if value is None:
        raise ValueError(f"the model's config lacks {key}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{key} must be at least 1, got {value!r}")
    return number


def _first_given(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class ArchConfig:
    """What the models read of a checkpoint's config, every default applied (see :meth:`from_hf`)."""

    architecture: str  # config.json's first ``architectures`` entry ("?" where none is listed)
    family: str  # whose defaults apply: "llama", "phi3", "gemma2", "gemma3" or "opt"
    model_type: str | None
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int | None  # the dense MLP's width (OPT's is ``ffn_dim``)
    hidden_act: str | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int | None  # as the config gives it
    rotary_positions: int  # the rotary table's length: the config's, else the family's default
    # Rotary: theta and scaling of the (full-attention) layers, the turning dims of each head, and
    # Gemma 3's sliding layers' own base (the same as the others' in every other family).
    rope_theta: float
    rope_scaling: dict | None
    rotary_dim: int
    sliding_rope_theta: float
    sliding_rope_scaling: dict | None
    attention_bias: bool
    mlp_bias: bool
    o_bias: bool
    qkv_bias: bool  # Qwen2-MoE's switch (its q/k/v always have biases)
    # Llama-like families: the window every layer attends through; Gemma: its sliding layers' window.
    sliding_window: int | None
    layer_types: tuple[str, ...] | None  # Gemma: each layer's attention, SLIDING or FULL
    use_bidirectional_attention: bool
    query_pre_attn_scalar: float | None
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    # Mixture of experts (0 experts: a dense model)
    num_experts: int
    num_experts_per_tok: int | None
    moe_intermediate_size: int | None
    shared_expert_intermediate_size: int | None
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    # OPT (other families carry OPT's defaults here, unread)
    ffn_dim: int | None
    enable_bias: bool
    activation_function: str
    do_layer_norm_before: bool
    layer_norm_elementwise_affine: bool
    word_embed_proj_dim: int
    remove_final_layer_norm: bool

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], family: str | None = None) -> ArchConfig:
        """Resolve config.json's ``cfg``; ``family`` (a model class's own) overrides the one its
        ``architectures`` name. ValueError naming the field for a missing or inconsistent value."""
        family = family or family_of(cfg.get("architectures"))
        hidden = _required_int(cfg, "hidden_size")
        num_layers = _required_int(cfg, "num_hidden_layers")
        heads = _required_int(cfg, "num_attention_heads")
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        given_positions = _opt_int(cfg.get("max_position_embeddings"))
        if family == "opt" and given_positions is None:
            raise ValueError("the model's config lacks max_position_embeddings")
        positions = _DEFAULT_POSITIONS.get(family, 0) if given_positions is None else given_positions
        gemma = family in _GEMMA_FAMILIES
        rope = _rope_fields(cfg, family, head_dim)
        if gemma:
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
            window = _opt_int(cfg.get("sliding_window"))
            pattern = int(cfg.get("sliding_window_pattern") or _DEFAULT_SLIDING_PATTERN[family])
            types: tuple[str, ...] | None = layer_types(num_layers, cfg.get("layer_types"), pattern)
        else:
            act = cfg.get("hidden_act", "silu")
            window = None if family == "opt" else uniform_sliding_window(cfg)
            types = None
        return cls(
            architecture=(cfg.get("architectures") or ["?"])[0],
            family=family,
            model_type=cfg.get("model_type"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_required_int(cfg, "vocab_size"),
            intermediate_size=_opt_int(cfg.get("intermediate_size")),
            hidden_act=act,
            rms_norm_eps=float(_first_given(cfg, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family in _TIED_FAMILIES)),
            max_position_embeddings=given_positions,
            rotary_positions=positions,
            **rope,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            o_bias=bool(cfg.get("o_bias", False)),
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            sliding_window=window,
            layer_types=types,
            use_bidirectional_attention=bool(cfg.get("use_bidirectional_attention")),
            query_pre_attn_scalar=_opt_float(cfg.get("query_pre_attn_scalar")),
            attn_logit_softcapping=_opt_float(cfg.get("attn_logit_softcapping")),
            final_logit_softcapping=_opt_float(cfg.get("final_logit_softcapping")),
            **_moe_fields(cfg),
            **_opt_fields(cfg, hidden),
        )

    def require(self, name: str) -> Any:
        """A field the model at hand cannot do without; ValueError where the config leaves it out."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the model's config lacks {name}, which {self.architecture} needs")
        return value

    @property
    def active_mlp_width(self) -> int:
        """The MLP features a token runs through: a mixture of experts' ``top_k`` experts (plus a shared
        expert), or the dense intermediate size."""
        dense = self.intermediate_size or 4 * self.hidden_size
        if not self.num_experts:
            return dense
        expert = self.moe_intermediate_size or dense
        return (self.num_experts_per_tok or 1) * expert + (self.shared_expert_intermediate_size or 0)

    @property
    def long_rope_original(self) -> int | None:
        """LongRoPE's original length (Phi-3), past which a prompt is rotated with the long factors
        from its first token on (see :class:`distgen.layers.rotary.LongRopeSwitch`); else None."""
        scaling = self.rope_scaling
        if self.family != "phi3" or not scaling or scaling.get("rope_type") != "longrope":
            return None
        return int(scaling["original_max_position_embeddings"])

    def rope_of(self, layer_type: str = FULL) -> tuple[float, dict | None]:
        """(theta, scaling) of the layers of ``layer_type``."""
        if layer_type == SLIDING:
            return self.sliding_rope_theta, self.sliding_rope_scaling
        return self.rope_theta, self.rope_scaling


def arch_of(cfg: ArchConfig | Mapping[str, Any], family: str) -> ArchConfig:
    """``cfg`` as an :class:`ArchConfig`: a config.json dict is resolved with ``family``'s defaults."""
    return cfg if isinstance(cfg, ArchConfig) else ArchConfig.from_hf(cfg, family)


def _rope_fields(cfg: Mapping[str, Any], family: str, head_dim: int) -> dict[str, Any]:
    rotary_dim = head_dim
    if family == "phi3":
        theta, scaling, rotary_dim = phi3_rope(cfg, head_dim)
        local = (theta, scaling)
    elif family == "gemma3":
        theta, scaling = gemma3_rope(cfg, FULL)
        local = gemma3_rope(cfg, SLIDING)
    else:
        theta, scaling = rope_settings(cfg)
        local = (theta, scaling)
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_dim=rotary_dim,
        sliding_rope_theta=local[0],
        sliding_rope_scaling=local[1],
    )


def _moe_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
        num_experts_per_tok=_opt_int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=_opt_int(cfg.get("moe_intermediate_size")),
        shared_expert_intermediate_size=_opt_int(cfg.get("shared_expert_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def _opt_fields(cfg: Mapping[str, Any], hidden: int) -> dict[str, Any]:
    return dict(
        ffn_dim=_opt_int(cfg.get("ffn_dim")),
        enable_bias=bool(cfg.get("enable_bias", True)),
        activation_function=cfg.get("activation_function", "relu"),
        do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
        layer_norm_elementwise_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
        word_embed_proj_dim=int(cfg.get("word_embed_proj_dim") or hidden),
        remove_final_layer_norm=bool(cfg.get("_remove_final_layer_norm", False)),
    )
