"""Instances forked from the pre-imported template (:mod:`sealedml.platform.template`).

Siblings forked from one template must not share anything secret: not their
random state, not their keys. The template is real (the standard library's
forkserver, with the platform's preload list), and so are the instances: real
``worker serve`` processes, whose RA-TLS keys are compared.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealedml.attestation.simulated import SimulatedPlatform
from sealedml.crypto import HpkeKem, HpkePrivateKey
from sealedml.errors import ServiceUnavailable
from sealedml.platform import template
from sealedml.platform.process import InstanceSpec, WorkerProcess
from tests.unit.runtime.test_heap_reserve import report_second_thread_faults

SIBLINGS = 3


def report_state() -> int:
    """Runs in a forked child: what it would draw and generate, as one JSON line on stdout."""
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    state = {
        "pid": os.getpid(),
        "numpy": np.random.random(),
        "python": random.random(),
        "urandom": os.urandom(16).hex(),
        "x25519": raw.hex(),
        "hpke": HpkePrivateKey(HpkeKem.MLKEM768_X25519).public_key.to_bytes().hex(),
        "cwd": os.getcwd(),
    }
    print(json.dumps(state), flush=True)
    return 0


async def _fork_and_read(workdir: str, target: Any = report_state) -> dict[str, Any]:
    child = await template.fork(target, (), workdir)
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
    assert await asyncio.wait_for(child.wait(), timeout=30) == 0
    state: dict[str, Any] = json.loads(line)
    return state


def test_siblings_hold_different_random_state_and_keys(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        dirs = []
        for i in range(SIBLINGS):
            (tmp_path / str(i)).mkdir()
            dirs.append(str(tmp_path / str(i)))
        return [await _fork_and_read(d) for d in dirs]

    states = asyncio.run(main())
    assert len({s["pid"] for s in states}) == SIBLINGS
    # Each in the directory it was given, not the template's.
    assert [Path(s["cwd"]).resolve() for s in states] == [(tmp_path / str(i)).resolve() for i in range(SIBLINGS)]
    for field in ("numpy", "python", "urandom", "x25519", "hpke"):
        assert len({s[field] for s in states}) == SIBLINGS, f"siblings share {field}"


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="glibc arenas, per-thread page faults")
def test_forked_instances_allocate_from_one_arena(tmp_path: Path) -> None:
    # The heap reserve (runtime/heap_reserve.py) faults pages in on its own thread for a model
    # load on another: only one arena makes them the same pages. The template sets it before
    # any library starts a thread (template_arena.py). tests/unit/runtime/test_heap_reserve.py
    # shows the same measurement counting every page again with glibc's default arenas.
    state = asyncio.run(_fork_and_read(str(tmp_path), report_second_thread_faults))
    assert state["faults"] < (24 << 20) // 4096 // 10


def _certificate_key(url: str) -> bytes:
    host, port = url.removeprefix("https://").split(":")
    pem = ssl.get_server_certificate((host, int(port)))
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_two_forked_instances_hold_different_keys(tmp_path: Path) -> None:
    SimulatedPlatform.load()  # the host's simulated platform root, as a KeyService would create it
    store = tmp_path / "store"
    store.mkdir()
    # Nothing answers at this KeyService address: instances start and serve without one.
    spec = InstanceSpec(keyservice="http://127.0.0.1:9", store=store, tls="ra", from_template=True)

    async def main() -> tuple[list[bytes], list[Path]]:
        instances = [WorkerProcess(spec) for _ in range(2)]
        try:
            for instance in instances:
                await instance.start()
            keys = [await asyncio.to_thread(_certificate_key, i.url) for i in instances]
            # Where each instance serves from: its own private directory.
            dirs = [Path(os.readlink(f"/proc/{i.pid}/cwd")) for i in instances]
            dirs += [Path(str(i.workdir)) for i in instances]
            return keys, dirs
        finally:
            for instance in instances:
                await instance.stop()

    keys, dirs = asyncio.run(main())
    assert keys[0] != keys[1]
    assert len(set(dirs)) == 4
    # A stopped instance leaves no directory behind: neither its own nor the platform's for it.
    assert not any(d.exists() for d in dirs)


def test_a_forked_instance_that_fails_reports_its_exit_status(tmp_path: Path) -> None:
    spec = InstanceSpec(
        keyservice="http://127.0.0.1:9", store=tmp_path, from_template=True, extra_args=("--concurrency", "0")
    )
    instance = WorkerProcess(spec)
    with pytest.raises(ServiceUnavailable, match="exited during start"):
        asyncio.run(instance.start())
    assert instance.process is not None and instance.process.returncode not in (None, 0)
