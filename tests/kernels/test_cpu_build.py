"""Building and caching the CPU kernels: once per machine, keyed by the CPU, and a clear reason when
they cannot be built (the layers then run their torch path)."""

from __future__ import annotations

import os

import pytest

from distgen.kernels import cpu_build

needs_compiler = pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler here")


def test_no_compiler_is_named(monkeypatch):
    monkeypatch.setattr(cpu_build, "compiler", lambda: None)
    with pytest.raises(cpu_build.CpuKernelsUnavailable, match="no C\\+\\+ compiler found .*install g\\+\\+"):
        cpu_build._build_and_load()


def test_a_failing_compiler_is_reported_with_its_output(tmp_path, monkeypatch):
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DISTGEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(
        cpu_build.CpuKernelsUnavailable, match="failed to build[\\s\\S]*this compiler is broken"
    ):
        cpu_build.build(str(fake), tmp_path / "cache" / "k.so")
    assert not list((tmp_path / "cache").glob("*.so")), "a failed build leaves no file behind"


@needs_compiler
def test_each_cpu_gets_its_own_build(monkeypatch):
    cxx = cpu_build.compiler()
    here = cpu_build.library_path(cxx)
    monkeypatch.setattr(cpu_build, "_cpu_signature", lambda: "another CPU|avx2")
    assert cpu_build.library_path(cxx) != here


@needs_compiler
def test_a_second_start_reuses_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTGEN_CACHE_DIR", str(tmp_path))
    cpu_build._build_and_load()
    (built,) = (tmp_path / "kernels").glob("cpu_kernels-*.so")
    stamp = os.stat(built).st_mtime_ns
    lib = cpu_build._build_and_load()
    assert os.stat(built).st_mtime_ns == stamp and lib.dg_paged_attention_f32 is not None


@needs_compiler
def test_a_header_edit_gets_a_new_build(tmp_path, monkeypatch):
    cxx = cpu_build.compiler()
    here = cpu_build.library_path(cxx)
    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in cpu_build.SOURCE_DIR.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(cpu_build, "SOURCE_DIR", copy)
    assert cpu_build.library_path(cxx) == here
    (copy / "common.h").write_text((copy / "common.h").read_text() + "\n// edited\n")
    assert cpu_build.library_path(cxx) != here
