"""Owner workflow: seal a model (or a partitioned model), store it, hand its key to the KeyService."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from sealedml.client.keyservice import KeyServiceClient
from sealedml.client.model_check import check_model_file, signature_of_model, signature_of_specs
from sealedml.crypto import KEY_SIZE, random_bytes
from sealedml.envelope.model_container import DEFAULT_CHUNK_SIZE, is_tflite, seal_model
from sealedml.envelope.seal_file import seal_model_file
from sealedml.errors import AccessDenied, ConfigurationError
from sealedml.storage.modelstore import ModelStore

if TYPE_CHECKING:
    from sealedml.envelope.sealing import Progress
    from sealedml.partition.split import Partition
    from sealedml.protocol.keyservice import ModelSignature

__all__ = ["PublishedModel", "load_onnx", "publish_model", "publish_partition"]


@dataclass(frozen=True)
class PublishedModel:
    """What :func:`publish_model` did."""

    model_id: str
    version: int
    sealed_bytes: int
    sealed_sha256: str
    partition_sha256: str | None = None


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file (with any external data next to it).

    Raises:
        ConfigurationError: missing or not an ONNX model.
    """
    if not path.is_file():
        raise ConfigurationError(f"{path} not found")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise ConfigurationError(f"{path} is not an ONNX model") from exc


def load_model_file(path: Path) -> onnx.ModelProto | bytes:
    """An ONNX model (with its external data) or, for a TFLite FlatBuffer, the file's bytes unmodified.

    Raises:
        ConfigurationError: missing, or neither ONNX nor TFLite.
    """
    if not path.is_file():
        raise ConfigurationError(f"{path} not found")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if is_tflite(head):
        return path.read_bytes()
    return load_onnx(path)


def publish_model(
    model: onnx.ModelProto | bytes | Path,
    *,
    model_id: str,
    keyservice: KeyServiceClient,
    store: ModelStore,
    version: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    signature: ModelSignature | None = None,
    progress: Progress | None = None,
) -> PublishedModel:
    """Check that ``model`` loads, seal it under a fresh key, upload the key, then store the container.

    The key goes to the KeyService first (HPKE-sealed after verifying its
    attestation), so a stored container always has its key registered.
    ``signature``: the model's inputs and outputs, when the caller already loaded it
    (``check_model_file``); otherwise the model is loaded here first. ``progress`` is told
    (bytes sealed, in all) as the container is written.

    Raises:
        InputError: ONNX Runtime (or LiteRT) cannot load the model: nothing is sealed or uploaded.
    """
    if signature is None:
        signature = check_model_file(model) if isinstance(model, Path) else signature_of_model(model)
    version = version or _next_version(model_id, keyservice, store)
    model_key = random_bytes(KEY_SIZE)
    with tempfile.TemporaryDirectory(prefix="sealedml-seal-") as scratch:
        sealed = Path(scratch) / "container"
        # Streamed to a file in bounded memory (a 125 MB model does not take 5× that), then stored.
        size, digest = seal_model_file(
            sealed,
            model,
            model_id=model_id,
            model_version=version,
            model_key=model_key,
            chunk_size=chunk_size,
            progress=progress,
        )
        keyservice.upload_model_key(model_id, version, model_key, signature=signature)
        store.put_file(model_id, version, sealed)
    return PublishedModel(model_id, version, size, digest)


def _next_version(model_id: str, keyservice: KeyServiceClient, store: ModelStore) -> int:
    try:
        registered = keyservice.model_info(model_id).current_version
    except AccessDenied:  # a new model (or someone else's: the upload will be refused)
        registered = 0
    return max(registered, store.latest_version(model_id) or 0) + 1


def publish_partition(
    partition: Partition,
    *,
    model_id: str,
    keyservice: KeyServiceClient,
    store: ModelStore,
    version: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PublishedModel:
    """Publish a partitioned model: front and back sealed under one fresh key, the middle in the clear.

    The middle's weights and the intermediate representations it receives are
    visible to the cloud: that is the owner's choice in partitioning. A blinded
    partition seals the middle too and stores only its outsourced layers'
    quantized weights in the clear (``linear-<i>.onnx``). Every sealed
    parts carry the manifest's digest in their authenticated headers, and the
    KeyService records it, so users see that the version is partitioned
    (``model info``) and their keys are released only if they accepted that.
    The sealed front is stored last: the version exists once it is there.
    """
    manifest = partition.manifest.to_json().encode()
    digest = hashlib.sha256(manifest).hexdigest()
    version = version or _next_version(model_id, keyservice, store)
    model_key = random_bytes(KEY_SIZE)
    sealed = {
        part: seal_model(
            partition.part(part),
            model_id=model_id,
            model_version=version,
            model_key=model_key,
            chunk_size=chunk_size,
            part=part,
            partition_sha256=digest,
        )
        for part in (("front", "middle", "back") if partition.manifest.blind else ("front", "back"))
    }
    signature = signature_of_specs(partition.manifest.inputs, partition.manifest.outputs)
    keyservice.upload_model_key(model_id, version, model_key, partition_sha256=digest, signature=signature)
    store.put_part(model_id, version, "partition.json", manifest)
    if partition.manifest.blind is None:
        store.put_part(model_id, version, "middle.onnx", partition.middle.SerializeToString())
    else:
        store.put_part(model_id, version, "middle.sealed", sealed["middle"])
        for name, data in sorted(partition.artifacts.items()):
            store.put_part(model_id, version, name, data)
    store.put_part(model_id, version, "back.sealed", sealed["back"])
    store.put(model_id, version, sealed["front"])
    total = sum(len(data) for data in sealed.values())
    return PublishedModel(model_id, version, total, hashlib.sha256(sealed["front"]).hexdigest(), digest)
