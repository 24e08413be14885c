"""Building and caching the CPU kernels: once per machine, keyed by the CPU, and a clear reason when
they cannot be built (the layers then run their torch path)."""

from __future__ import annotations

import os
import shutil

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
    """A cache dir holding this machine's build (copied from the session's own, which the first kernel
    call of the run built) is used as it is: no compile, the same file, its functions there."""
    cpu_build.load()  # builds into the default cache when this machine has none yet
    here = cpu_build.library_path(cpu_build.compiler())
    monkeypatch.setenv("DISTGEN_CACHE_DIR", str(tmp_path))
    target = cpu_build.library_path(cpu_build.compiler())
    target.parent.mkdir(parents=True)
    shutil.copy2(here, target)
    stamp = os.stat(target).st_mtime_ns
    monkeypatch.setattr(cpu_build, "build", lambda *a, **k: pytest.fail("rebuilt a build the cache holds"))
    lib = cpu_build._build_and_load()
    assert os.stat(target).st_mtime_ns == stamp and lib.dg_paged_attention_f32 is not None


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
