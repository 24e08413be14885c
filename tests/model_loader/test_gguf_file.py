"""distgen's own GGUF parser against the ``gguf`` package's reader: the same metadata and the same
tensor bytes, on the default model and on a file written with every value type, and clear errors
for files it cannot read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distgen.model_loader import gguf_file
from distgen.model_loader.gguf import default_model_path
from distgen.model_loader.gguf_file import GGUFFile

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402


def _assert_same_as_gguf_reader(path: str) -> None:
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader adds the header as fields
    assert list(ours.metadata) == keys
    for key in keys:
        want, got = ref.fields[key].contents(), ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.tensor_type == int(theirs.tensor_type), mine.name
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape)), mine.name
        raw = np.ascontiguousarray(theirs.data).view(np.uint8).ravel()
        assert np.array_equal(mine.data.ravel(), raw), mine.name
        assert np.array_equal(
            dequantize(mine.data, mine.tensor_type), dequantize(theirs.data, theirs.tensor_type)
        )


def test_default_model_reads_as_the_gguf_package_reads_it():
    try:
        path = default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    _assert_same_as_gguf_reader(path)


def test_every_value_type_and_tensor_kind(tmp_path):
    path = str(tmp_path / "all.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [3, 1, 4, 1, 5])
    w.add_array("t.strs", ["a", "", "ünï"])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
    w.add_tensor("vec", rng.standard_normal(7, dtype=np.float32))
    q = rng.standard_normal((2, 64), dtype=np.float32)
    w.add_tensor("q8", quantize(q, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_same_as_gguf_reader(path)
    f = GGUFFile(path)
    assert f.metadata["t.str"] == "héllo ✓" and f.metadata["t.strs"] == ["a", "", "ünï"]
    assert f.metadata["t.u64"] == 2**63 + 5 and f.metadata["t.bool"] is True
    by_name = {t.name: t for t in f.tensors}
    assert by_name["q8"].shape == (2, 64)
    np.testing.assert_allclose(dequantize(by_name["q8"].data, by_name["q8"].tensor_type), q, atol=0.02)


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        GGUFFile(str(bad))
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + b"\0" * 16)
    with pytest.raises(ValueError, match="GGUF version 1 is not supported"):
        GGUFFile(str(v1))
    full = tmp_path / "full.gguf"
    w = gguf.GGUFWriter(str(full), "llama")
    w.add_array("t.strs", ["x" * 100] * 10)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or damaged"):
        GGUFFile(str(cut))


def test_dequantize_is_bit_identical_to_gguf_quants(tmp_path, monkeypatch):
    """Our torch unpacking of Q4_0 / Q4_1 / Q8_0 (and the fallback for F32 / F16) against the gguf
    package's, on the default model's tensors and on synthetic ones, with tensors split into several
    row chunks (a small chunk size) as large tensors are."""
    path = str(tmp_path / "quants.gguf")
    w = gguf.GGUFWriter(path, "llama")
    rng = np.random.default_rng(1)
    for qtype in (
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q8_0,
    ):
        x = (rng.standard_normal((37, 96)) * rng.uniform(0.01, 10)).astype(np.float32)
        w.add_tensor(qtype.name, quantize(x, qtype), raw_dtype=qtype)
    w.add_tensor("f16", rng.standard_normal((5, 7)).astype(np.float16))
    w.add_tensor("f32", rng.standard_normal(9, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = [GGUFFile(path)]
    try:
        files.append(GGUFFile(default_model_path()))
    except RuntimeError:
        pass
    monkeypatch.setattr(gguf_file, "_CHUNK", 500)  # several row chunks per tensor
    for f in files:
        for t in f.tensors:
            got = gguf_file.dequantize(t)
            want = dequantize(t.data, t.tensor_type)
            assert got.dtype == torch.float32 and tuple(got.shape) == t.shape, t.name
            assert np.array_equal(got.numpy(), np.asarray(want, dtype=np.float32).reshape(t.shape)), t.name
