"""The sealed model container (:mod:`sealedml.envelope.model_container`): format and happy paths.

The tampering matrix is in ``tests/security/test_sealed_model_tampering.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml import zoo
from sealedml._internal.encoding import canonical_json
from sealedml.crypto import NONCE_SIZE, TAG_SIZE
from sealedml.envelope.model_container import (
    DEFAULT_CHUNK_SIZE,
    MAGIC,
    SealedModelHeader,
    SealedModelReader,
    open_model,
    seal_model,
)
from sealedml.errors import SealedModelError
from tests.constants import MODEL_KEY

# -- models ----------------------------------------------------------------------------


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """A small MLP whose weights span many 1 KiB chunks (W1 is 24 KiB), with mixed dtypes."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "fc1.weight"),
        numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(rng.standard_normal((96, 10)).astype(np.float32), "fc2.weight"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc2.bias"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.arange(7, dtype=np.int64), "unused.int64"),
        numpy_helper.from_array(rng.standard_normal(33).astype(np.float16), "unused.float16"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
            helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"]),
            helper.make_node("Add", ["h3", "fc2.bias"], ["h4"]),
            helper.make_node("Mul", ["h4", "scale"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def numeric_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.data_type not in (TensorProto.STRING, TensorProto.UNDEFINED)
    }


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def assert_same_outputs(original: onnx.ModelProto, opened: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected, got = run_model(original, feeds), run_model(opened, feeds)
    assert len(expected) == len(got)
    for e, g in zip(expected, got, strict=True):
        assert e.dtype == g.dtype
        np.testing.assert_array_equal(g, e)


@pytest.fixture(scope="module")
def mobilenet() -> onnx.ModelProto:
    return zoo.mobilenetv2()


@pytest.fixture(scope="module")
def sealed_mobilenet(mobilenet: onnx.ModelProto) -> bytes:
    return seal_model(mobilenet, model_id="mobilenetv2", model_version=3, model_key=MODEL_KEY)


@pytest.fixture(scope="module")
def digits_model() -> onnx.ModelProto:
    return zoo.digits().model


@pytest.fixture(scope="module")
def mlp() -> onnx.ModelProto:
    return mlp_model()


# -- end-to-end roundtrips with ONNX Runtime -----------------------------------------------


def test_toy_roundtrip_gives_identical_outputs(toy_model: onnx.ModelProto) -> None:
    sealed = seal_model(toy_model, model_id="toy", model_version=1, model_key=MODEL_KEY)
    opened = open_model(sealed, MODEL_KEY, expected_model_id="toy", expected_version=1)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "idx": np.arange(5, dtype=np.int64)}
    assert_same_outputs(toy_model, opened, feeds)


def test_digits_roundtrip_gives_identical_outputs(digits_model: onnx.ModelProto) -> None:
    sealed = seal_model(digits_model, model_id="digits", model_version=1, model_key=MODEL_KEY, chunk_size=1024)
    opened = open_model(sealed, MODEL_KEY)
    x_test = zoo.digits().x_test[:32]
    assert_same_outputs(digits_model, opened, {"input": np.ascontiguousarray(x_test, dtype=np.float32)})


def test_mobilenetv2_roundtrip_gives_identical_outputs(mobilenet: onnx.ModelProto, sealed_mobilenet: bytes) -> None:
    opened = open_model(sealed_mobilenet, MODEL_KEY, expected_model_id="mobilenetv2", expected_version=3)
    image = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert_same_outputs(mobilenet, opened, {"input": image})


def test_mlp_roundtrip_gives_identical_outputs(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=1024)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    assert_same_outputs(mlp, open_model(sealed, MODEL_KEY), {"x": x})


@pytest.mark.parametrize("name", ["toy", "mlp", "digits"])
def test_opened_model_has_every_initializer_inline_and_equal(
    name: str, toy_model: onnx.ModelProto, mlp: onnx.ModelProto, digits_model: onnx.ModelProto
) -> None:
    model = {"toy": toy_model, "mlp": mlp, "digits": digits_model}[name]
    opened = open_model(seal_model(model, model_id=name, model_version=1, model_key=MODEL_KEY), MODEL_KEY)
    assert [i.name for i in opened.graph.initializer] == [i.name for i in model.graph.initializer]
    for init in opened.graph.initializer:
        assert init.data_location == TensorProto.DEFAULT
        assert not init.external_data
    originals = numeric_initializers(model)
    for name_, array in numeric_initializers(opened).items():
        assert array.dtype == originals[name_].dtype
        np.testing.assert_array_equal(array, originals[name_])
    assert len(opened.graph.node) == len(model.graph.node)
    onnx.checker.check_model(opened)


def test_opened_mobilenetv2_initializers_equal_original(mobilenet: onnx.ModelProto, sealed_mobilenet: bytes) -> None:
    opened = numeric_initializers(open_model(sealed_mobilenet, MODEL_KEY))
    original = numeric_initializers(mobilenet)
    assert opened.keys() == original.keys()
    for name, array in original.items():
        assert opened[name].tobytes() == array.tobytes(), name


# -- per-tensor random access --------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1024, 1500, 4096, DEFAULT_CHUNK_SIZE])
def test_reader_tensor_equals_every_initializer(mlp: onnx.ModelProto, chunk_size: int) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=chunk_size)
    originals = numeric_initializers(mlp)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        assert {t.name for t in reader.manifest.tensors} == set(originals)
        for name, array in originals.items():
            got = reader.tensor(name)
            assert got.dtype == array.dtype, name
            assert got.shape == array.shape, name
            np.testing.assert_array_equal(got, array, err_msg=name)


def test_tensors_span_several_chunks_at_1k(mlp: onnx.ModelProto) -> None:
    """Guard for the test above: at 1 KiB, fc1.weight really crosses chunk boundaries."""
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=1024)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        entry = reader.manifest.tensor("fc1.weight")
        first, last = entry.offset // 1024, (entry.offset + entry.length - 1) // 1024
        assert last - first >= 20
        assert reader.header.n_chunks > 20


def test_reader_tensor_equals_every_mobilenetv2_initializer(
    mobilenet: onnx.ModelProto, sealed_mobilenet: bytes
) -> None:
    originals = numeric_initializers(mobilenet)
    with SealedModelReader(sealed_mobilenet, MODEL_KEY) as reader:
        assert len(reader.manifest.tensors) == len(originals) > 100
        for name, array in originals.items():
            got = reader.tensor(name)
            assert got.shape == array.shape, name
            assert got.tobytes() == array.tobytes(), name


def test_reader_tensor_equals_every_toy_initializer(toy_model: onnx.ModelProto) -> None:
    sealed = seal_model(toy_model, model_id="toy", model_version=1, model_key=MODEL_KEY)
    originals = numeric_initializers(toy_model)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        for name, array in originals.items():
            np.testing.assert_array_equal(reader.tensor(name), array)
        assert reader.tensor("one").shape == ()


def test_reader_from_file_path(tmp_path: Path, mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=2048)
    path = tmp_path / "mlp.sealed"
    path.write_bytes(sealed)
    with SealedModelReader(path, MODEL_KEY) as reader:
        np.testing.assert_array_equal(reader.tensor("fc2.weight"), numeric_initializers(mlp)["fc2.weight"])
    with SealedModelReader(str(path), MODEL_KEY) as reader:
        payload = reader.read_all()
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        assert reader.read_all() == payload
    opened = open_model(path, MODEL_KEY, expected_model_id="mlp", expected_version=1)
    assert numeric_initializers(opened).keys() == numeric_initializers(mlp).keys()


def test_closed_file_reader_refuses_reads(tmp_path: Path, mlp: onnx.ModelProto) -> None:
    path = tmp_path / "mlp.sealed"
    path.write_bytes(seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY))
    reader = SealedModelReader(path, MODEL_KEY)
    reader.close()
    with pytest.raises(SealedModelError, match="closed"):
        reader.chunk(0)


def test_reader_read_ranges_across_chunk_boundaries(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=1024)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        payload = reader.read_all()
        assert b"".join(reader.iter_chunks()) == payload
        n = len(payload)
        for offset, length in [(0, 0), (0, 1), (1023, 2), (1024, 1024), (1000, 3000), (n - 1, 1), (0, n), (n, 0)]:
            assert reader.read(offset, length) == payload[offset : offset + length]


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (0, 10**9), (10**9, 0)])
def test_reader_read_outside_payload_raises(mlp: onnx.ModelProto, offset: int, length: int) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    with SealedModelReader(sealed, MODEL_KEY) as reader, pytest.raises(SealedModelError, match="outside"):
        reader.read(offset, length)


def test_reader_chunk_index_out_of_range_raises(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=4096)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        for index in (-1, reader.header.n_chunks):
            with pytest.raises(SealedModelError, match="out of range"):
                reader.chunk(index)


def test_chunk_into_matches_chunk_and_fails_closed(mlp: onnx.ModelProto) -> None:
    sealed = bytearray(seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=1024))
    with SealedModelReader(bytes(sealed), MODEL_KEY) as reader:
        out = bytearray(1024)
        for index in range(reader.header.n_chunks):  # the last chunk is short
            n = reader.chunk_into(index, memoryview(out))
            assert bytes(out[:n]) == reader.chunk(index)
        with pytest.raises(SealedModelError, match="out of range"):
            reader.chunk_into(reader.header.n_chunks, memoryview(out))
        offset = reader.header.data_offset
    sealed[offset + 5] ^= 1  # the first chunk's ciphertext
    with SealedModelReader(bytes(sealed), MODEL_KEY) as tampered:
        out = bytearray(b"\xaa" * 1024)
        with pytest.raises(SealedModelError, match="chunk 0 failed authentication"):
            tampered.chunk_into(0, memoryview(out))
        assert out == bytes(1024), "no unauthenticated plaintext may be left in the buffer"


def test_unknown_tensor_name_raises(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        with pytest.raises(SealedModelError, match="no weight tensor"):
            reader.tensor("fc3.weight")
        with pytest.raises(SealedModelError, match="no weight tensor"):
            reader.manifest.tensor("")


# -- header and manifest --------------------------------------------------------------------


def test_header_fields_and_layout(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp-a", model_version=7, model_key=MODEL_KEY, chunk_size=1024)
    header = SealedModelHeader.parse(sealed)
    assert sealed.startswith(MAGIC)
    assert int.from_bytes(sealed[len(MAGIC) : len(MAGIC) + 4], "big") == len(header.raw)
    assert (header.model_id, header.model_version, header.chunk_size) == ("mlp-a", 7, 1024)
    assert header.n_chunks == -(-header.plaintext_length // 1024)
    assert len(header.salt) == 32 and len(header.base_nonce) == NONCE_SIZE
    assert header.data_offset == len(MAGIC) + 4 + len(header.raw)
    expected_size = header.data_offset + header.plaintext_length + header.n_chunks * TAG_SIZE
    assert header.sealed_length == len(sealed) == expected_size
    assert header.digest == hashlib.sha256(MAGIC + header.raw).digest()
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        assert reader.header == header
        assert hashlib.sha256(reader.read_all()).hexdigest() == header.plaintext_sha256


def test_header_is_canonical_json_with_documented_fields(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    header = SealedModelHeader.parse(sealed)
    doc = json.loads(header.raw)
    assert canonical_json(doc) == header.raw
    assert set(doc) == {
        "format",
        "model_id",
        "model_version",
        "plaintext_sha256",
        "plaintext_length",
        "chunk_size",
        "n_chunks",
        "salt",
        "base_nonce",
    }
    assert doc["format"] == 1


def test_header_parse_needs_only_a_prefix(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    header = SealedModelHeader.parse(sealed)
    assert SealedModelHeader.parse(sealed[: header.data_offset]) == header


def test_container_reveals_no_tensor_names_or_weights(mlp: onnx.ModelProto) -> None:
    """The tensor index is in the encrypted manifest (decision 0002): nothing of it is in clear."""
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=1024)
    for name, array in numeric_initializers(mlp).items():
        assert name.encode() not in sealed
        if array.nbytes >= 16:
            assert array.tobytes()[:16] not in sealed
    assert b"MatMul" not in sealed


def test_manifest_describes_aligned_non_overlapping_tensors(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    originals = numeric_initializers(mlp)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        manifest = reader.manifest
        length = reader.header.plaintext_length
        spans = [(manifest.graph_offset, manifest.graph_length)]
        for entry in manifest.tensors:
            assert entry.offset % 64 == 0, entry.name
            assert entry.length == originals[entry.name].nbytes
            assert entry.dims == originals[entry.name].shape
            spans.append((entry.offset, entry.length))
        spans.sort()
        assert spans[0][0] >= 4
        for (a_off, a_len), (b_off, _) in itertools.pairwise(spans):
            assert a_off + a_len <= b_off
        assert spans[-1][0] + spans[-1][1] <= length
        assert reader.manifest is manifest  # parsed once


def test_graph_points_weights_at_the_container(mlp: onnx.ModelProto) -> None:
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        graph = reader.graph()
    assert [n.op_type for n in graph.graph.node] == [n.op_type for n in mlp.graph.node]
    for init in graph.graph.initializer:
        assert init.data_location == TensorProto.EXTERNAL
        assert not init.raw_data
        assert {e.key: e.value for e in init.external_data}["location"] == "sealedml:weights"


# -- chunk sizes -----------------------------------------------------------------------------


def _plaintext_length(model: onnx.ModelProto) -> int:
    return SealedModelHeader.parse(
        seal_model(model, model_id="m", model_version=1, model_key=MODEL_KEY)
    ).plaintext_length


@pytest.mark.parametrize("chunk", ["1k", "1500", "4k", "exact", "exact-minus-one", "exact-plus-one", "64m"])
def test_chunk_size_variants_roundtrip(mlp: onnx.ModelProto, chunk: str) -> None:
    length = _plaintext_length(mlp)
    chunk_size = {
        "1k": 1024,
        "1500": 1500,
        "4k": 4096,
        "exact": length,
        "exact-minus-one": length - 1,
        "exact-plus-one": length + 1,
        "64m": 64 * 1024 * 1024,
    }[chunk]
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=chunk_size)
    header = SealedModelHeader.parse(sealed)
    assert header.n_chunks == -(-length // chunk_size)
    assert len(sealed) == header.sealed_length
    x = np.ones((2, 64), np.float32)
    assert_same_outputs(mlp, open_model(sealed, MODEL_KEY), {"x": x})
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        chunks = list(reader.iter_chunks())
        assert all(len(c) == chunk_size for c in chunks[:-1])
        assert 1 <= len(chunks[-1]) <= chunk_size
        np.testing.assert_array_equal(reader.tensor("fc1.weight"), numeric_initializers(mlp)["fc1.weight"])


@pytest.mark.parametrize("chunk_size", [0, 1, 1023, 64 * 1024 * 1024 + 1, -1024])
def test_seal_rejects_chunk_size_out_of_bounds(mlp: onnx.ModelProto, chunk_size: int) -> None:
    with pytest.raises(SealedModelError, match="chunk size"):
        seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=chunk_size)


@pytest.mark.parametrize("version", [0, -1])
def test_seal_rejects_version_below_one(mlp: onnx.ModelProto, version: int) -> None:
    with pytest.raises(SealedModelError, match="version"):
        seal_model(mlp, model_id="mlp", model_version=version, model_key=MODEL_KEY)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_seal_and_open_reject_model_key_of_wrong_size(mlp: onnx.ModelProto, size: int) -> None:
    with pytest.raises(SealedModelError, match="32 bytes"):
        seal_model(mlp, model_id="mlp", model_version=1, model_key=bytes(size))
    sealed = seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    with pytest.raises(SealedModelError, match="32 bytes"):
        SealedModelReader(sealed, bytes(size))


def test_seal_accepts_serialized_model_bytes(toy_model: onnx.ModelProto) -> None:
    sealed = seal_model(toy_model.SerializeToString(), model_id="toy", model_version=1, model_key=MODEL_KEY)
    opened = open_model(sealed, MODEL_KEY)
    for name, array in numeric_initializers(toy_model).items():
        np.testing.assert_array_equal(numeric_initializers(opened)[name], array)


def test_seal_rejects_bytes_that_are_not_onnx() -> None:
    with pytest.raises(SealedModelError, match="not an ONNX model"):
        seal_model(b"\xff\xff\xff\xff", model_id="m", model_version=1, model_key=MODEL_KEY)


def test_seal_rejects_model_with_external_data(mlp: onnx.ModelProto) -> None:
    model = onnx.ModelProto.FromString(mlp.SerializeToString())
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    with pytest.raises(SealedModelError, match="external data"):
        seal_model(model, model_id="m", model_version=1, model_key=MODEL_KEY)


def test_seal_does_not_mutate_callers_model(mlp: onnx.ModelProto) -> None:
    before = mlp.SerializeToString()
    seal_model(mlp, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    assert mlp.SerializeToString() == before


def test_sealing_twice_gives_unrelated_containers(toy_model: onnx.ModelProto) -> None:
    """Fresh salt and base nonce per container: never a fixed nonce, never the same chunk key."""
    a = seal_model(toy_model, model_id="toy", model_version=1, model_key=MODEL_KEY)
    b = seal_model(toy_model, model_id="toy", model_version=1, model_key=MODEL_KEY)
    ha, hb = SealedModelHeader.parse(a), SealedModelHeader.parse(b)
    assert ha.salt != hb.salt and ha.base_nonce != hb.base_nonce
    assert ha.plaintext_sha256 == hb.plaintext_sha256
    assert a[ha.data_offset :] != b[hb.data_offset :]
    with SealedModelReader(a, MODEL_KEY) as ra, SealedModelReader(b, MODEL_KEY) as rb:
        assert ra.read_all() == rb.read_all()


def test_string_initializers_stay_inline(mlp: onnx.ModelProto) -> None:
    model = onnx.ModelProto.FromString(mlp.SerializeToString())
    model.graph.initializer.append(helper.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"dog"]))
    sealed = seal_model(model, model_id="m", model_version=1, model_key=MODEL_KEY)
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        assert "labels" not in {t.name for t in reader.manifest.tensors}
    opened = open_model(sealed, MODEL_KEY)
    labels = next(i for i in opened.graph.initializer if i.name == "labels")
    assert list(labels.string_data) == [b"cat", b"dog"]


def test_open_model_accepts_matching_expectations(toy_model: onnx.ModelProto) -> None:
    sealed = seal_model(toy_model, model_id="toy", model_version=4, model_key=MODEL_KEY)
    opened = open_model(sealed, MODEL_KEY, expected_model_id="toy", expected_version=4)
    assert opened.graph.name == toy_model.graph.name
