"""dtype "auto" as vLLM means it: the checkpoint's dtype, made to fit what the device computes natively."""

from __future__ import annotations

import pytest
import torch

from distgen.config import parse_dtype
from distgen.cpu_info import native_bf16, parse_cpuinfo


@pytest.mark.parametrize(
    "checkpoint, device, bf16, want",
    [
        ("bfloat16", "cpu", True, torch.bfloat16),  # e.g. SmolLM2 on an AVX-512-BF16 / AMX CPU
        ("bfloat16", "cpu", False, torch.float32),  # no native bfloat16: float32 is the fast path
        ("float16", "cpu", True, torch.bfloat16),  # CPU float16 matmuls are slow
        ("float16", "cpu", False, torch.float32),
        ("float32", "cpu", True, torch.float32),
        (None, "cpu", True, torch.float32),
        ("float16", "cuda", False, torch.float16),
        ("bfloat16", "cuda", False, torch.bfloat16),
        (None, "cuda", False, torch.float32),
    ],
)
def test_auto_follows_the_checkpoint_and_the_device(checkpoint, device, bf16, want):
    assert parse_dtype("auto", device, checkpoint, native_bf16=bf16) == want


def test_an_explicit_dtype_wins_and_a_bad_one_is_named():
    assert parse_dtype("float32", "cpu", "bfloat16", native_bf16=True) == torch.float32
    assert parse_dtype("bf16", "cpu", "float32") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of .*got 'int8'"):
        parse_dtype("int8", "cpu", None)


XEON = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512f amx_bf16\n"
EPYC_ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    "text, model, bf16",
    [
        (XEON, "Intel(R) Xeon(R) Platinum 8480+", True),
        (EPYC_ZEN3, "AMD EPYC 7B13", False),
        (GRAVITON3, None, True),
    ],
)
def test_cpuinfo_gives_the_model_and_whether_bfloat16_is_native(text, model, bf16):
    got_model, flags = parse_cpuinfo(text)
    assert model is None or got_model == model
    assert native_bf16(flags) is bf16
