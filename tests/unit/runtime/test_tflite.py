"""The LiteRT engine: unmodified .tflite models from memory, one interpreter per slot, sealed containers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sealedml.crypto import random_bytes
from sealedml.envelope.model_container import open_model, open_tflite, read_header, seal_model, seal_tflite
from sealedml.errors import InputError, SealedModelError
from sealedml.runtime.tflite import TfliteModel, is_tflite
from tests.tflite_models import reference_mlp, tflite_mlp

RNG = np.random.default_rng(7)
WEIGHTS = [RNG.standard_normal((16, 8)).astype(np.float32), RNG.standard_normal((4, 16)).astype(np.float32)]
BIASES = [RNG.standard_normal(16).astype(np.float32), RNG.standard_normal(4).astype(np.float32)]


@pytest.fixture(scope="module")
def data() -> bytes:
    return tflite_mlp(WEIGHTS, BIASES)


def test_the_engine_computes_the_model_and_resizes_to_any_batch(data: bytes) -> None:
    model = TfliteModel(data, model_id="t", version=1, slots=2)
    assert [(s.name, s.dtype, s.rank) for s in model.inputs] == [("input", np.dtype(np.float32), 2)]
    assert model.output_names == ["probabilities"] and model.nbytes == len(data) and model.slots == 2
    for batch in (1, 5, 1):
        x = RNG.standard_normal((batch, 8)).astype(np.float32)
        out = model.run(model.bind_inputs({"input": x}, positional=False)).outputs["probabilities"]
        assert out.shape == (batch, 4)
        np.testing.assert_allclose(out, reference_mlp(WEIGHTS, BIASES, x), rtol=1e-5, atol=1e-6)


def test_concurrent_runs_each_get_their_own_interpreter(data: bytes) -> None:
    model = TfliteModel(data, model_id="t", version=1, slots=2)
    inputs = [RNG.standard_normal((3, 8)).astype(np.float32) for _ in range(8)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = model.run({"input": inputs[i]}).outputs["probabilities"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(results[i], reference_mlp(WEIGHTS, BIASES, x), rtol=1e-5, atol=1e-6)


def test_bad_inputs_and_bad_models_are_typed_errors(data: bytes) -> None:
    model = TfliteModel(data, model_id="t", version=1)
    with pytest.raises(InputError, match="float32"):
        model.bind_inputs({"input": np.zeros((1, 8), np.float64)}, positional=False)
    with pytest.raises(InputError, match="rejected"):
        model.run({"input": np.zeros((1, 7), np.float32)})
    assert model.run({"input": np.zeros((1, 8), np.float32)}).outputs["probabilities"].shape == (1, 4)  # still usable
    with pytest.raises(SealedModelError, match="LiteRT"):
        TfliteModel(data[:8] + b"\x00" * 64, model_id="t", version=1)
    assert is_tflite(data) and not is_tflite(b"\x08\x07" + b"\x00" * 30)


def test_a_sealed_tflite_model_records_its_format_and_opens_only_as_tflite(data: bytes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = random_bytes(32)
    sealed = seal_tflite(data, model_id="lite", model_version=3, model_key=key, chunk_size=1024)
    path = tmp_path / "m.sealed"
    path.write_bytes(sealed)
    header = read_header(path)
    assert header.payload == "tflite" and header.model_version == 3
    assert data not in sealed  # encrypted
    assert open_tflite(path, key, expected_model_id="lite", expected_version=3) == data
    with pytest.raises(SealedModelError, match="TFLite"):
        open_model(path, key)
    with pytest.raises(SealedModelError, match="another version"):
        open_tflite(path, key, expected_model_id="lite", expected_version=2)
    tampered = bytearray(sealed)
    tampered[-5] ^= 1
    with pytest.raises(SealedModelError):
        open_tflite(bytes(tampered), key)
    with pytest.raises(SealedModelError):
        open_tflite(sealed, random_bytes(32))


def test_an_onnx_container_is_not_opened_as_tflite_and_non_tflite_bytes_are_not_sealed_as_it() -> None:
    from sealedml import zoo

    key = random_bytes(32)
    onnx_sealed = seal_model(zoo.toy_multi_io(), model_id="onnx", model_version=1, model_key=key)
    with pytest.raises(SealedModelError, match="ONNX"):
        open_tflite(onnx_sealed, key)
    with pytest.raises(SealedModelError, match="not a TFLite model"):
        seal_tflite(b"definitely not a flatbuffer", model_id="x", model_version=1, model_key=key)


def test_the_owner_tool_reads_tflite_files_unmodified_and_onnx_files_as_graphs(data: bytes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from sealedml import zoo
    from sealedml.client.owner import load_model_file
    from sealedml.errors import ConfigurationError

    (tmp_path / "m.tflite").write_bytes(data)
    assert load_model_file(tmp_path / "m.tflite") == data
    onnx.save(zoo.toy_multi_io(), str(tmp_path / "m.onnx"))
    assert isinstance(load_model_file(tmp_path / "m.onnx"), onnx.ModelProto)
    (tmp_path / "junk").write_bytes(b"junk" * 10)
    with pytest.raises(ConfigurationError, match="not an ONNX model"):
        load_model_file(tmp_path / "junk")
    with pytest.raises(ConfigurationError, match="not found"):
        load_model_file(tmp_path / "missing.tflite")
