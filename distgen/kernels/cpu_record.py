"""Recorded CPU forwards: a function run once while its kernel calls and torch ops are written down,
then replayed as that list, without the Python that chose them.

A decode step spends a large share of its time in the Python between the C kernels (module calls,
wrappers, checks, allocations): on one stream of the default model in float32, a third of the forward
(28 ms eager, 19.5 ms replayed). When the function's inputs live in fixed buffers, every call it makes
has the same arguments each time (pointers into those buffers, the weights, the KV cache and the
tensors the run allocates, and sizes), so the list can be replayed instead, as CUDA graphs replay a
GPU forward.

What a recording holds, in program order:

- each C kernel call from :mod:`distgen.kernels.cpu_ops` (the function and its arguments);
- each torch op that computes (an embedding lookup, a bias add), re-run on replay with the same
  arguments, its result copied into the tensor the recording saw (in-place ops just re-run).

Views and uninitialized allocations need no replay, but the calls point at the memory of the tensors
the run allocates, so the recording keeps it: uninitialized allocations come from an arena that reuses a
storage once the run holds no tensor on it (a recording keeps about one layer's activations), and
the re-run ops hold their own inputs and outputs. A run that does something a replay cannot repeat
faithfully is not replayable (``Recording.refused`` says what): an op whose output shape or Python
result depends on tensor values (``item``, ``nonzero``), a random op, a tensor made from Python data (it
could hold per-step values), or an op outside aten. A collective is recorded where its caller goes
through :func:`call_recorded`. So the Python control flow of a replayable run sees only shapes and
constants; the caller keeps every input in the same buffers, with the same shapes, for each replay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from distgen.kernels import cpu_ops

_UNINITIALIZED = frozenset(
    {
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_like.default,
        torch.ops.aten.empty_strided.default,
        torch.ops.aten.new_empty.default,
        torch.ops.aten.new_empty_strided.default,
    }
)
_UNREPEATABLE_TAGS = frozenset(
    {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape, torch.Tag.nondeterministic_seeded}
)
_FROM_PYTHON_DATA = frozenset({torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default})


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Arena:
    """The memory of the recorded run's uninitialized allocations (``torch.empty`` and kin). An
    allocation takes the smallest storage that no live tensor uses any more, so a recording keeps about
    the run's largest live set, not every activation of every layer. A replay repeats the same
    allocations in the same order, so it reuses the storages just as the recorded run did."""

    def __init__(self) -> None:
        self.storages: list[torch.UntypedStorage] = []

    def place(self, fresh: torch.Tensor) -> torch.Tensor:
        """``fresh`` (just allocated, uninitialized), or a tensor of its shape on a free storage."""
        need = fresh.untyped_storage().nbytes()
        best = None
        if _use_count is not None:
            for s in self.storages:  # free: held by this list only
                if s.nbytes() >= need and _use_count(s._cdata) == 1:
                    if best is None or s.nbytes() < best.nbytes():
                        best = s
        if best is None:
            self.storages.append(fresh.untyped_storage())
            return fresh
        return fresh.new_empty(0).set_(best, 0, fresh.shape, fresh.stride())


@dataclass
class Recording:
    """A function's recorded steps and what they need alive; :meth:`replay` runs them again."""

    steps: list[tuple[Callable, tuple]] = field(default_factory=list)
    memory: list[torch.UntypedStorage] = field(default_factory=list)  # its allocations' storages
    result: Any = None
    inference: bool = False  # recorded in inference mode
    refused: str | None = None  # the first op a replay could not repeat (then it must not replay)

    def replay(self) -> Any:
        """Run the recorded steps; returns the function's result (the same tensors, refilled)."""
        assert self.refused is None, f"a run that called {self.refused} cannot be replayed"
        with torch.inference_mode(self.inference):  # tensors made in inference mode take writes only there
            for fn, args in self.steps:
                fn(*args)
        return self.result


def _rerun(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> None:
    func(*args, **kwargs)


def _rerun_into(func: torch._ops.OpOverload, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
    for dst, src in zip(outs, _tensors(func(*args, **kwargs))):
        dst.copy_(src)


class _Recorder(TorchDispatchMode):
    """Sees every torch op the function runs: records those that compute, places allocations in the
    arena, and notes the first op a replay could not repeat (``refused``); the run goes on as usual."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec
        self.arena = _Arena()
        rec.memory = self.arena.storages
        self.refused: str | None = None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing here is compiled. Saying so keeps torch from wrapping __torch_dispatch__ in a Dynamo
        # guard, whose first call imports torch._dynamo: seconds, in the middle of a step.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refused is not None:
            return out
        unrepeatable = _UNREPEATABLE_TAGS.intersection(func.tags)
        if func.namespace != "aten" or func in _FROM_PYTHON_DATA or unrepeatable:
            self.refused = str(func)
        elif func in _UNINITIALIZED:
            out = self.arena.place(out)
        elif func.is_view:  # its memory is its base's
            pass
        elif func._schema.is_mutable:  # the step holds the tensors it writes
            self.rec.steps.append((_rerun, (func, args, kwargs)))
        else:  # the step holds its inputs and outputs
            self.rec.steps.append((_rerun_into, (func, args, kwargs, _tensors(out))))
        return out


_active = threading.local()  # .recorder: the recording running on this thread


def call_recorded(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; while a recording runs, also one step of it, replayed as this same call,
    with fn's own torch ops not looked at (a collective over tensors the recording holds)."""
    recorder = getattr(_active, "recorder", None)
    if recorder is None:
        return fn(*args, **kwargs)
    with _disable_current_modes():
        result = fn(*args, **kwargs)
    recorder.rec.steps.append((_call_with, (fn, args, kwargs)))
    return result


def _call_with(fn: Callable, args: tuple, kwargs: dict) -> None:
    fn(*args, **kwargs)


def record(fn: Callable[[], Any]) -> tuple[Any, Recording]:
    """Run ``fn()`` once, recording it: returns its result and the recording, whose ``refused`` names
    what a replay could not repeat, if the run did such a thing (the result is right either way)."""
    rec = Recording(inference=torch.is_inference_mode_enabled())
    recorder = _Recorder(rec)
    _active.recorder = recorder
    lifts = torch._C._only_lift_cpu_tensors()
    torch._C._set_only_lift_cpu_tensors(True)  # ``torch.tensor(data)`` then shows as aten.lift_fresh
    try:
        with cpu_ops.recording_calls(rec.steps), recorder:
            result = fn()
    finally:
        _active.recorder = None
        torch._C._set_only_lift_cpu_tensors(lifts)
    rec.refused, rec.result = recorder.refused, result
    return result, rec
