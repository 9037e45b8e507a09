"""Shared fixtures: an isolated SealedML home, real services on loopback, principals.

Every test session gets its own ``SEALEDML_HOME`` (so its own simulated
platform root) — nothing is written to the real home directory.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest
import uvicorn

from sealedml._internal.procs import ServiceProcess

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO.parent / "shared" / "vectors" / "attestation"


@pytest.fixture(scope="session", autouse=True)
def sealedml_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("sealedml-home")
    old = os.environ.get("SEALEDML_HOME")
    os.environ["SEALEDML_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SEALEDML_HOME", None)
    else:
        os.environ["SEALEDML_HOME"] = old


@dataclass
class Served:
    """An ASGI app served in a thread of the test process."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_in_thread(app: Any, **ssl: Any) -> Served:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port (``ssl``: uvicorn's ssl_* options)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **ssl))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if ssl else "http"
    return Served(f"{scheme}://127.0.0.1:{port}", server, thread)


def start_keyservice(
    workdir: Path, *, lease_ttl: int = 60, data_dir: Path | None = None, extra: list[str] | None = None
) -> ServiceProcess:
    """A real KeyService process on a free loopback port."""
    return ServiceProcess.keyservice(
        data_dir or workdir / "keyservice",
        "--lease-ttl",
        str(lease_ttl),
        *(extra or []),
        log_path=workdir / "keyservice.log",
    )


def start_platform(workdir: Path, keyservice_url: str, *, extra: list[str] | None = None) -> ServiceProcess:
    """A real gateway process (it spawns real worker processes on demand)."""
    return ServiceProcess.platform(keyservice_url, workdir / "store", *(extra or []), log_path=workdir / "platform.log")


@dataclass
class Stack:
    """A KeyService and a gateway running as processes, plus helpers to act in them."""

    workdir: Path
    keyservice: ServiceProcess
    gateway: ServiceProcess
    clients: list[object] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    def principal(self, register: bool = True):  # -> tuple[Identity, KeyServiceClient]
        from sealedml.client.identity import Identity
        from sealedml.client.keyservice import KeyServiceClient

        identity = Identity.generate()
        client = KeyServiceClient(self.keyservice.url, identity)
        self.clients.append(client)
        if register:
            client.register()
        return identity, client

    def publish(self, owner_client, model: onnx.ModelProto, model_id: str, *, users=(), runtime: str | None = None):
        """Seal + store + upload key, allow this build's runtime, grant and enable ``users``."""
        from sealedml.attestation.measurement import measurement_for
        from sealedml.client.owner import publish_model
        from sealedml.storage.modelstore import LocalModelStore

        runtime = runtime or measurement_for("runtime", {"tee": "simulated"})
        published = publish_model(model, model_id=model_id, keyservice=owner_client, store=LocalModelStore(self.store))
        owner_client.allow_runtime(model_id, runtime)
        for identity, client in users:
            owner_client.grant(model_id, identity.principal_id)
            client.enable(model_id, [runtime])
        return published

    def infer_client(self, identity):
        from sealedml.client.gateway import InferenceClient

        client = InferenceClient(self.gateway.url, identity)
        self.clients.append(client)
        return client


def _make_stack(workdir: Path, lease_ttl: int = 60, platform_extra: list[str] | None = None) -> Iterator[Stack]:
    ks = start_keyservice(workdir, lease_ttl=lease_ttl)
    try:
        gw = start_platform(workdir, ks.url, extra=platform_extra)
    except BaseException:
        ks.stop()
        raise
    stack = Stack(workdir, ks, gw)
    try:
        yield stack
    finally:
        for client in stack.clients:
            client.close()  # type: ignore[attr-defined]
        gw.stop()
        ks.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """KeyService (lease TTL 60 s) + gateway, shared by the tests of one module."""
    yield from _make_stack(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="module")
def short_ttl_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """KeyService with a 1-second lease TTL (revocation tests) + gateway."""
    yield from _make_stack(tmp_path_factory.mktemp("stack-ttl"), lease_ttl=1)


@pytest.fixture(scope="session")
def toy_model() -> onnx.ModelProto:
    from sealedml import zoo

    return zoo.toy_multi_io()


@pytest.fixture
def unique_id(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Model ids unique per test (tests of one module share a KeyService)."""
    counter = {"n": 0}

    def make(prefix: str = "m") -> str:
        counter["n"] += 1
        name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:60]
        return f"{prefix}-{name}-{counter['n']}"

    return make


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real PostgreSQL server for the whole test session (pgserver: PostgreSQL binaries in a wheel,
    started as a child of this process; nothing is installed on the machine)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, on import: no XDG_RUNTIME_DIR (the /tmp fallback is fine)
        import pgserver

        server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import secrets

    import psycopg

    admin = postgres_server.get_uri()
    name = f"ks_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(postgres_server.get_uri(name))


def publish_key_for_one_user(url: str, model_id: str = "m"):  # -> tuple[Identity, Identity]
    """An owner's model key on the KeyService at ``url``, this build's runtime allowed, one user
    granted and consenting; returns (owner, user)."""
    from sealedml.attestation.measurement import measurement_for
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.crypto import random_bytes

    runtime = measurement_for("runtime", {"tee": "simulated"})
    owner, user = Identity.generate(), Identity.generate()
    with KeyServiceClient(url, owner) as oks, KeyServiceClient(url, user) as uks:
        oks.register()
        uks.register()
        oks.upload_model_key(model_id, 1, random_bytes(32))
        oks.allow_runtime(model_id, runtime)
        oks.grant(model_id, user.principal_id)
        uks.enable(model_id, [runtime])
    return owner, user
