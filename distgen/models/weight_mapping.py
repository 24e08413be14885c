"""Checkpoint names -> parameters: the one loop every model's ``load_weights`` shares."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from distgen.layers.weights import LoadedWeight, default_weight_loader


def load_hf_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, LoadedWeight]],
    strip_prefixes: tuple[str, ...],
    stacked: dict[str, tuple[str, object]],
    tied: bool,
) -> set[str]:
    """Copy Hugging Face-named ``weights`` into ``model``'s parameters; returns the names filled.

    ``strip_prefixes`` are dropped from the front of checkpoint names; ``stacked`` maps a name part
    (``"q_proj"``) to the fused parameter holding it and the shard id its ``weight_loader`` takes
    (``("qkv_proj", "q")``). ``lm_head.weight`` is skipped when the head is tied to the embedding.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, w in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        for prefix in strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name == "lm_head.weight" and tied:
            continue
        shard_id = None
        for src, (dst, sid) in stacked.items():
            if f".{src}." in name:
                name, shard_id = name.replace(f".{src}.", f".{dst}."), sid
                break
        if name not in params:
            raise ValueError(f"checkpoint weight {name!r} has no parameter in {type(model).__name__}")
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, w, shard_id)
        loaded.add(name)
    return loaded
