"""Huge-page advice for the CPU KV cache: taken for whole 2 MiB pages, harmless to the data."""

from __future__ import annotations

import sys

import pytest
import torch

from distgen.kernels.cpu_memory import advise_huge_pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_a_large_buffer_is_advised_and_keeps_its_contents():
    t = torch.empty(8 << 20, dtype=torch.float32)  # 32 MiB: whole huge pages inside it
    assert advise_huge_pages(t)
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()


def test_a_buffer_with_no_whole_huge_page_is_left_alone():
    assert not advise_huge_pages(torch.empty(1024))
    assert not advise_huge_pages(torch.empty(0))
