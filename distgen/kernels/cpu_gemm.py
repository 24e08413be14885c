"""Linear layers on the CPU with their weights packed once, at load, for oneDNN.

A plain ``F.linear`` hands the weight to the BLAS, which repacks it into its blocked layout on
every call: for the small activations of decode steps that repacking costs as much as the product.
oneDNN's reorder does it once (``torch.ops.mkldnn._reorder_linear_weight``, the op PyTorch
inductor's CPU freezing pass uses); the packed weight is an opaque oneDNN tensor that
``torch.ops.mkldnn._linear_pointwise`` multiplies directly, with AVX-512 / AVX-512-BF16 / AMX where
the CPU has them. Packing for a batch of 64 rows serves every batch size about as well as packing for
each (measured from 1 to 1024 rows on the default model's shapes).
"""

from __future__ import annotations

import torch

PACK_BATCH_HINT = 64


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] packed for :func:`linear`, or None where oneDNN cannot take it."""
    if not available() or weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with W packed by :func:`pack`; x [..., in] of W's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
