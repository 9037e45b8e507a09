"""Blinded partitions end to end: the middle sealed and run in the (simulated) TEE, its linear
layers' masked products computed by the platform's supervised executor process.

Real processes on loopback: a KeyService, a platform with ``--executor local``. The victim is
the trained digits CNN (torch), split after relu1 and before fc1's activation.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import onnx
import pytest

from sealedml.partition.split import Partition, split_model
from tests.conftest import Stack, _make_stack
from tests.integration.test_partitioned_serving import _publish, _stats

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

FRONT, BACK = ["relu1"], ["relu4"]


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    from sealedml.zoo import trained

    return trained.load("digits-cnn")


@pytest.fixture(scope="module")
def blinded(digits) -> Partition:  # type: ignore[no-untyped-def]
    return split_model(digits.model, FRONT, BACK, blind=(8, 8))


@pytest.fixture(scope="module")
def blind_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _make_stack(tmp_path_factory.mktemp("blinded"), platform_extra=["--executor", "local"])


def _quantized(partition: Partition, x: np.ndarray) -> np.ndarray:
    """The quantized model computed in one process, nothing outsourced."""
    from sealedml.partition.blind.check import front_outputs, local_blinded
    from sealedml.partition.split import _session

    middle = local_blinded(partition)
    try:
        mid = middle.reference(front_outputs(partition, {"input": x}))
    finally:
        middle.close()
    back = _session(partition.back)
    return back.run(["probabilities"], mid)[0]


def test_blinded_partition_serves_the_quantized_models_outputs(blind_stack, blinded, digits, unique_id):
    model_id = unique_id("digits-blind")
    published, [(user, user_ks)] = _publish(blind_stack, blinded, model_id)
    info = user_ks.model_info(model_id)
    assert info.partitioned and info.partition_sha256 == published.partition_sha256
    stored = sorted(p.name for p in (blind_stack.store / model_id).iterdir())
    assert "v1.middle.sealed" in stored and "v1.middle.onnx" not in stored  # the middle never lies in the clear
    assert [n for n in stored if n.startswith("v1.linear-")] == [
        "v1.linear-0.onnx",
        "v1.linear-1.onnx",
        "v1.linear-2.onnx",
    ]
    client = blind_stack.infer_client(user)
    x = digits.x_test[:16]
    got = client.infer(model_id, {"input": x})["probabilities"]
    assert np.array_equal(got, _quantized(blinded, x))  # exact, not close
    assert (got.argmax(1) == digits.y_test[:16]).mean() >= 0.9
    executor = _stats(blind_stack)["executor"]
    served = httpx.get(f"{executor['url']}/v1/stats", timeout=30).json()
    assert served["requests"] >= 3 and served["failures"] == 0  # one product per linear layer


def test_blinded_partition_with_an_altered_executor_layer_fails_closed(blind_stack, blinded, digits, unique_id):
    """The store swaps an outsourced layer's weights: the executor refuses the file (digest), so
    the request fails; it never returns a wrong prediction."""
    from sealedml.errors import Error

    model_id = unique_id("digits-swap")
    _, [(user, _)] = _publish(blind_stack, blinded, model_id)
    path = blind_stack.store / model_id / "v1.linear-1.onnx"
    layer = onnx.load_from_string(path.read_bytes())
    weights = onnx.numpy_helper.to_array(layer.graph.initializer[0]).copy()
    weights.flat[0] += 1
    layer.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weights, "w"))
    path.chmod(0o644)
    path.write_bytes(layer.SerializeToString())
    with pytest.raises(Error):
        blind_stack.infer_client(user).infer(model_id, {"input": digits.x_test[:2]})
