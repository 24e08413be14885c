"""Quantized linear weights kept in their block format, for the dequantize-in-GEMM kernels.

Formats (``QuantizedWeight.fmt``), each with the bits per weight of its checkpoint:

- ``q8_0`` (GGUF Q8_0, 8.5 bits): ``codes`` int8 ``[N, K]``, ``scales`` float16 ``[N, K / 32]``;
  weight = d * q.
- ``q4_0`` (GGUF Q4_0, 4.5 bits): ``codes`` uint8 ``[N, K / 2]``, ``scales`` float16 ``[N, K / 32]``;
  weight = d * (q - 8).
- ``q4_1`` (GGUF Q4_1, 5 bits): as ``q4_0`` plus ``mins`` float16 ``[N, K / 32]``; weight = d * q + m.
- ``int8`` (safetensors int8 weight-only, per output channel, 8 bits): ``codes`` int8 ``[N, K]``,
  ``scales`` float32 ``[N, 1]``; weight = s * q.

The 4-bit codes keep ggml's order inside each block of 32: byte j of a block holds element j in its
low nibble and element j + 16 in its high nibble, so a GGUF tensor's blocks are split into codes and
scales without touching a nibble. Rows of codes are padded with zeros to whole blocks of 32 (only an
``int8`` weight can have a K that is not already a multiple of 32).

Tensor-parallel shards cut the output rows anywhere and the input columns only between blocks
(:meth:`QuantizedWeight.narrow`), so every rank multiplies whole blocks with their own scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
FORMATS = ("q8_0", "q4_0", "q4_1", "int8")
# The C++ kernel's format numbers (csrc/quant_gemm.cpp).
FORMAT_ID = {name: i for i, name in enumerate(FORMATS)}
# GGUF tensor type name -> format, for the types kept quantized.
GGUF_FORMATS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


def padded(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


@dataclass
class QuantizedWeight:
    """A linear weight ``[out_features, in_features]`` in one of :data:`FORMATS` (see the module doc)."""

    fmt: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def group(self) -> int:
        """Input columns sharing one scale: a block of 32, or the whole row for ``int8``."""
        return self.in_features if self.fmt == "int8" else BLOCK

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.mins) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @classmethod
    def empty(cls, fmt: str, n: int, k: int, device: torch.device | str = "cpu") -> QuantizedWeight:
        check_format(fmt)
        kp = padded(k)
        if fmt != "int8" and k % BLOCK:
            raise ValueError(f"{fmt} weights need whole blocks of {BLOCK} input features, got {k}")
        code_cols, code_dtype = (kp // 2, torch.uint8) if fmt.startswith("q4") else (kp, torch.int8)
        codes = torch.zeros(n, code_cols, dtype=code_dtype, device=device)
        if fmt == "int8":
            scales = torch.zeros(n, 1, dtype=torch.float32, device=device)
        else:
            scales = torch.zeros(n, kp // BLOCK, dtype=torch.float16, device=device)
        mins = torch.zeros_like(scales) if fmt == "q4_1" else None
        return cls(fmt, codes, scales, mins, n, k)

    # -- shards -------------------------------------------------------------------------------
    def narrow(self, dim: int, start: int, size: int) -> QuantizedWeight:
        """Rows (``dim`` 0: output features) or columns (``dim`` 1: input features) ``start ..
        start + size``. Columns of a block format must start and end on block boundaries.

        Raises:
            ValueError: for a column range that cuts a quantization block.
        """
        if dim == 0:
            parts = [t.narrow(0, start, size) for t in self.tensors()]
            return self._with(parts, size, self.in_features)
        if self.fmt == "int8":
            codes = self.codes[:, start : start + size]
            kp = padded(size)
            if kp != size:
                codes = torch.nn.functional.pad(codes, (0, kp - size))
            return QuantizedWeight("int8", codes, self.scales, None, self.out_features, size)
        end = start + size
        if start % BLOCK or end % BLOCK:
            raise ValueError(
                f"a {self.fmt} weight is quantized in blocks of {BLOCK} input features: the shard "
                f"{start}..{end} of its {self.in_features} columns cuts a block (pick a tensor-parallel "
                "size whose shards are whole blocks)"
            )
        per_byte = 2 if self.fmt.startswith("q4") else 1
        codes = self.codes[:, start // per_byte : end // per_byte]
        scales = self.scales[:, start // BLOCK : end // BLOCK]
        mins = None if self.mins is None else self.mins[:, start // BLOCK : end // BLOCK]
        return QuantizedWeight(self.fmt, codes, scales, mins, self.out_features, size)

    def _with(self, parts: list[torch.Tensor], n: int, k: int) -> QuantizedWeight:
        mins = parts[2] if self.mins is not None else None
        return QuantizedWeight(self.fmt, parts[0], parts[1], mins, n, k)

    def copy_rows_(self, offset: int, src: QuantizedWeight, what: str) -> None:
        """Copy ``src`` into rows ``offset ..`` of this weight (same format and width)."""
        if src.fmt != self.fmt or src.in_features != self.in_features:
            raise ValueError(
                f"weight {what}: a {src.fmt} part of width {src.in_features} does not fit a {self.fmt} "
                f"weight of width {self.in_features}"
            )
        if offset + src.out_features > self.out_features:
            raise ValueError(f"weight {what}: rows {offset}+{src.out_features} exceed {self.out_features}")
        with torch.no_grad():
            for dst, part in zip(self.tensors(), src.tensors()):
                dst.narrow(0, offset, src.out_features).copy_(part)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized weight format {fmt!r} (known: {', '.join(FORMATS)})")


def from_ggml_blocks(fmt: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor's raw bytes (rows of whole blocks) as a :class:`QuantizedWeight`: each block is
    split into its float16 scale (and minimum) and its codes, bits unchanged."""
    n, k = shape
    type_size = {"q8_0": 34, "q4_0": 18, "q4_1": 20}[fmt]
    raw_rows = torch.from_numpy(np.array(raw))  # a writable copy of the mapped bytes
    blocks = raw_rows.reshape(n, k // BLOCK, type_size)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, k // BLOCK)
    mins = None
    if fmt == "q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
    else:
        start = 2
        if fmt == "q4_1":
            mins = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, k // BLOCK)
            start = 4
        codes = blocks[..., start:].contiguous().reshape(n, k // 2)
    return QuantizedWeight(fmt, codes, scales, mins, n, k)


def from_int8_channel(codes: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    """An int8 ``[N, K]`` weight with one scale per output row (``[N]`` or ``[N, 1]``, any float
    dtype, kept as float32)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"int8 weight-only codes must be a 2-D int8 tensor, got {codes.dtype} {codes.shape}")
    n, k = codes.shape
    if scale.numel() != n:
        raise ValueError(
            f"int8 weight [{n}, {k}] needs {n} per-channel scales, got shape {tuple(scale.shape)}"
        )
    qw = QuantizedWeight("int8", codes.contiguous(), scale.reshape(n, 1).float(), None, n, k)
    return qw.narrow(1, 0, k)  # pads rows to whole blocks


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 weight ``[N, K]``: the reference the kernels are tested against."""
    n, k = qw.shape
    if qw.fmt == "int8":
        return (qw.codes[:, :k].float() * qw.scales.float()).contiguous()
    d = qw.scales.float().unsqueeze(-1)  # [N, K/32, 1]
    if qw.fmt == "q8_0":
        return (qw.codes.float().reshape(n, -1, BLOCK) * d).reshape(n, k)
    packed = qw.codes.reshape(n, -1, BLOCK // 2)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
    if qw.fmt == "q4_0":
        return (d * (q - 8)).reshape(n, k)
    return (d * q + qw.mins.float().unsqueeze(-1)).reshape(n, k)


def int8_activations_default(device: torch.device) -> bool:
    """Whether a quantized layer on ``device`` multiplies with int8 activations: on the CPU with
    ``DISTGEN_QUANT_ACTIVATIONS=int8``. The default, ``float``, is the float-dequantize kernel: the
    int8 one is about 1.2x faster on the default model's layers on a quiet machine, but its rounding
    of the activations turns the all-reduce's float rounding into different tokens at tp 2 than at
    tp 1, and its greedy agreement with the float path drops (benchmarks/NOTES.md)."""
    from distgen.envs import envs

    return device.type == "cpu" and envs().quant_activations == "int8"


def quant_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, int8_activations: bool = False
) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantized inside the product: the Triton kernel on the GPU, the
    C++ kernel on the CPU, and the torch reference (dequantize, then multiply) where neither runs.

    ``int8_activations`` takes, on a CPU with AVX-512 VNNI, the kernel that quantizes x to int8 per
    block of 32 and multiplies in int8 (llama.cpp's way; reference ``quant_linear_int8_ref``); the
    layers choose with :func:`int8_activations_default`. Both kernels give a row the same result
    whatever its batch."""
    from distgen.kernels.dispatch import use_cpu_kernels, use_triton

    if x.shape[-1] != qw.in_features:
        raise ValueError(f"quant_linear: input has {x.shape[-1]} features, the weight takes {qw.in_features}")
    if use_triton(x):
        from distgen.kernels.quant_gemm import quant_linear_triton

        return quant_linear_triton(x, qw, bias)
    if use_cpu_kernels(x):
        from distgen.kernels import cpu_ops

        if not int8_activations or cpu_ops.int8_activations_available():
            x = x.contiguous()
            out = x.new_empty(*x.shape[:-1], qw.out_features)
            b = None if bias is None else bias.contiguous()
            cpu_ops.qlinear(out, x, qw.codes, qw.scales, qw.mins, b, FORMAT_ID[qw.fmt], int8_activations)
            return out
    from distgen.kernels.reference import quant_linear_int8_ref, quant_linear_ref

    return (quant_linear_int8_ref if int8_activations else quant_linear_ref)(x, qw, bias)
