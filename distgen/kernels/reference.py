"""The plain-torch implementation of each fused op: the path the layers take where no kernel runs, and
the reference the Triton and CPU kernels are tested against. One implementation per op, so the torch
path and the references cannot drift apart. Float32 math, rounded once to the input dtype, as the
kernels compute."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a merged ``[.., 2 * I]`` gate/up projection."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed).to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(x + residual), x + residual)``."""
    x = x + residual.to(x.dtype)
    return rmsnorm_ref(x, weight, eps), x


def rotate_ref(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``x`` [T, heads, D] rotated by ``positions`` [T] (NeoX "rotate half" layout), in float32:
    with ``x = cat(x1, x2)``, ``cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``; ``cos``/``sin`` are
    the caches ``[max_pos, D / 2]``."""
    c = cos[positions].float().unsqueeze(1)
    s = sin[positions].float().unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def moe_route_ref(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64): the softmax over the experts in float32, its
    ``top_k`` largest, renormalised to sum to one where the model asks for it."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The routed experts' weighted sum for each token of ``x`` [T, H], not reduced across ranks.

    ``w13`` [E, 2 * I, H] holds each expert's gate rows then its up rows, ``w2`` [E, H, I] its down
    projection; ``topk_weights``/``topk_ids`` [T, k] the routing. The (token, k) pairs are sorted by
    expert and each expert runs one gate/up GEMM, SiLU-and-mul and one down GEMM over its group; each
    result is scaled by its routing weight and added to its token's float32 sum, rounded once.
    ``expert_mlp(e, rows)``, where given, computes expert ``e``'s MLP on its rows in place of the
    GEMMs on ``w13``/``w2`` (the CPU path passes its packed GEMMs)."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // k
        if expert_mlp is None:
            y = F.linear(silu_and_mul_ref(F.linear(x[tokens], w13[e])), w2[e])
        else:
            y = expert_mlp(e, x[tokens])
        y = y.float() * topk_weights.reshape(-1)[pairs, None].float()
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)


def quant_linear_ref(x: torch.Tensor, qw, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a quantized weight (:class:`distgen.kernels.quant.QuantizedWeight`):
    dequantized to float32, then an ordinary product, rounded once to ``x``'s dtype."""
    from distgen.kernels.quant import dequantize

    w = dequantize(qw).to(x.device)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def quantize_activations_ref(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] quantized to int8 per block of 32 (scale max|x| / 127, round half to even) and
    back to float32: the activations the int8-activation kernel multiplies."""
    k = x.shape[-1]
    kp = -(-k // 32) * 32
    blocks = F.pad(x.float(), (0, kp - k)).reshape(*x.shape[:-1], kp // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(*x.shape[:-1], kp)[..., :k]


def quant_linear_int8_ref(x: torch.Tensor, qw, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`quant_linear_ref` on the int8-quantized activations (:func:`quantize_activations_ref`)."""
    return quant_linear_ref(quantize_activations_ref(x), qw, bias).to(x.dtype)
