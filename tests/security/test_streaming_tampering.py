"""Streaming execution over a tampered container: every attack ends the request in a typed
``SealedModelError``, and the model object keeps serving afterwards.

The streaming executor (``sealedml.runtime.streaming``) re-reads the sealed container on every
request and authenticates each AES-GCM chunk before using its bytes, so tampering *after* the
model was loaded is still caught — unlike the whole-model path, which decrypts once. A failed
request leaves no state behind: its decrypted weights, its in-flight prefetch and its
activations are dropped, and the next request starts clean.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.crypto import TAG_SIZE
from sealedml.envelope.model_container import SealedModelReader, seal_model
from sealedml.errors import InputError, SealedModelError
from sealedml.runtime.streaming import StreamingModel

KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))
CHUNK = 1024
BUDGET = 40_000


def mlp() -> onnx.ModelProto:
    """Four 16 KiB layers: at a 40 kB budget they take two to four segments."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.2, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return seal_model(mlp(), model_id="mlp", model_version=1, model_key=KEY, chunk_size=CHUNK)


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}


def weight_chunk_offset(sealed: bytes, tensor: str) -> int:
    """File offset of a ciphertext byte inside a chunk that only ``tensor`` uses."""
    reader = SealedModelReader(sealed, KEY)
    entry = reader.manifest.tensor(tensor)
    index = (entry.offset + entry.length // 2) // CHUNK
    return reader.header.data_offset + index * (CHUNK + TAG_SIZE) + 100


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("tensor", ["w0", "w3"])  # first and last segment
def test_tampered_weight_chunk_fails_the_run_and_the_model_keeps_serving(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray], prefetch: bool, tensor: str
) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET, prefetch=prefetch)
    segments = model.plan.segments
    assert len(segments) >= 2
    where = [k for k, seg in enumerate(segments) if any(w.tensor == tensor for w in seg.weights)]
    assert where == ([0] if tensor == "w0" else [len(segments) - 1])
    good = model.run(feeds)
    threads_before = threading.active_count()

    path.write_bytes(flip(sealed, weight_chunk_offset(sealed, tensor)))  # tampered at rest, after loading
    for _ in range(3):
        with pytest.raises(SealedModelError, match="failed authentication") as info:
            model.run(feeds)
        assert not isinstance(info.value, InputError)
    assert threading.active_count() <= threads_before + 2  # no prefetch thread leaked per failure

    path.write_bytes(sealed)  # restored: the same object serves again, with the same answer
    again = model.run(feeds)
    np.testing.assert_array_equal(again["r3"], good["r3"])
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= BUDGET
    model.close()


def test_tampered_copy_fails_only_the_request_that_reads_it(sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    tampered = flip(sealed, weight_chunk_offset(sealed, "w2"))
    queue = [sealed, tampered, sealed]  # construction, then one request per reader

    def next_reader() -> SealedModelReader:
        return SealedModelReader(queue.pop(0), KEY)

    model = StreamingModel(next_reader, budget_bytes=BUDGET)
    with pytest.raises(SealedModelError):
        model.run(feeds)
    assert model.run(feeds)["r3"].shape == (1, 64)
    model.close()


def test_resealed_container_is_refused_instead_of_misread(sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    # Same model and key sealed again: a fresh salt and different chunk keys. The plan's
    # offsets belong to the first container, so a swap must fail loudly.
    other = seal_model(mlp(), model_id="mlp", model_version=1, model_key=KEY, chunk_size=CHUNK)
    queue = [sealed, other]
    model = StreamingModel(lambda: SealedModelReader(queue.pop(0), KEY), budget_bytes=BUDGET)
    with pytest.raises(SealedModelError, match="changed"):
        model.run(feeds)


def test_moved_chunk_fails_authentication(tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    reader = SealedModelReader(sealed, KEY)
    h = reader.header
    a = (reader.manifest.tensor("w1").offset + 10) // CHUNK
    b = (reader.manifest.tensor("w2").offset + 10) // CHUNK
    stride = CHUNK + TAG_SIZE
    data = bytearray(sealed)
    start_a, start_b = h.data_offset + a * stride, h.data_offset + b * stride
    data[start_a : start_a + stride] = sealed[start_b : start_b + stride]  # valid ciphertext, wrong place
    path = tmp_path / "moved.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET)
    path.write_bytes(bytes(data))
    with pytest.raises(SealedModelError):
        model.run(feeds)


def test_truncated_container_fails_the_run(tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET, prefetch=True)
    path.write_bytes(sealed[: len(sealed) - 3000])
    with pytest.raises(SealedModelError):
        model.run(feeds)


def test_wrong_key_fails_at_construction(sealed: bytes) -> None:
    with pytest.raises(SealedModelError):
        StreamingModel(SealedModelReader(sealed, OTHER_KEY), budget_bytes=BUDGET)
