"""Run one SECO server process: ``sealedml seco serve --role gateway|remote``.

Each process loads its own deployment directory (:mod:`sealedml.seco.deploy`), starts its own
HE side process (its secret-key share lives and dies there), and serves its app on
loopback (:mod:`sealedml.seco.http`). With ``record``, every message the server opens is
appended to a JSON-lines file — sender, kind, size and the payload (base64) — an audit of
exactly what this server learns, which is what the tests search for secrets.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from sealedml._internal.procs import ServiceProcess
from sealedml._internal.serve import serve_app
from sealedml.errors import ConfigurationError
from sealedml.seco.deploy import PARTY_DIRS, load_party
from sealedml.seco.gateway import Gateway
from sealedml.seco.he.client import HeSidecar
from sealedml.seco.http import HttpRemote, gateway_app, remote_app
from sealedml.seco.remote import Recorder, RemoteServer

__all__ = ["file_recorder", "seco_servers", "serve_gateway", "serve_remote"]


def file_recorder(path: Path) -> Recorder:
    """A recorder appending one JSON line per opened message to ``path`` (created 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    lock = threading.Lock()

    def record(sender: str, kind: str, payload: bytes) -> None:
        line = {"from": sender, "kind": kind, "bytes": len(payload), "payload": base64.b64encode(payload).decode()}
        with lock, path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    return record


def serve_remote(directory: Path, host: str, port: int, *, record: Path | None = None) -> None:
    """Run remote server B or C from its deployment directory until stopped."""
    party = load_party(directory, expect="BC")
    assert party.weights is not None and party.biases is not None
    with HeSidecar.start() as engine:
        server = RemoteServer(
            party.name,
            party.architecture,
            party.weights,
            party.biases,
            party.key,
            party.peers,
            engine,
            recorder=file_recorder(record) if record else None,
        )
        serve_app(remote_app(server), host, port, announce={"role": "remote", "party": party.name})


def serve_gateway(
    directory: Path, remotes: Mapping[str, str], host: str, port: int, *, record: Path | None = None
) -> None:
    """Run the gateway A from its deployment directory, reaching B and C at ``remotes``, until stopped."""
    if set(remotes) != {"B", "C"}:
        raise ConfigurationError("give --remote B=URL and --remote C=URL")
    party = load_party(directory, expect="A")
    handles = {name: HttpRemote(name, url) for name, url in remotes.items()}
    with HeSidecar.start() as engine:
        gateway = Gateway(
            party.architecture,
            party.key,
            party.peers,
            engine,
            handles,
            recorder=file_recorder(record) if record else None,
        )
        try:
            serve_app(gateway_app(gateway), host, port, announce={"role": "gateway", "party": "A"})
        finally:
            gateway.close()
            for handle in handles.values():
                handle.close()


@contextlib.contextmanager
def seco_servers(
    deployment: Path, *, record_dir: Path | None = None, log_dir: Path | None = None
) -> Iterator[dict[str, ServiceProcess]]:
    """B, C and A from a :func:`~sealedml.seco.deploy.deploy` directory, each its own process.

    Yields the three processes by party (``"A"``'s URL is the user's gateway); stops them all
    on exit. ``record_dir``: each server records what it opens to ``record_dir/<party>.jsonl``.
    """
    started: dict[str, ServiceProcess] = {}

    def extra(party: str) -> list[str]:
        return ["--record", str(record_dir / f"{party}.jsonl")] if record_dir is not None else []

    def log(party: str) -> Path | None:
        return log_dir / f"seco-{party}.log" if log_dir is not None else None

    try:
        for party in ("B", "C"):
            args = ["seco", "serve", "--role", "remote", "--dir", str(deployment / PARTY_DIRS[party]), "--port", "0"]
            started[party] = ServiceProcess.start(
                [*args, *extra(party)], name=f"SECO server {party}", log_path=log(party)
            )
        remotes = [f"--remote=B={started['B'].url}", f"--remote=C={started['C'].url}"]
        args = ["seco", "serve", "--role", "gateway", "--dir", str(deployment / PARTY_DIRS["A"]), "--port", "0"]
        started["A"] = ServiceProcess.start([*args, *remotes, *extra("A")], name="SECO gateway", log_path=log("A"))
        yield started
    finally:
        for process in started.values():
            process.stop()
