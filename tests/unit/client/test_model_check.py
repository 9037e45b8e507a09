"""The owner's check that a model loads before it is sealed, and the signature it records."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml import zoo
from sealedml.client.model_check import check_model_file, signature_of_model
from sealedml.errors import InputError
from tests.tflite_models import tflite_mlp


def test_an_onnx_model_is_described_as_onnx_runtime_sees_it(tmp_path):
    path = tmp_path / "toy.onnx"
    path.write_bytes(zoo.toy_multi_io().SerializeToString())
    signature = check_model_file(path)
    assert [(t.name, t.dtype) for t in signature.inputs] == [("x", "float32"), ("idx", "int64")]
    assert signature.inputs[0].shape == [None, 4]
    assert signature == signature_of_model(zoo.toy_multi_io())


def test_a_tflite_model_is_described_by_litert(tmp_path):
    rng = np.random.default_rng(0)
    data = tflite_mlp([rng.standard_normal((3, 4)).astype(np.float32)], [np.zeros(3, np.float32)])
    path = tmp_path / "m.tflite"
    path.write_bytes(data)
    signature = check_model_file(path)
    assert [t.dtype for t in signature.inputs] == ["float32"] and signature.outputs[0].shape[-1] == 3
    assert signature == signature_of_model(data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"not a model at all", "ONNX Runtime cannot load it"),
        (b"TFL3" * 8, "cannot load it"),
    ],
)
def test_what_cannot_run_is_refused_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        check_model_file(path)
    assert "\n" not in str(caught.value) and "nothing was sealed" in str(caught.value)


def test_a_missing_file_and_an_empty_model_in_memory_are_refused(tmp_path):
    import onnx

    with pytest.raises(InputError, match="not found"):
        check_model_file(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="cannot load"):
        signature_of_model(onnx.ModelProto())
