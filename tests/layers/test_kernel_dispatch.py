"""The dispatch point: the torch path on CPU tensors, the Triton kernels when forced (here, under the
interpreter) or on CUDA; and a tiny model's steps giving the same greedy tokens and logprobs either way.

The model runner is driven directly with hand-made scheduler steps (in this process, so the forced
mode applies) covering fresh prefills of several sequences, a chunked prefill continuing after its
cached first chunk, a prefix-cache hit, decodes mixed with a prefill, and decode-only steps. On a CUDA
machine the kernel side runs on the GPU (with its decode CUDA graphs) against the CPU torch path.
"""

from __future__ import annotations

import os

import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU the kernels must compile and run there, not interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from distgen.kernels import dispatch  # noqa: E402
from distgen.sampling_spec import SamplingSpec  # noqa: E402
from distgen.workers.cuda_graphs import DecodeGraphs, decode_buckets  # noqa: E402
from distgen.workers.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from tests.layers.model_steps import A, B, make_runner, run_steps  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)


def test_mode_picks_the_path():
    cpu = torch.zeros(1)
    assert not dispatch.use_triton(cpu) and not dispatch.use_triton_on(torch.device("cpu"))
    assert dispatch.use_triton_on(torch.device("cuda"))  # auto: CUDA takes the kernels
    with dispatch.kernel_mode("triton"):
        assert dispatch.use_triton(cpu) and dispatch.use_triton_on(torch.device("cpu"))
    with dispatch.kernel_mode("torch"):
        assert not dispatch.use_triton_on(torch.device("cuda"))
    assert not dispatch.use_triton(cpu)  # restored
    with pytest.raises(ValueError, match="DISTGEN_KERNELS"):
        with dispatch.kernel_mode("cuda"):
            pass


@pytest.fixture(scope="module")
def qwen3_dir(tokenizerless_dir) -> str:
    """Tiny Qwen3 (GQA 4:2, q/k RMSNorm, tied embeddings)."""
    return tokenizerless_dir("qwen3")


def test_tiny_model_steps_match_between_torch_and_triton(qwen3_dir):
    torch.manual_seed(0)
    with dispatch.kernel_mode("torch"):
        ref = run_steps(make_runner(qwen3_dir, "cpu"))
    if CUDA:
        runner = make_runner(qwen3_dir, "cuda")  # auto mode: Triton, decode CUDA graphs
        assert runner.graphs is not None
        got = run_steps(runner)
    else:
        with dispatch.kernel_mode("triton"):
            runner = make_runner(qwen3_dir, "cpu")
            got = run_steps(runner)
    assert len(got) == len(ref) == 5
    for i, ((tok, lp), (ref_tok, ref_lp)) in enumerate(zip(got, ref)):
        assert tok == ref_tok, f"step {i}: sampled {tok}, torch path {ref_tok}"
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(256) == [1, 2, 4, 8, *range(16, 257, 16)]


def test_decode_graph_buffers_and_padding_match_the_torch_path(qwen3_dir):
    """The decode-graph path's static buffers, bucket padding (3 rows in a bucket of 4) and spare
    block, run eagerly (no capture) on the CPU with the kernels in the interpreter."""
    if CUDA:
        pytest.skip("on CUDA the model test above runs the captured graphs themselves")
    with dispatch.kernel_mode("torch"):
        ref = run_steps(make_runner(qwen3_dir, "cpu"))
    with dispatch.kernel_mode("triton"):
        runner = make_runner(qwen3_dir, "cpu")
        graphs = DecodeGraphs(runner.model, 4, 256, pad_block=15, device=torch.device("cpu"))
        replays = []
        run = graphs.run
        graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
        runner.graphs = graphs
        got = run_steps(runner)
    assert replays == [3, 3]  # the two decode-only steps, each padded to the bucket of 4
    for (tok, lp), (ref_tok, ref_lp) in zip(got, ref):
        assert tok == ref_tok
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-graph"])
def test_async_scheduling_placeholders_read_the_last_steps_samples(qwen3_dir, graphs):
    """Under async scheduling a step's input token may still be on the device, sampled by the step
    before: the runner fills it in there, on the eager path and on the decode-graph buffers (on this
    CPU run eagerly, the kernels interpreted; on CUDA the captured graphs). Same tokens and logprobs
    as the synchronous steps."""
    with dispatch.kernel_mode("torch"):
        ref = run_steps(make_runner(qwen3_dir, "cpu"))
    device = "cuda" if CUDA else "cpu"
    mode = "auto" if CUDA else ("triton" if graphs else "torch")
    with dispatch.kernel_mode(mode):
        runner = make_runner(qwen3_dir, device, async_scheduling=True, enforce_eager=not graphs)
        if graphs and runner.graphs is None:
            runner.graphs = DecodeGraphs(runner.model, 4, 256, pad_block=15, device=torch.device(device))
        assert (runner.graphs is not None) == graphs
        fills = []
        fill = runner._placeholder_fill
        runner._placeholder_fill = lambda rows, cu: fills.append(fill(rows, cu)) or fills[-1]
        got = run_steps(runner, ahead=True)
    # Steps 2-5 each read a placeholder; the last two are decode-only steps in the same row order.
    assert [f is not None for f in fills] == [False, True, True, True, True]
    assert isinstance(fills[-1][0], slice)
    for i, ((tok, lp), (ref_tok, ref_lp)) in enumerate(zip(got, ref)):
        assert tok == ref_tok, f"step {i}: sampled {tok}, synchronous steps {ref_tok}"
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="host-device syncs exist only with a CUDA device")
def test_launching_a_step_never_waits_for_the_gpu(qwen3_dir):
    """Launching a step (``submit``) never makes the host wait for the GPU: torch's sync debug mode
    warns on every synchronizing call (copies, ``item``, stream syncs). Only reading its output back
    (``get``) waits, on the event after the non-blocking copy of the sampled tokens. A prefill step,
    then decode steps through the CUDA graphs, greedy, no logprobs."""
    import warnings

    params = SamplingSpec(temperature=0.0, max_tokens=8, ignore_eos=True)
    runner = make_runner(qwen3_dir, "cuda")
    assert runner.graphs is not None
    syncs_per_step = []

    def step(new, cached, counts):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pending = runner.submit(SchedulerOutput(new, cached, counts, sum(counts.values())))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs_per_step.append([str(w.message) for w in caught if "synchroniz" in str(w.message)])
        return pending.get().sampled_token_ids[0]

    tok = step([NewRequestData("a", A[:6], 6, params, [3, 7], 0)], [], {"a": 6})
    for n in range(6, 10):  # block 3 is handed out at position 8: a fresh block zeroed in-step
        new_blocks = [1] if n == 8 else []
        tok = step([], [CachedRequestData("a", [tok], new_blocks, n)], {"a": 1})
    assert syncs_per_step == [[]] * 5, syncs_per_step


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_decode_forward_launches_nine_kernels_per_layer(arch, tokenizerless_dir, monkeypatch):
    """The forward a decode graph captures, listed launch by launch: per Llama layer a norm, the QKV
    GEMM, rotary fused with the KV store (and with Qwen3's q/k norms), attention, the output GEMM, a
    fused add + norm, the gate/up GEMM, SiLU fused with the product, the down GEMM. Under a graph every
    launch costs a few microseconds even when it moves no data, which at batch 1 is a large share of a
    step, so an extra copy, cast or unfused op here fails this test. Each Triton entry point counts once
    (the decode attention may launch a second, combining kernel); every other non-view torch op counts
    as a launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches: list[str] = []
    inside_kernel_entry = [False]
    no_launch = {"empty", "empty_strided", "new_empty", "empty_like"}

    class RecordLaunches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            # The interpreter moves tensors with torch ops of its own; on a GPU the entry's are real.
            interpreted = inside_kernel_entry[0] and not CUDA
            if not func.is_view and name not in no_launch and not interpreted:
                # A GEMM may reach the mode as linear or, decomposed, as mm / addmm: one launch either way.
                launches.append("gemm" if name in ("linear", "mm", "addmm", "matmul") else name)
            return func(*args, **(kwargs or {}))

    ops = dispatch.triton_ops()
    for name, fn in list(vars(ops).items()):

        def entry(*args, _name=name, _fn=fn, **kwargs):
            launches.append(_name)
            inside_kernel_entry[0] = True
            try:
                return _fn(*args, **kwargs)
            finally:
                inside_kernel_entry[0] = False

        monkeypatch.setattr(ops, name, entry)

    params = SamplingSpec(temperature=0.0, max_tokens=4, ignore_eos=True)
    device = "cuda" if CUDA else "cpu"
    with dispatch.kernel_mode("auto" if CUDA else "triton"):
        runner = make_runner(tokenizerless_dir(arch), device)
        graphs = runner.graphs or DecodeGraphs(
            runner.model, 4, 256, pad_block=15, device=torch.device(device)
        )
        runner.graphs = graphs
        out = runner.execute_model(
            SchedulerOutput([NewRequestData("a", B, 3, params, [0], 0)], [], {"a": 3}, 3)
        )
        tok = out.sampled_token_ids[0]
        runner.execute_model(SchedulerOutput([], [CachedRequestData("a", [tok], [], 3)], {"a": 1}, 1))
        launches.clear()
        with torch.inference_mode(), RecordLaunches():
            graphs._forward(1)  # what the batch-1 graph holds, on the buffers the step above filled

    layer = ["gemm", "rotary_store_kv", "paged_attention_decode", "gemm"]
    layer += ["fused_add_rmsnorm", "gemm", "silu_and_mul", "gemm"]
    expected = ["embedding", "rmsnorm", *layer, "fused_add_rmsnorm", *layer, "fused_add_rmsnorm"]
    assert launches == expected
