"""Compile every Triton kernel for a CUDA target without a GPU, and report its resource use.

The interpreter checks what a kernel computes, not whether it compiles for the GPU: ``tl.dot`` shape
rules, types and layouts are checked only by the real compiler. Triton's NVIDIA backend (with its
bundled ``ptxas`` and ``cuobjdump``) compiles ahead of time for any target, so this script builds the
kernels as the wrappers launch them for the Llama-3.2-1B shape (head dim 64, group 4, block 16) and
for head dim 128, in bfloat16 and float32, for sm_90, and prints registers, stack (local memory from
spills) and whether the matrix instructions are there. Exits 1 if a kernel fails to compile or a
bfloat16 variant spills. Run it without ``TRITON_INTERPRET`` (``tests/kernels/test_aot_compile.py``
does, in a subprocess)::

    python tests/kernels/aot_compile.py [--arch 90]
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from distgen.kernels import activation, fused_moe, kv_store, paged_attention, paged_prefill, rmsnorm, rotary

FLOAT_ARGS = {"eps", "scale", "qk_scale", "softcap"}
INDEX_PTRS = {"bt_ptr": "*i32", "qs_ptr": "*i32", "lens_ptr": "*i32", "pos_ptr": "*i64"}
INDEX_PTRS.update(blk_ptr="*i64", off_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32")
INDEX_PTRS.update(acc_part_ptr="*fp32", m_part_ptr="*fp32", l_part_ptr="*fp32")
INDEX_PTRS.update(weights_ptr="*fp32", sorted_ptr="*i32", expert_ptr="*i32")


def compile_kernel(fn, dtype: str, consts: dict, arch: int):
    """Compile ``fn`` with ``consts`` (constexprs and ``num_warps``); pointers default to ``dtype``."""
    options = {k: consts.pop(k) for k in ("num_warps",) if k in consts}
    params = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for p in params:
        if p in consts:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = INDEX_PTRS.get(p, f"*{dtype}")
        else:
            sig[p] = "fp32" if p in FLOAT_ARGS else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel) -> tuple[int, int, dict[str, int]]:
    """(registers, stack bytes, counts of a few SASS opcodes) from the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [tool, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "LDL", "STL")}
    return regs, stack, ops


def variants():
    """(name, kernel, pointer dtype, constexprs and warps) as the wrappers launch them."""
    for dtype in ("bf16", "fp32"):
        for d in (64, 128):
            # Soft-capped scores (Gemma 2) at head size 128 only: one more variant of each kernel.
            for cap in (False, True) if d == 128 else (False,):
                yield (
                    f"paged_prefill D{d} group 4" + (" softcap" if cap else ""),
                    paged_prefill._kernel(),
                    dtype,
                    dict(
                        GROUP=4,
                        IEEE_DOT=dtype == "fp32",
                        UPCAST=False,
                        SOFTCAP=cap,
                        **paged_prefill.launch_config(4, d, 128, True),
                    ),
                )
            for splits, cap in ((1, False), (16, False)) + (((16, True),) if d == 128 else ()):
                yield (
                    f"paged_decode D{d} group 4 splits {splits}" + (" softcap" if cap else ""),
                    paged_attention._kernel(),
                    dtype,
                    dict(GROUP=4, NUM_SPLITS=splits, SOFTCAP=cap, **paged_attention.launch_config(4, 16, d)),
                )
            yield (
                f"decode split combine D{d}",
                paged_attention._combine_kernel(),
                dtype,
                dict(NUM_SPLITS=16, HEAD_DIM_P2=d),
            )
        yield "rmsnorm 2048", rmsnorm._rmsnorm_kernel, dtype, dict(HAS_RESIDUAL=False, BLOCK=2048)
        yield "fused_add_rmsnorm 2048", rmsnorm._rmsnorm_kernel, dtype, dict(HAS_RESIDUAL=True, BLOCK=2048)
        yield "silu_and_mul", activation._silu_and_mul_kernel, dtype, dict(BLOCK=activation.BLOCK)
        for norm in (False, True):
            consts = dict(HAS_NORM=norm, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_D=32)
            name = "rotary + store_kv 32/8 heads D64" + (" + q/k norm" if norm else "")
            yield name, rotary._rotary_store_kernel, dtype, consts
        yield "store_kv 8 heads D64", kv_store._store_kv_kernel, dtype, dict(BLOCK_H=8, BLOCK_D=64)
        for block_m, weighted in ((16, False), (64, True)):
            cfg = {**fused_moe.launch_config(block_m * 8, 8), "BLOCK_M": block_m}
            consts = dict(ROWS_PER_A=2, MUL_WEIGHT=weighted, IEEE_DOT=dtype == "fp32", UPCAST=False, **cfg)
            name = f"moe grouped GEMM M{block_m}" + (" weighted" if weighted else "")
            yield name, fused_moe._kernel(), dtype, consts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args()
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: it compiles for the GPU"
    failed = False
    print(f"| kernel (sm_{args.arch}) | dtype | regs | stack | HGMMA | HMMA | LDL/STL |")
    print("|---|---|---|---|---|---|---|")
    for name, fn, dtype, consts in variants():
        try:
            regs, stack, ops = resources(compile_kernel(fn, dtype, dict(consts), args.arch))
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            print(f"| {name} | {dtype} | FAILED: {type(e).__name__}: {str(e)[:300]} |||||")
            failed = True
            continue
        spills = ops["LDL"] + ops["STL"]
        print(f"| {name} | {dtype} | {regs} | {stack} | {ops['HGMMA']} | {ops['HMMA']} | {spills} |")
        failed |= dtype == "bf16" and (stack > 0 or spills > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
