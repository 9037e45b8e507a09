"""How the platform starts instances: forked from its template (default) or spawned afresh.

Both must serve the same sealed model with the same result; the platform says
whether its template is in use and ready (``GET /v1/stats``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from sealedml import zoo
from tests.conftest import Stack, _make_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["fork", "spawn"])
def stack_by_start(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra = ["--instance-start", request.param, "--keep-alive", "0.5"]
    yield from _make_stack(tmp_path_factory.mktemp(f"start-{request.param}"), platform_extra=extra)


def test_instances_started_either_way_serve_the_same_answer(stack_by_start: Stack, unique_id) -> None:
    stack = stack_by_start
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    dm = zoo.digits()
    model_id = unique_id("digits")
    stack.publish(owner_ks, dm.model, model_id, users=[(user, user_ks)])
    client = stack.infer_client(user)
    x = dm.x_test[:4].astype(np.float32)
    first = client.infer(model_id, x)["probabilities"]
    assert client.last_cold_start
    stats = httpx.get(f"{stack.gateway.url}/v1/stats", timeout=10).json()
    forked = "start-fork" in str(stack.workdir)
    assert stats["template_ready"] is (True if forked else None)
    pids = _pids(stack)
    assert pids and all(isinstance(p, int) for p in pids)
    # Either way, the instance keeps heap faulted in for its next model load and tops it up
    # (at idle priority) after the request that loaded one: runtime/heap_reserve.py.
    reserves = _heap_reserves(stack)
    assert reserves and all(r["bytes"] == 48 << 20 and r["mode"] == "after-loads" for r in reserves)
    deadline = time.monotonic() + 30
    while not all(r["top_ups"] >= 1 for r in reserves) and time.monotonic() < deadline:
        time.sleep(0.2)
        reserves = _heap_reserves(stack)
    assert all(r["top_ups"] >= 1 for r in reserves), reserves
    # After keep-alive stops it, the next request starts another instance, which answers the same.
    deadline = time.monotonic() + 30
    while _pids(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pids(stack)
    second = client.infer(model_id, x)["probabilities"]
    assert client.last_cold_start
    assert _pids(stack).isdisjoint(pids)
    session = ort.InferenceSession(dm.model.SerializeToString())
    expected = session.run(["probabilities"], {"input": x})[0]
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first, second)


def _pids(stack: Stack) -> set[int]:
    stats = httpx.get(f"{stack.gateway.url}/v1/stats", timeout=10).json()
    return {i["pid"] for f in stats["functions"].values() for i in f["instances"]}


def _heap_reserves(stack: Stack) -> list[dict[str, int]]:
    stats = httpx.get(f"{stack.gateway.url}/v1/stats", timeout=10).json()
    urls = [i["url"] for f in stats["functions"].values() for i in f["instances"]]
    return [httpx.get(f"{url}/v1/stats", timeout=10).json()["heap_reserve"] for url in urls]
