"""One granted user cannot exhaust a shared instance with a flood of tiny tensors.

A 38.6 MiB request body of 600,000 one-byte tensors once took 7 s and 965 MiB
of a shared instance's memory to decode, killing other tenants' requests. The
safetensors header is now bounded — its size and its tensor count, at most the
model's number of inputs — before a single tensor is decoded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealedml.envelope import request as request_module
from sealedml.envelope.request import open_response, seal_request
from sealedml.envelope.tensors import MAX_HEADER, EncodedTensors, check_header, decode_tensors, encode_tensors
from sealedml.errors import EnvelopeError

FLOOD = 600_000


def flood_payload(count: int = FLOOD) -> bytes:
    """``count`` one-byte uint8 tensors in valid safetensors layout (built without decoding anything)."""
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(count))
    header = ("{" + entries + "}").encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes(count)


_MEASURE = """
import json, sys, time
from tests.security.test_tensor_flood import flood_payload
from sealedml.envelope.tensors import decode_tensors
from sealedml.errors import EnvelopeError

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field}")

payload = flood_payload()
max_tensors = None if sys.argv[1] == "none" else int(sys.argv[1])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
started = time.perf_counter()
try:
    decode_tensors(payload, max_tensors=max_tensors)
    error = None
except EnvelopeError as exc:
    error = exc.message
print(json.dumps({"mib": len(payload) / 2**20, "growth": status("VmHWM") - before,
                  "seconds": time.perf_counter() - started, "error": error}))
"""


def _measure(max_tensors: str) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, max_tensors], capture_output=True, text=True, timeout=120, check=True, cwd=repo
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("max_tensors", ["2", "none"])
def test_600000_tiny_tensors_are_refused_before_decoding(max_tensors: str) -> None:
    """Refused from the header alone: peak memory grows by under 50 MiB, in well under a second."""
    result = _measure(max_tensors)
    assert result["mib"] > 38  # the body of the original report
    assert result["error"] is not None and "header too large" in result["error"]
    assert result["growth"] < 50 * 2**20, result
    assert result["seconds"] < 1.0, result


def test_more_tensors_than_the_model_takes_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = encode_tensors({f"t{i}": np.zeros(1, np.uint8) for i in range(5)})
    decoded: list[bytes] = []
    monkeypatch.setattr("safetensors.numpy.load", lambda data: decoded.append(data))
    with pytest.raises(EnvelopeError, match="too many tensors: 5"):
        decode_tensors(payload, max_tensors=2)
    assert decoded == []  # nothing was decoded


def test_header_bounds() -> None:
    ok = encode_tensors({"x": np.zeros((2, 4), np.float32), "idx": np.zeros(2, np.int64)})
    assert set(check_header(ok, 2)) == {"x", "idx"}
    oversized = (MAX_HEADER + 1).to_bytes(8, "little") + b"{}"
    with pytest.raises(EnvelopeError, match="header too large"):
        check_header(oversized)
    with pytest.raises(EnvelopeError, match="malformed"):
        check_header((100).to_bytes(8, "little") + b"{}")  # claims more header than there is
    with pytest.raises(EnvelopeError, match="malformed"):
        check_header(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")


@pytest.mark.slow
def test_instance_refuses_a_tensor_flood_and_keeps_serving(stack: Any, toy_model: Any, monkeypatch: Any) -> None:
    """Through the gateway: the flood is answered with a sealed error quickly; the next request is served."""
    import httpx

    from sealedml.envelope.request import BINARY_CONTENT_TYPE, ResponseEnvelope

    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    stack.publish(owner_ks, toy_model, "flood", users=[(user, user_ks)])
    client = stack.infer_client(user)
    good = {"x": np.ones((1, 4), np.float32), "idx": np.array([1], np.int64)}
    client.infer("flood", good)  # warm: the model is loaded

    payload = flood_payload()
    with monkeypatch.context() as patch:  # a client that sends the flood as its "tensors"
        flood = EncodedTensors(payload, [])  # the whole flood as the "header", no tensor buffers
        patch.setattr(request_module, "encode_tensor_parts", lambda *args, **kwargs: flood)
        envelope, context = seal_request(
            {}, request_key=user.request_key("flood"), model_id="flood", user_id=user.principal_id
        )
    started = time.perf_counter()
    response = httpx.post(
        f"{stack.gateway.url}/v1/infer",
        content=envelope.to_binary(),
        headers={"content-type": BINARY_CONTENT_TYPE},
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text  # a sealed answer, like any other
    with pytest.raises(EnvelopeError, match="header too large"):
        open_response(context, ResponseEnvelope.parse(response.content))
    assert elapsed < 5.0
    assert client.infer("flood", good)["idx_plus_one"].tolist() == [2]
