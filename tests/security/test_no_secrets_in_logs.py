"""No key, request plaintext or response plaintext appears in any log or error message.

Runs a full flow — registration, sealing, release, inference, and the error
paths (denial, bad inputs, tampered model) — with every process logging at
DEBUG, then searches all logs and error messages for the secrets in the
encodings they could leak in (raw, hex, base64, numbers as text).

One model is an error channel: it packs its input into a ``Gather`` index, so
an out-of-range value makes ONNX Runtime fail with the input's value in its
message. That message reaches the user alone, sealed in the response; neither
the platform's nor the gateway's log, nor the plaintext HTTP answer, carries it.
"""

from __future__ import annotations

import base64
import logging
import os

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.attestation.measurement import measurement_for
from sealedml.client.gateway import InferenceClient
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.envelope.model_container import seal_model
from sealedml.envelope.request import BINARY_CONTENT_TYPE, ResponseEnvelope, open_response, seal_request
from sealedml.errors import Error, InputError
from sealedml.storage.modelstore import LocalModelStore
from tests.conftest import start_keyservice, start_platform

pytestmark = pytest.mark.slow

MARKER = 1234.5678  # a distinctive input value
OUT_MARKER = 9876.5432


def _encodings(secret: bytes) -> list[bytes]:
    return [
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        secret,
    ]


def gather_model() -> onnx.ModelProto:
    """``y = table[idx]``: an ``idx`` outside the 10-entry table fails with its value in ORT's message."""
    table = numpy_helper.from_array(np.arange(10, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], name="lookup")],
        "error_channel",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_no_secret_in_any_log_or_error(tmp_path, toy_model, caplog, monkeypatch):
    monkeypatch.setenv("SEALEDML_LOG_LEVEL", "DEBUG")
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    ks = start_keyservice(tmp_path, lease_ttl=60)
    gw = start_platform(tmp_path, ks.url)
    try:
        owner, user, stranger = Identity.generate(), Identity.generate(), Identity.generate()
        runtime = measurement_for("runtime", {"tee": "simulated"})
        model_key = os.urandom(32)
        with (
            KeyServiceClient(ks.url, owner) as o,
            KeyServiceClient(ks.url, user) as u,
            KeyServiceClient(ks.url, stranger) as s,
        ):
            for c in (o, u, s):
                c.register()
            store = LocalModelStore(tmp_path / "store")
            for model_id in ("toy", "toy-tampered", "gather"):
                o.upload_model_key(model_id, 1, model_key)
                graph = gather_model() if model_id == "gather" else toy_model
                blob = bytearray(seal_model(graph, model_id=model_id, model_version=1, model_key=model_key))
                if model_id == "toy-tampered":
                    blob[-40] ^= 1
                store.put(model_id, 1, bytes(blob))
                o.allow_runtime(model_id, runtime)
                o.grant(model_id, user.principal_id)
                u.enable(model_id, [runtime])
            s.enable("toy", [runtime])

        x = np.full((2, 4), MARKER, dtype=np.float32)
        idx = np.array([424242, 515151], dtype=np.int64)
        with InferenceClient(gw.url, user) as infer:
            out = infer.infer("toy", {"x": x, "idx": idx})
            for bad in ({"x": x}, {"x": x.astype(np.float64), "idx": idx}, {"x": x, "idx": idx.astype(np.int32)}):
                with pytest.raises(Error) as info:
                    infer.infer("toy", bad)
                errors.append(str(info.value))
            with pytest.raises(Error) as info:
                infer.infer("toy-tampered", {"x": x, "idx": idx})
            errors.append(str(info.value))
        with InferenceClient(gw.url, stranger) as infer, pytest.raises(Error) as info:
            infer.infer("toy", {"x": x, "idx": idx})
        errors.append(str(info.value))

        # The error channel: the raw answer the platform forwards is kept as it went over the wire.
        envelope, context = seal_request(
            {"idx": idx}, request_key=user.request_key("gather"), model_id="gather", user_id=user.principal_id
        )
        raw = httpx.post(
            f"{gw.url}/v1/infer",
            content=envelope.to_binary(),
            headers={"content-type": BINARY_CONTENT_TYPE},
            timeout=60,
        )
        wire = raw.content + str(raw.headers).encode()
        with pytest.raises(InputError) as sealed_error:
            open_response(context, ResponseEnvelope.parse(raw.content))
        # The user — and only the user, who sent it — reads ORT's detail with the value.
        assert "424242" in sealed_error.value.message
    finally:
        gw.stop()
        ks.stop()

    logs = b"".join(p.read_bytes() for p in tmp_path.glob("*.log"))
    assert b"sealed error" in logs  # the instance logged that the error-channel request failed …
    logs += "\n".join(r.getMessage() for r in caplog.records).encode()
    logs += "\n".join(errors).encode()
    logs += wire  # … and the plaintext answer the platform forwarded is in the search too
    assert b"loaded model toy" in logs  # the logs are real and at DEBUG/INFO detail

    secrets_: dict[str, bytes] = {
        "model key": model_key,
        "user request key": user.request_key("toy"),
        "owner signing key": owner.signing_key.private_bytes(),
        "user signing key": user.signing_key.private_bytes(),
        "user request seed": user.request_seed,
        "input bytes": x.tobytes(),
        "output bytes": out["y"].tobytes(),
        "index bytes": idx.tobytes(),
    }
    for name, secret in secrets_.items():
        for encoded in _encodings(secret):
            assert encoded not in logs, f"{name} leaked into logs or errors"
    for text in (str(MARKER), "1234.57", "424242", "515151", f"{float(out['y'][0, 0]):.4f}"):
        assert text.encode() not in logs, f"plaintext value {text} leaked"
