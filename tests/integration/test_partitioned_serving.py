"""Partitioned models end to end: front and back in the (simulated) TEE, the middle on an executor.

Real processes on loopback: a KeyService, a platform with its supervised executor
(``--executor local``), and, for the recording test, an executor behind a TCP
proxy that keeps every byte it forwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from sealedml._internal.procs import ServiceProcess
from sealedml.envelope.tensors import decode_tensors
from sealedml.errors import AccessDenied, Error
from sealedml.partition.split import Partition, split_model
from tests.conftest import Stack, _make_stack

pytestmark = pytest.mark.slow

#: MobileNetV2 (random weights: exactness and plumbing only) cut after its third block and at the pool.
FRONT, BACK = ["features.3.add"], ["avgpool"]


@pytest.fixture(scope="module")
def mobilenet() -> onnx.ModelProto:
    from sealedml import zoo

    return zoo.mobilenetv2()


@pytest.fixture(scope="module")
def partition(mobilenet: onnx.ModelProto) -> Partition:
    return split_model(mobilenet, FRONT, BACK)


@pytest.fixture(scope="module")
def part_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _make_stack(tmp_path_factory.mktemp("partitioned"), platform_extra=["--executor", "local"])


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)


def _publish(stack: Stack, partition: Partition, model_id: str, *, accept: bool = True, users: int = 1):
    """Owner publishes ``partition``; ``users`` users are granted and enable it (accepting partitioning or not)."""
    from sealedml.attestation.measurement import measurement_for
    from sealedml.client.owner import publish_partition
    from sealedml.storage.modelstore import LocalModelStore

    runtime = measurement_for("runtime", {"tee": "simulated"})
    owner, owner_ks = stack.principal()
    published = publish_partition(partition, model_id=model_id, keyservice=owner_ks, store=LocalModelStore(stack.store))
    owner_ks.allow_runtime(model_id, runtime)
    out = []
    for _ in range(users):
        user, user_ks = stack.principal()
        owner_ks.grant(model_id, user.principal_id)
        user_ks.enable(model_id, [runtime], accept_partitioned=accept)
        out.append((user, user_ks))
    return published, out


def _stats(stack: Stack) -> dict:
    return httpx.get(f"{stack.gateway.url}/v1/stats", timeout=30).json()


def test_partitioned_model_returns_the_whole_models_outputs(part_stack, partition, mobilenet, unique_id):
    model_id = unique_id("mnv2")
    published, [(user, user_ks)] = _publish(part_stack, partition, model_id)
    assert published.partition_sha256 is not None
    info = user_ks.model_info(model_id)
    assert info.partitioned and info.partition_sha256 == published.partition_sha256 and info.accepts_partitioned
    client = part_stack.infer_client(user)
    import onnxruntime as ort

    whole = ort.InferenceSession(mobilenet.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        x = _image(seed)
        got = client.infer(model_id, {"input": x})["logits"]
        expected = whole.run(["logits"], {"input": x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    executor = _stats(part_stack)["executor"]
    assert executor["alive"] and executor["restarts"] == 0
    served = httpx.get(f"{executor['url']}/v1/stats", timeout=30).json()
    assert served["requests"] >= 3 and f"{model_id}/v1" in served["models"]


def test_two_partitioned_models_share_an_instance(part_stack, mobilenet, unique_id):
    """Packing: a second partitioned model (other cuts) is served by the same instance."""
    other = split_model(mobilenet, ["features.5.add"], ["features.16.add"])
    first, second = unique_id("a"), unique_id("b")
    _, [(user_a, _)] = _publish(part_stack, split_model(mobilenet, FRONT, BACK), first)
    _, [(user_b, _)] = _publish(part_stack, other, second)
    x = _image(7)
    a = part_stack.infer_client(user_a).infer(first, {"input": x})["logits"]
    b = part_stack.infer_client(user_b).infer(second, {"input": x})["logits"]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)  # same model, different cuts
    instances = [i for f in _stats(part_stack)["functions"].values() for i in f["instances"]]
    assert any({first, second} <= set(i["models"]) for i in instances), instances


def test_user_who_did_not_accept_partitioning_gets_nothing(part_stack, partition, unique_id):
    model_id = unique_id("noaccept")
    _, [(user, user_ks)] = _publish(part_stack, partition, model_id, accept=False)
    info = user_ks.model_info(model_id)
    assert info.partitioned and not info.accepts_partitioned
    with pytest.raises(AccessDenied):
        part_stack.infer_client(user).infer(model_id, {"input": _image(0)})


def test_owner_cannot_hide_a_partition_from_the_keyservice(part_stack, partition, unique_id, monkeypatch):
    """A key uploaded as for a whole model, with partitioned containers in the store: the runtime refuses."""
    from sealedml.client.keyservice import KeyServiceClient

    upload = KeyServiceClient.upload_model_key

    def hide(self, model_id, version, model_key, *, partition_sha256=None, signature=None):  # type: ignore[no-untyped-def]
        return upload(self, model_id, version, model_key, partition_sha256=None, signature=signature)

    monkeypatch.setattr(KeyServiceClient, "upload_model_key", hide)
    model_id = unique_id("hidden")
    _, [(user, user_ks)] = _publish(part_stack, partition, model_id, accept=False)
    assert not user_ks.model_info(model_id).partitioned  # the KeyService was told "whole model"
    with pytest.raises(Error) as caught:
        part_stack.infer_client(user).infer(model_id, {"input": _image(0)})
    assert "partition" in str(caught.value)


def test_killing_the_executor_fails_only_requests_in_flight(part_stack, partition, unique_id):
    model_id = unique_id("kill")
    _, [(user, _)] = _publish(part_stack, partition, model_id)
    client = part_stack.infer_client(user)
    client.infer(model_id, {"input": _image(0)})  # warm: lease, model, executor session
    pid = _stats(part_stack)["executor"]["pid"]
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                client.infer(model_id, {"input": _image(1)})
                outcomes.append("ok")
            except Error as exc:
                outcomes.append(type(exc).__name__)

    worker = threading.Thread(target=load)
    worker.start()
    while len(outcomes) < 3:
        time.sleep(0.01)
    before = len(outcomes)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and outcomes[before:].count("ok") < 5:
        time.sleep(0.05)
    stop.set()
    worker.join(60)
    after = outcomes[before:]
    assert after.count("ok") >= 5, after
    failures = [o for o in after if o != "ok"]
    assert len(failures) <= 1, after  # one request at a time: at most the one in flight
    executor = _stats(part_stack)["executor"]
    assert executor["alive"] and executor["restarts"] == 1 and executor["pid"] != pid


class _RecordingProxy:
    """A TCP proxy on loopback that forwards to ``target`` and keeps every byte sent to it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.received = bytearray()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    self.received += data
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _http_bodies(raw: bytes) -> list[tuple[str, bytes]]:
    """(request line, body) of each HTTP/1.1 request in a byte stream (Content-Length bodies)."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, "truncated request"
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
        out.append((lines[0], rest[:length]))
        raw = rest[length:]
    return out


def test_executor_receives_only_the_front_cut(tmp_path: Path, partition, mobilenet, monkeypatch):
    """Everything the executor receives, byte for byte: the front cut's tensors, nothing else."""
    import sealedml.client.owner as owner

    keys: list[bytes] = []
    original = owner.random_bytes
    monkeypatch.setattr(owner, "random_bytes", lambda n: keys.append(original(n)) or keys[-1])
    store = tmp_path / "store"
    executor = ServiceProcess.start(
        ["executor", "serve", "--store", str(store), "--port", "0"], name="executor", log_path=tmp_path / "ex.log"
    )
    proxy = _RecordingProxy(int(executor.url.rsplit(":", 1)[1]))
    stack_iter = _make_stack(tmp_path, platform_extra=["--executor", f"http://127.0.0.1:{proxy.port}"])
    stack = next(stack_iter)
    try:
        model_id = "recorded"
        _, [(user, _)] = _publish(stack, partition, model_id)
        inputs = [_image(10 + i) for i in range(3)]
        client = stack.infer_client(user)
        outputs = [client.infer(model_id, {"input": x})["logits"] for x in inputs]
    finally:
        with pytest.raises(StopIteration):
            next(stack_iter)
        executor.stop()
        proxy.close()
    requests = _http_bodies(bytes(proxy.received))
    assert [line.split()[:2] for line, _ in requests] == [["POST", f"/v1/middle/{model_id}/1"]] * 3
    front_cut = {t.name for t in partition.manifest.front_cut}
    import onnxruntime as ort

    front = ort.InferenceSession(partition.front.SerializeToString(), providers=["CPUExecutionProvider"])
    for (_, body), x in zip(requests, inputs, strict=True):
        tensors, _ = decode_tensors(body)
        assert set(tensors) == front_cut  # exactly the IR the assessment measures
        np.testing.assert_allclose(tensors[FRONT[0]], front.run(FRONT, {"input": x})[0], atol=1e-6)
    recorded = bytes(proxy.received)
    secrets = [user.request_key(model_id), *keys]
    for needle in [x.tobytes()[:4096] for x in inputs] + [y.tobytes() for y in outputs] + secrets:
        assert needle not in recorded
    assert len(keys) == 1 and len(keys[0]) == 32


def test_partitioned_model_runs_memory_bounded(tmp_path: Path, partition, mobilenet):
    """Under --memory-budget the front and back run memory-bounded: weights decrypted per segment."""
    budget = 12 * 1000 * 1000  # the front's activations alone need 10.5 MB at batch 1
    stack_iter = _make_stack(
        tmp_path, platform_extra=["--executor", "local", "--memory-budget", f"{budget // 1000 // 1000}MB"]
    )
    stack = next(stack_iter)
    try:
        _, [(user, _)] = _publish(stack, partition, "bounded")
        client = stack.infer_client(user)
        x = _image(3)
        got = client.infer("bounded", {"input": x})["logits"]
        import onnxruntime as ort

        whole = ort.InferenceSession(mobilenet.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(got, whole.run(["logits"], {"input": x})[0], atol=1e-4, rtol=0)
        assert client.last_peak_bytes is not None and 0 < client.last_peak_bytes <= budget
    finally:
        with pytest.raises(StopIteration):
            next(stack_iter)
