"""The worker speaks the OpenWhisk action protocol the way OpenWhisk's invoker uses it.

A real ``sealedml worker serve`` process against a real KeyService; requests are shaped like the
invoker's (``ContainerProxy.initializeAndRun``, ``WhiskAction.containerInitializer``):

* ``POST /init`` once, with ``{"value": {"name", "binary", "main", "env": {...}}}``;
* ``POST /run`` per activation, with the action's parameters in ``value`` and the activation
  context beside it (``namespace``, ``action_name``, ``activation_id``, ``transaction_id``,
  ``deadline`` — a string of epoch milliseconds — and ``api_key`` unless the action is annotated
  ``provide-api-key: false``).

The invoker judges a ``/run`` answer like ``ActivationResponse.processRunResponseContent`` (see
:func:`invoker_outcome`): 200 + a JSON object is a success, or an *application error* when the
object has an ``error`` field; any other status is an *action developer error*, after which
``ContainerProxy`` destroys the container. Interface:
https://github.com/apache/openwhisk/blob/master/docs/actions-new.md
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sealedml._internal.procs import ServiceProcess
from sealedml.envelope.request import RequestContext, ResponseEnvelope, open_response, seal_request

pytestmark = pytest.mark.slow

ACTION = "sealedml-digits"


# --------------------------------------------------------------------------- the invoker's view
def init_body(action: str = ACTION) -> dict[str, Any]:
    """What the invoker POSTs to /init for a blackbox (``--docker``) action without code."""
    return {
        "value": {
            "name": action,
            "binary": False,
            "main": "main",
            "env": {
                "__OW_NAMESPACE": "guest",
                "__OW_ACTION_NAME": f"/guest/{action}",
                "__OW_ACTIVATION_ID": "0123456789abcdef0123456789abcdef",
                "__OW_TRANSACTION_ID": "tid-0",
                "__OW_DEADLINE": str(int(time.time() * 1000) + 60_000),
            },
        }
    }


def run_body(value: Any, *, activation_id: str = "fedcba9876543210fedcba9876543210") -> dict[str, Any]:
    """What the invoker POSTs to /run: the parameters in ``value``, the activation context beside."""
    return {
        "value": value,
        "namespace": "guest",
        "action_name": f"/guest/{ACTION}",
        "activation_id": activation_id,
        "transaction_id": "tid-1",
        "deadline": str(int(time.time() * 1000) + 60_000),
        "api_key": "00000000-0000-0000-0000-000000000000:placeholder-not-a-key",
    }


def invoker_outcome(response: httpx.Response) -> tuple[str, bool]:
    """(activation status, container kept) as OpenWhisk's invoker would record them.

    Mirrors ``ActivationResponse.processRunResponseContent`` and the failure handling of
    ``ContainerProxy.initializeAndRun``: only "success" and "application error" keep the container.
    """
    try:
        body = response.json()
    except ValueError:
        return "action developer error", False
    if not isinstance(body, dict):
        return "action developer error", False
    if response.status_code != 200:
        return "action developer error", False
    if "error" in body:
        return "application error", True
    return "success", True


# --------------------------------------------------------------------------- fixtures
@dataclass
class Deployment:
    model_id: str
    user: Any  # Identity
    stranger: Any  # Identity (registered, never granted)


def _start_worker(stack, log: Path) -> ServiceProcess:
    return ServiceProcess.start(
        [
            "worker",
            "serve",
            "--keyservice",
            stack.keyservice.url,
            "--store",
            str(stack.store),
            "--port",
            "0",
            "--concurrency",
            "2",
        ],
        name="worker",
        log_path=log,
    )


@pytest.fixture(scope="module")
def worker(stack, tmp_path_factory) -> Iterator[ServiceProcess]:
    proc = _start_worker(stack, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def deployment(stack, worker: ServiceProcess) -> Deployment:
    """A model the user may use on runtimes with the worker's measurement; a stranger who may not."""
    from sealedml import zoo

    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    stranger, _ = stack.principal()
    model_id = "ow-digits"
    # The measurement the worker announced (the simulated one hashes the package's sources).
    stack.publish(
        owner_ks, zoo.digits().model, model_id, users=[(user, user_ks)], runtime=worker.announce["measurement"]
    )
    return Deployment(model_id, user, stranger)


@pytest.fixture(scope="module")
def action(worker: ServiceProcess, deployment: Deployment) -> Iterator[httpx.Client]:
    """An initialized action container (worker process), as after the invoker's /init."""
    client = httpx.Client(base_url=worker.url, timeout=60)
    try:
        assert client.post("/init", json=init_body()).status_code == 200
        yield client
    finally:
        client.close()


@pytest.fixture
def fresh_action(stack, tmp_path) -> Iterator[httpx.Client]:
    """A container that has not been initialized yet."""
    proc = _start_worker(stack, tmp_path / "worker.log")
    client = httpx.Client(base_url=proc.url, timeout=60)
    try:
        yield client
    finally:
        client.close()
        proc.stop()


def _digits(n: int = 3) -> np.ndarray:
    from sealedml import zoo

    return zoo.digits().x_test[:n]


def envelope_value(identity, model_id: str, x: np.ndarray | None = None) -> tuple[dict[str, Any], RequestContext]:
    """A sealed request in its JSON form (what a client passes as the action's parameters)."""
    envelope, context = seal_request(
        {"input": _digits() if x is None else x},
        request_key=identity.request_key(model_id),
        model_id=model_id,
        user_id=identity.principal_id,
    )
    return json.loads(envelope.model_dump_json()), context


def _open(response: httpx.Response, context: RequestContext) -> dict[str, np.ndarray]:
    return open_response(context, ResponseEnvelope.model_validate_json(response.content))


# --------------------------------------------------------------------------- /init
def test_init_protocol(fresh_action: httpx.Client, deployment: Deployment) -> None:
    value, context = envelope_value(deployment.user, deployment.model_id)

    before = fresh_action.post("/run", json=run_body(value))
    assert before.status_code == 403
    assert "error" in before.json()

    first = fresh_action.post("/init", json=init_body())
    assert first.status_code == 200
    assert first.json() == {"ok": True}

    again = fresh_action.post("/init", json=init_body())
    assert again.status_code == 403
    assert set(again.json()) == {"error"}

    after = fresh_action.post("/run", json=run_body(value))
    assert after.status_code == 200, after.text
    assert "label" in _open(after, context)


def test_init_accepts_a_bare_value(fresh_action: httpx.Client) -> None:
    """Initialization without code: ``{"value": {}}`` (the interface's 'initialized with no content')."""
    response = fresh_action.post("/init", json={"value": {}})
    assert response.status_code == 200
    assert response.json() == {"ok": True}


# --------------------------------------------------------------------------- /run: success
def test_run_returns_a_response_envelope_the_client_opens(action: httpx.Client, deployment: Deployment) -> None:
    value, context = envelope_value(deployment.user, deployment.model_id)
    response = action.post("/run", json=run_body(value))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"v", "request_id", "nonce", "ciphertext"}
    assert body["request_id"] == value["request_id"]
    assert invoker_outcome(response) == ("success", True)

    outputs = _open(response, context)
    import onnxruntime as ort

    from sealedml import zoo

    plain = ort.InferenceSession(zoo.digits().model.SerializeToString()).run(None, {"input": _digits()})
    np.testing.assert_array_equal(outputs["label"], plain[0])


def test_run_ignores_every_activation_context_field(action: httpx.Client, deployment: Deployment) -> None:
    value, context = envelope_value(deployment.user, deployment.model_id)
    body = run_body(value)
    body.update(
        {"action_version": "0.0.1", "transaction_id": "tid-9", "deadline": 1_900_000_000_000, "namespace": "another"}
    )
    body.pop("api_key")  # actions annotated provide-api-key=false get no api_key
    response = action.post("/run", json=body)
    assert response.status_code == 200, response.text
    assert "label" in _open(response, context)


def test_run_accepts_the_envelope_with_numbers_as_wsk_p_sends_them(
    action: httpx.Client, deployment: Deployment
) -> None:
    """``wsk action invoke -p v 1 -p timestamp 1700000000 ...`` sends JSON numbers."""
    value, context = envelope_value(deployment.user, deployment.model_id)
    assert isinstance(value["v"], int) and isinstance(value["timestamp"], int)
    response = action.post(
        "/run", content=json.dumps(run_body(value)).encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert "label" in _open(response, context)


def test_concurrent_runs_all_succeed(action: httpx.Client, deployment: Deployment) -> None:
    """``wsk action create --concurrency N``: the invoker sends up to N activations at once."""
    sizes = [1 + i % 4 for i in range(8)]
    requests = [envelope_value(deployment.user, deployment.model_id, _digits(n)) for n in sizes]

    def one(item: tuple[dict[str, Any], RequestContext]) -> tuple[int, Any]:
        value, context = item
        with httpx.Client(base_url=str(action.base_url), timeout=60) as client:
            response = client.post("/run", json=run_body(value, activation_id=value["request_id"]))
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, _open(response, context)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, requests))
    assert [status for status, _ in results] == [200] * 8, results
    assert [outputs["label"].shape[0] for _, outputs in results] == sizes


# --------------------------------------------------------------------------- /run: errors
def _error(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body, dict) and "error" in body, response.text
    return str(body["error"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (run_body("not an object"), 400, "protocol"),
        (run_body([1, 2, 3]), 400, "protocol"),
        ({"activation_id": "x"}, 200, "bad_envelope"),  # OpenWhisk: no "value" means {}
        (run_body({"model_id": "ow-digits"}), 200, "bad_envelope"),
        (
            run_body(
                {
                    "v": 2,
                    "model_id": "m",
                    "user_id": "u",
                    "request_id": "0" * 32,
                    "timestamp": 1,
                    "nonce": base64.b64encode(b"\0" * 12).decode(),
                    "ciphertext": "",
                }
            ),
            200,
            "bad_envelope",
        ),
    ],
    ids=["value-string", "value-array", "no-value", "incomplete-envelope", "wrong-version"],
)
def test_malformed_value_is_refused_with_the_right_status(
    action: httpx.Client, body: dict[str, Any], status: int, code: str
) -> None:
    # Not {"value": {...}}: protocol error (4xx). A dict value the action cannot use:
    # an OpenWhisk application error (200 + error), which keeps the container.
    response = action.post("/run", json=body)
    assert response.status_code == status, response.text
    assert _error(response) == code


def test_body_that_is_not_json_is_a_json_400(action: httpx.Client) -> None:
    response = action.post("/run", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert _error(response) == "protocol"


def test_user_without_grant_is_denied(action: httpx.Client, deployment: Deployment) -> None:
    value, _ = envelope_value(deployment.stranger, deployment.model_id)
    response = action.post("/run", json=run_body(value))
    assert response.status_code == 200  # application error: the container is kept
    assert response.json() == {"error": "denied", "message": "denied"}


def test_tampered_and_replayed_envelopes_are_refused(action: httpx.Client, deployment: Deployment) -> None:
    value, context = envelope_value(deployment.user, deployment.model_id)
    first = action.post("/run", json=run_body(value))
    assert first.status_code == 200
    replay = action.post("/run", json=run_body(value))
    assert replay.status_code == 200
    assert _error(replay) == "bad_envelope"

    value2, _ = envelope_value(deployment.user, deployment.model_id)
    # The JSON form carries bytes as base64 (pydantic writes the URL-safe alphabet, with padding).
    raw = bytearray(base64.urlsafe_b64decode(value2["ciphertext"]))
    raw[0] ^= 1
    value2["ciphertext"] = base64.urlsafe_b64encode(bytes(raw)).decode()
    tampered = action.post("/run", json=run_body(value2))
    assert tampered.status_code == 200
    assert _error(tampered) == "bad_envelope"


def test_bound_default_parameters_are_ignored(action: httpx.Client, deployment: Deployment) -> None:
    """OpenWhisk merges parameters bound with ``wsk action create -p K V`` into every ``value``;
    the action keeps only the envelope's own fields (they are all bound into its AAD)."""
    value, context = envelope_value(deployment.user, deployment.model_id)
    value["SEALEDML_KEYSERVICE"] = "http://ks.example:8700"
    response = action.post("/run", json=run_body(value))
    assert response.status_code == 200, response.text
    assert "label" in _open(response, context)


def test_handled_errors_do_not_make_the_invoker_destroy_the_container(
    action: httpx.Client, deployment: Deployment
) -> None:
    denied_value, _ = envelope_value(deployment.stranger, deployment.model_id)
    for body in (run_body(denied_value), run_body({"model_id": deployment.model_id})):
        response = action.post("/run", json=body)
        assert invoker_outcome(response) == ("application error", True), (response.status_code, response.text)


def test_container_keeps_serving_after_errors(action: httpx.Client, deployment: Deployment) -> None:
    """Outside OpenWhisk nothing tears the process down: errors do not poison the worker."""
    bad, _ = envelope_value(deployment.stranger, deployment.model_id)
    refused = action.post("/run", json=run_body(bad))
    assert refused.status_code == 200 and refused.json()["error"] == "denied"
    value, context = envelope_value(deployment.user, deployment.model_id)
    response = action.post("/run", json=run_body(value))
    assert response.status_code == 200
    assert "label" in _open(response, context)
