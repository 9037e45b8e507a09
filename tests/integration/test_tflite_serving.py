"""An unmodified .tflite model sealed, released and served through the gateway, beside ONNX models."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from sealedml import zoo
from tests.conftest import Stack, _make_stack
from tests.tflite_models import tflite_mlp

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(11)
WEIGHTS = [RNG.standard_normal((32, 64)).astype(np.float32) / 8, RNG.standard_normal((10, 32)).astype(np.float32) / 4]
BIASES = [RNG.standard_normal(32).astype(np.float32), RNG.standard_normal(10).astype(np.float32)]


@pytest.fixture(scope="module")
def one_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One instance at most (concurrency 2): every model it serves is packed into it."""
    yield from _make_stack(tmp_path_factory.mktemp("tflite"), platform_extra=["--max-instances", "1"])


def _litert(data: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def test_a_tflite_model_served_beside_an_onnx_one_equals_litert_run_locally(
    one_instance: Stack, unique_id, tmp_path: Path
) -> None:
    stack = one_instance
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    lite, digits = unique_id("lite"), unique_id("digits")
    data = tflite_mlp(WEIGHTS, BIASES)
    stack.publish(owner_ks, data, lite, users=[(user, user_ks)])  # type: ignore[arg-type]
    dm = zoo.digits()
    stack.publish(owner_ks, dm.model, digits, users=[(user, user_ks)])
    client = stack.infer_client(user)
    x = dm.x_test[:6].astype(np.float32)
    batches = [x[i : i + 2] for i in range(0, 6, 2)] * 3

    def both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out_lite = client.infer(lite, {"input": batch})["probabilities"]
        out_onnx = client.infer(digits, batch)["probabilities"]
        return out_lite, out_onnx

    with ThreadPoolExecutor(2) as pool:  # two requests at once on the one instance (concurrency 2)
        results = list(pool.map(both, batches))
    import onnxruntime as ort

    session = ort.InferenceSession(dm.model.SerializeToString())
    for batch, (out_lite, out_onnx) in zip(batches, results, strict=True):
        assert float(np.abs(out_lite - _litert(data, batch)).max()) <= 1e-6
        np.testing.assert_allclose(out_onnx, session.run(None, {"input": batch})[1], rtol=1e-5, atol=1e-6)
    stats = httpx.get(stack.gateway.url + "/v1/stats").json()
    pools = list(stats["functions"].values())
    instances = [instance for pool in pools for instance in pool["instances"]]
    assert all(pool["concurrency"] == 2 for pool in pools)
    packed = [i for i in instances if any(lite in m for m in i["models"]) and any(digits in m for m in i["models"])]
    assert packed, instances  # one instance holds the TFLite and the ONNX model at once
