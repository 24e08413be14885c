"""Weights from a Hugging Face directory: one or many ``*.safetensors`` files (with or without an index).

Tensors are handed out as lazy slices (``safe_open(...).get_slice``), so each parameter's
``weight_loader`` reads from disk only the rows or columns its rank holds.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack

from safetensors import safe_open

from distgen.layers.weights import LoadedWeight


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, LoadedWeight]]:
    """Yield ``(name, lazy_slice)`` for every tensor of the checkpoint."""
    with ExitStack() as stack:
        for path in safetensors_files(model_dir):
            f = stack.enter_context(safe_open(path, framework="pt"))
            for name in f.keys():
                yield name, f.get_slice(name)
