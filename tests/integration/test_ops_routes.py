"""Liveness, readiness, metrics and an OpenAPI document on every service: KeyService, platform gateway,
runtime instance and executor, as real processes."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from sealedml import zoo
from sealedml._internal.procs import ServiceProcess

pytestmark = pytest.mark.slow


def _check(url: str, main_route: str) -> dict:
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/livez").json() == {"status": "live"}
        assert http.get("/readyz").json() == {"status": "ready"}
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert "# TYPE" in metrics.text
        document = http.get("/openapi.json").json()
    assert document["openapi"] == "3.1.0" and document["info"]["title"].startswith("SealedML")
    assert main_route in document["paths"] and "/readyz" in document["paths"]
    return document


def test_every_service_answers_the_operators_routes(stack, tmp_path: Path, unique_id) -> None:
    keyservice = _check(stack.keyservice.url, "/v1/release")
    assert {"ModelInfoResponse", "ReleaseRequest", "ModelSignature"} <= set(keyservice["components"]["schemas"])
    info = keyservice["paths"]["/v1/models/{model_id}/info"]["post"]
    assert info["parameters"][0]["name"] == "model_id"
    gateway = _check(stack.gateway.url, "/v1/infer")
    assert "post" in gateway["paths"]["/v1/infer"]
    # an instance: the platform starts one for the first request
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    model_id = unique_id("ops")
    stack.publish(owner_ks, zoo.toy_multi_io(), model_id, users=[(user, user_ks)])
    stack.infer_client(user).infer(model_id, {"x": np.ones((1, 4), np.float32), "idx": np.zeros(1, np.int64)})
    instances = [
        i
        for f in httpx.get(f"{stack.gateway.url}/v1/stats", timeout=30).json()["functions"].values()
        for i in f["instances"]
    ]
    _check(instances[0]["url"], "/v1/infer")
    with ServiceProcess.start(
        ["executor", "serve", "--store", str(tmp_path), "--port", "0", "--device", "cpu"],
        name="executor",
        log_path=tmp_path / "executor.log",
    ) as executor:
        _check(executor.url, "/v1/linear/{model_id}/{version}/{layer}")
