"""A blinded partition published and opened as a runtime does, and the executor's blinded-layer endpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from sealedml.client.owner import publish_partition
from sealedml.envelope.model_container import read_header
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import ConfigurationError, Conflict, InputError, NotFound, SealedModelError
from sealedml.partition.blind.linear import apply_linear, find_linear_layers
from sealedml.partition.split import split_model
from sealedml.platform.executor import ExecutorService
from sealedml.runtime.partitioned import ExecutorClient, open_partitioned
from sealedml.runtime.release import Lease
from sealedml.storage.modelstore import LocalModelStore
from tests.unit.partition.test_blind import _small_cnn
from tests.unit.runtime.test_partitioned import _FakeKeyService, _open


@pytest.fixture
def published(tmp_path: Path):  # type: ignore[no-untyped-def]
    partition = split_model(_small_cnn(), ["r1"], ["r4"], blind=(8, 8))
    store = LocalModelStore(tmp_path / "store")
    ks = _FakeKeyService()
    publish_partition(partition, model_id="digits", keyservice=ks, store=store)  # type: ignore[arg-type]
    [(_, _, key, digest)] = ks.uploads
    return store, Lease("digits", "u", 1, key, b"r" * 32, 2e9, partition_sha256=digest), partition


def _open_middle(lease: Lease):  # type: ignore[no-untyped-def]
    from sealedml.envelope.model_container import open_model

    return lambda path: open_model(
        path, lease.model_key, expected_model_id="digits", expected_version=1, expected_part="middle"
    )


def test_the_store_holds_no_middle_in_the_clear(published):
    store, lease, partition = published
    names = sorted(p.name for p in (store.root / "digits").iterdir())
    assert names == sorted(
        ["v1.sealed", "v1.back.sealed", "v1.middle.sealed", "v1.partition.json"]
        + [f"v1.linear-{i}.onnx" for i in range(4)]
    )
    assert read_header(store.part_path("digits", 1, "middle.sealed")).part == "middle"


def test_opened_without_an_executor_says_how_to_get_one(published):
    store, lease, _ = published
    header = read_header(store.path("digits", 1))
    model = open_partitioned(store, lease, header, lambda p, part: _open(p, part, lease), None, _open_middle(lease))
    try:
        with pytest.raises(ConfigurationError, match="--executor local"):
            model.run({"input": np.zeros((1, 1, 8, 8), np.float32)})
    finally:
        model.close()


def test_a_runtime_that_cannot_open_a_sealed_middle_refuses(published):
    store, lease, _ = published
    header = read_header(store.path("digits", 1))
    with pytest.raises(SealedModelError, match="blinded"):
        open_partitioned(
            store, lease, header, lambda p, part: _open(p, part, lease), ExecutorClient("http://127.0.0.1:9")
        )


def test_a_sealed_middle_from_another_partition_is_refused(published, tmp_path):
    store, lease, _ = published
    other = LocalModelStore(tmp_path / "other")
    ks = _FakeKeyService()
    publish_partition(
        split_model(_small_cnn(seed=3), ["r1"], ["r4"], blind=(8, 8)), model_id="digits", keyservice=ks, store=other
    )  # type: ignore[arg-type]
    target = store.part_path("digits", 1, "middle.sealed")
    target.chmod(0o644)
    target.write_bytes(other.part_path("digits", 1, "middle.sealed").read_bytes())
    header = read_header(store.path("digits", 1))
    with pytest.raises(SealedModelError, match="another partition"):
        open_partitioned(store, lease, header, lambda p, part: _open(p, part, lease), None, _open_middle(lease))


def test_executor_multiplies_blinded_inputs_and_refuses_swaps(published):
    store, _, partition = published
    service = ExecutorService(store.root, device="cpu")
    layers = find_linear_layers(partition.middle)
    digests = [spec.sha256 for spec in partition.manifest.blind.layers]
    x = np.random.default_rng(0).integers(-(2**30), 2**30, (2, 4, 8, 8)).astype(np.float64)
    out, _ = decode_tensors(service.run_linear("digits", 1, 0, digests[0], encode_tensors({"x": x})))
    np.testing.assert_array_equal(out["y"], apply_linear(layers[0], x))
    with pytest.raises(Conflict, match="not the one the runtime names"):
        service.run_linear("digits", 1, 0, digests[1], encode_tensors({"x": x}))
    with pytest.raises(NotFound):
        service.run_linear("digits", 1, 9, "00" * 32, encode_tensors({"x": x}))
    with pytest.raises(InputError, match="float64"):
        service.run_linear("digits", 1, 0, digests[0], encode_tensors({"x": x.astype(np.float32)}))
    with pytest.raises(InputError, match="failed"):
        service.run_linear("digits", 1, 0, digests[0], encode_tensors({"x": np.zeros((1, 3, 8, 8))}))
    assert hashlib.sha256(store.part_path("digits", 1, "linear-0.onnx").read_bytes()).hexdigest() == digests[0]
