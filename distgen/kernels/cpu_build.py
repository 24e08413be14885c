"""Builds the CPU kernels (the C++ sources in ``csrc/``) into one shared library once per machine, and
loads it.

The library is compiled for the CPU it runs on (``-march=native``), so its name carries a hash of
the sources, the compiler, the flags and the CPU's model and feature flags: a second start finds it in
``$DISTGEN_CACHE_DIR/kernels`` (a few milliseconds), and a different CPU gets its own build. The build
takes a few seconds with g++; it writes to a temporary file and renames it into place, so processes
starting together (tensor-parallel workers) never load a half-written file.

With no C++ compiler, or a build that fails, :func:`load` logs why once and returns None: the layers
then run their plain-torch path. ``DISTGEN_KERNELS=cpu`` turns that into an error instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from distgen.cpu_info import cpu_model_and_flags
from distgen.envs import envs

logger = logging.getLogger("distgen")

SOURCE_DIR = Path(__file__).with_name("csrc")
# No -ffast-math: results stay IEEE; errno and trap semantics are dropped, as in torch's own build.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
FLAGS += ["-std=c++17", "-fvisibility=hidden"]


class CpuKernelsUnavailable(RuntimeError):
    """The CPU kernels could not be built or loaded here; the message says why."""


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else g++, else c++."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_signature() -> str:
    """The CPU's model name and feature flags: what -march=native compiles for."""
    model, flags = cpu_model_and_flags()
    return f"{model}|{' '.join(sorted(flags))}"


def sources() -> list[Path]:
    """The translation units, compiled together into one library."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def library_path(cxx: str) -> Path:
    """Where the build for these sources (headers included), compiler, flags and CPU lives."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256()
    files = sources() + sorted(SOURCE_DIR.glob("*.h"))
    parts = [f.name.encode() + b"\0" + f.read_bytes() for f in files]
    for part in (*parts, version.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return Path(envs().cache_dir) / "kernels" / f"cpu_kernels-{h.hexdigest()[:16]}.so"


def build(cxx: str, out: Path, extra_flags: tuple[str, ...] = (), files: list[Path] | None = None) -> None:
    """Compile the library (or only ``files`` of its sources) to ``out`` (atomically), with
    ``extra_flags`` after the usual ones (tests build the paths another CPU would take, e.g.
    ``-mno-avx512bf16``). Each source compiles in a process of its own, all at once (the templated
    kernels take several seconds each, and a first start waits for the slowest), then one link.
    Raises CpuKernelsUnavailable on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        logger.info("building the CPU kernels with %s (once per machine)", cxx)
        with tempfile.TemporaryDirectory(dir=out.parent) as objects:
            compile_flags = [f for f in FLAGS if f != "-shared"]
            jobs = []
            for i, src in enumerate(files or sources()):
                obj = os.path.join(objects, f"{i}.o")
                cmd = [cxx, *compile_flags, *extra_flags, "-c", str(src), "-o", obj]
                jobs.append(
                    (obj, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                )
            try:
                for _, job in jobs:
                    _check(job, job.communicate(timeout=600)[1])
            finally:  # one failed or hung: the others are stopped, not left running
                for _, job in jobs:
                    if job.poll() is None:
                        job.kill()
                        job.wait()
            link = [cxx, *FLAGS, *extra_flags, *(obj for obj, _ in jobs), "-o", tmp]
            proc = subprocess.run(link, capture_output=True, text=True, timeout=600)
            _check(proc, proc.stderr)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check(proc: subprocess.Popen | subprocess.CompletedProcess, stderr: str) -> None:
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        raise CpuKernelsUnavailable(f"{proc.args[0]} failed to build the CPU kernels ({SOURCE_DIR}):\n{tail}")


def load() -> ctypes.CDLL:
    """The loaded library, built first if this machine has no build yet. Raises
    CpuKernelsUnavailable, naming what is missing; one attempt per process."""
    result = _attempt()
    if isinstance(result, CpuKernelsUnavailable):
        raise result
    return result


def try_load() -> ctypes.CDLL | None:
    """:func:`load`, or None after logging why (once) when the kernels cannot be had here."""
    result = _attempt()
    if isinstance(result, CpuKernelsUnavailable):
        _warn_once(str(result))
        return None
    return result


@functools.cache
def _attempt() -> ctypes.CDLL | CpuKernelsUnavailable:
    try:
        return _build_and_load()
    except CpuKernelsUnavailable as e:
        return e
    except (OSError, subprocess.SubprocessError) as e:  # a compiler that hangs or cannot run
        return CpuKernelsUnavailable(f"building the CPU kernels failed: {e}")


def _build_and_load() -> ctypes.CDLL:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        raise CpuKernelsUnavailable(
            f"the CPU kernels support Linux on x86-64/aarch64, not {platform.platform()}"
        )
    cxx = compiler()
    if cxx is None:
        raise CpuKernelsUnavailable(
            "no C++ compiler found (install g++ or set CXX); the CPU kernels need one to build"
        )
    import torch  # noqa: F401  (loads torch's OpenMP runtime first, so the library shares it)

    path = library_path(cxx)
    if not path.exists():
        build(cxx, path)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise CpuKernelsUnavailable(f"could not load {path}: {e}") from e


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning("%s: the CPU runs the plain-torch path instead", reason)
