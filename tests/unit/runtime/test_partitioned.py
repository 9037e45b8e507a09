"""The partitioned engine in the TEE, the part containers, and the executor, without processes.

The executor is run in-process (:class:`ExecutorService`) or replaced by a
hostile stand-in that answers what an attacker controlling it would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest

from sealedml import zoo
from sealedml.client.owner import publish_partition
from sealedml.envelope.model_container import open_model, read_header, seal_model
from sealedml.envelope.tensors import encode_tensors
from sealedml.errors import ConfigurationError, Conflict, InputError, NotFound, ProtocolError, SealedModelError
from sealedml.partition.split import Partition, split_model
from sealedml.platform.executor import ExecutorService
from sealedml.runtime.engine import LoadedModel, Model
from sealedml.runtime.partitioned import PartitionedModel, open_partitioned
from sealedml.runtime.release import Lease
from sealedml.storage.modelstore import LocalModelStore

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def digits_partition() -> tuple[onnx.ModelProto, Partition]:
    """The trained digits classifier cut after standardization and after the matmul (cheap, exact)."""
    model = zoo.digits().model
    return model, split_model(model, ["scaled"], ["matmul"])


class _FakeKeyService:
    """Records what an owner uploads (the KeyService's own behaviour is tested in tests/unit/keyservice)."""

    def __init__(self) -> None:
        self.uploads: list[tuple[str, int, bytes, str | None]] = []

    def model_info(self, model_id: str) -> object:
        from sealedml.errors import AccessDenied

        raise AccessDenied()

    def upload_model_key(
        self, model_id: str, version: int, key: bytes, *, partition_sha256: str | None = None, signature=None
    ) -> None:
        self.uploads.append((model_id, version, key, partition_sha256))
        self.signature = signature


@pytest.fixture
def published(tmp_path: Path, digits_partition: tuple[onnx.ModelProto, Partition]) -> tuple[LocalModelStore, Lease]:
    _, partition = digits_partition
    store = LocalModelStore(tmp_path / "store")
    ks = _FakeKeyService()
    result = publish_partition(partition, model_id="digits", keyservice=ks, store=store)  # type: ignore[arg-type]
    [(_, version, key, digest)] = ks.uploads
    assert digest == result.partition_sha256 and version == 1
    lease = Lease("digits", "u", 1, key, b"r" * 32, 2e9, partition_sha256=digest)
    return store, lease


def _open(path: Path, part: str, lease: Lease) -> Model:
    return LoadedModel(
        open_model(path, lease.model_key, expected_model_id="digits", expected_version=1, expected_part=part),
        model_id="digits",
        version=1,
    )


class _InProcessExecutor:
    """The real executor's service, called directly instead of over HTTP."""

    def __init__(self, store: Path) -> None:
        self.service = ExecutorService(store, device="cpu")
        self.received: list[dict[str, np.ndarray]] = []

    def run_middle(self, model_id: str, version: int, sha: str, tensors: Mapping[str, np.ndarray]) -> dict:
        from sealedml.envelope.tensors import decode_tensors

        self.received.append(dict(tensors))
        out, _ = decode_tensors(self.service.run(model_id, version, sha, encode_tensors(tensors)))
        return out


def test_published_partition_serves_the_whole_models_outputs(published, digits_partition) -> None:
    store, lease = published
    model, partition = digits_partition
    header = read_header(store.path("digits", 1))
    assert (header.part, header.partition_sha256) == ("front", lease.partition_sha256)
    executor = _InProcessExecutor(store.root)
    served = open_partitioned(store, lease, header, lambda p, part: _open(p, part, lease), executor)  # type: ignore[arg-type]
    x = zoo.digits().x_test[:5]
    whole = LoadedModel(model, model_id="digits", version=1).run({"input": x}).outputs
    got = served.run({"input": x}).outputs
    np.testing.assert_array_equal(got["label"], whole["label"])
    np.testing.assert_allclose(got["probabilities"], whole["probabilities"], atol=1e-6)
    assert [set(t) for t in executor.received] == [{"scaled"}]  # the front cut, nothing else
    assert served.boundary_bytes == 5 * 64 * 4 + 5 * 10 * 4
    assert served.nbytes < LoadedModel(model, model_id="d", version=1).nbytes + 4096


def test_part_containers_cannot_be_served_as_something_else(published) -> None:
    store, lease = published
    front, back = store.path("digits", 1), store.part_path("digits", 1, "back.sealed")
    with pytest.raises(SealedModelError, match="is the front part of a partitioned model, expected a whole model"):
        open_model(front, lease.model_key)
    with pytest.raises(SealedModelError, match="is the back part of a partitioned model, expected the front part"):
        open_model(back, lease.model_key, expected_part="front")
    whole = seal_model(zoo.digits().model, model_id="digits", model_version=1, model_key=KEY)
    with pytest.raises(SealedModelError, match="is a whole model, expected the back part"):
        open_model(whole, KEY, expected_part="back")
    with pytest.raises(SealedModelError, match="needs both"):
        seal_model(zoo.digits().model, model_id="d", model_version=1, model_key=KEY, part="front")


def test_header_edits_of_a_part_fail_authentication(published) -> None:
    store, lease = published
    data = bytearray(store.path("digits", 1).read_bytes())
    data[data.index(b'"front"') + 1 : data.index(b'"front"') + 6] = b"back\x20"[:5]
    with pytest.raises(SealedModelError):
        open_model(bytes(data), lease.model_key, expected_part="front")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("lease_says_whole", "disagree on whether it is partitioned"),
        ("lease_other_digest", "another partition than the KeyService recorded"),
        ("manifest_edited", "not the one the parts were sealed with"),
    ],
)
def test_open_partitioned_refuses_mismatches(published, tamper: str, message: str) -> None:
    store, lease = published
    header = read_header(store.path("digits", 1))
    if tamper == "lease_says_whole":
        lease = Lease("digits", "u", 1, lease.model_key, lease.request_key, 2e9, partition_sha256=None)
    elif tamper == "lease_other_digest":
        lease = Lease("digits", "u", 1, lease.model_key, lease.request_key, 2e9, partition_sha256="ab" * 32)
    else:
        path = store.part_path("digits", 1, "partition.json")
        path.write_text(path.read_text().replace('"float32"', '"float64"', 1))
    with pytest.raises(SealedModelError, match=message):
        open_partitioned(store, lease, header, lambda p, part: _open(p, part, lease), None)


class _HostileExecutor:
    def __init__(self, answer: dict[str, np.ndarray]) -> None:
        self.answer = answer

    def run_middle(self, *args: object) -> dict[str, np.ndarray]:
        return self.answer


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"other": np.zeros((2, 10), np.float32)}, "other tensors than the back cut"),
        ({"matmul": np.zeros((2, 11), np.float32)}, r"expected float32\[2, 10\]"),
        ({"matmul": np.zeros((2, 10), np.float64)}, "expected float32"),
        ({}, "other tensors than the back cut"),
    ],
)
def test_an_executor_answer_that_is_not_the_back_cut_is_refused(published, answer, message) -> None:
    store, lease = published
    header = read_header(store.path("digits", 1))
    served = open_partitioned(
        store,
        lease,
        header,
        lambda p, part: _open(p, part, lease),
        _HostileExecutor(answer),  # type: ignore[arg-type]
    )
    with pytest.raises(ProtocolError, match=message):
        served.run({"input": zoo.digits().x_test[:2]})


def test_a_partitioned_model_without_an_executor_says_how_to_get_one(published) -> None:
    store, lease = published
    header = read_header(store.path("digits", 1))
    served = open_partitioned(store, lease, header, lambda p, part: _open(p, part, lease), None)
    assert isinstance(served, PartitionedModel)
    with pytest.raises(ConfigurationError, match="--executor local"):
        served.run({"input": zoo.digits().x_test[:1]})


def test_executor_refuses_a_swapped_middle_and_bad_tensors(published) -> None:
    store, lease = published
    service = ExecutorService(store.root, device="cpu")
    middle = store.part_path("digits", 1, "middle.onnx").read_bytes()
    sha = hashlib.sha256(middle).hexdigest()
    body = encode_tensors({"scaled": np.zeros((1, 64), np.float32)})
    assert service.run("digits", 1, sha, body)
    with pytest.raises(Conflict, match="not the one the runtime names"):
        service.run("digits", 1, "00" * 32, body)
    with pytest.raises(NotFound):
        service.run("digits", 2, sha, body)
    with pytest.raises(InputError, match="takes"):
        service.run("digits", 1, sha, encode_tensors({"x": np.zeros((1, 64), np.float32)}))
    with pytest.raises(InputError, match="failed"):
        service.run("digits", 1, sha, encode_tensors({"scaled": np.zeros((1, 3), np.float32)}))
    assert service.describe()["models"] == {"digits/v1": sha}
