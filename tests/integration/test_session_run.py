"""``sealedml run`` end to end, as real processes: a KeyService, unmodified scripts run as services
of a session, encrypted volumes, revocation through the lease, and the network shield."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealedml.attestation.measurement import measurement_for
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.sessions.document import SessionDocument, sign_session
from sealedml.sessions.launcher import program_digest
from tests.conftest import start_keyservice

APP = """\
import json, os, pathlib, sys
token = os.environ["TOKEN"]
with open("/run/secrets/token") as f:
    injected = f.read()
data = pathlib.Path(os.environ.get("DATA", "/volumes/data"))
runs = int((data / "runs.txt").read_text()) if (data / "runs.txt").exists() else 0
(data / "runs.txt").write_text(str(runs + 1))
print(json.dumps({"token_matches": injected == token, "len": len(token), "argv": sys.argv[1:], "runs": runs + 1,
                  "listing": sorted(os.listdir(data))}))
"""

SLEEPER = """\
import time
print("started", flush=True)
while True:
    time.sleep(0.1)
"""

ECHO_SERVER = """\
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = server.accept()
data = b""
while not data.endswith(b"\\n"):
    chunk = conn.recv(4096)
    if not chunk:
        break
    data += chunk
conn.sendall(b"echo:" + data)
conn.close()
"""

CLIENT = """\
import socket, sys, time
for attempt in range(20):
    try:
        sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
        sock.sendall(b"hello over the shield\\n")
        answer = sock.recv(4096)
        if answer:
            print(answer.decode().strip(), flush=True)
            break
        sock.close()
    except OSError:
        pass
    time.sleep(0.1)
else:
    print("refused", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def program(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return measurement_for("program", {"tee": "simulated", "program": program_digest(path)})


class Session:
    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.owners = [Identity.generate() for _ in range(2)]
        self.client = KeyServiceClient(url, self.owners[0])
        self.client.register()
        self.digest: str | None = None
        self.revision = 0

    def put(self, services: dict[str, Any], secrets: dict[str, Any] | None = None) -> None:
        self.revision += 1
        doc: dict[str, Any] = {
            "version": 1,
            "name": self.name,
            "revision": self.revision,
            "access_policy": {"signers": [o.signing_key.public_bytes.hex() for o in self.owners], "threshold": 2},
            "secrets": secrets or {"token": {"kind": "ascii", "size": 20}, "vk": {"kind": "binary", "size": 32}},
            "services": services,
        }
        if self.digest:
            doc["predecessor"] = self.digest
        document = SessionDocument.model_validate(doc)
        signatures = [sign_session(document, o.signing_key).model_dump() for o in self.owners]
        self.digest = self.client.put_session(doc, signatures)["digest"]


def run_args(url: str, session: str, service: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sealedml", "run", "--session", session, "--service", service,
            "--keyservice", url, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def keyservice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("session-run")
    ks = start_keyservice(workdir, lease_ttl=3)
    yield ks.url, workdir / "keyservice"
    ks.stop()


def denials(data_dir: Path, session: str) -> list[str]:
    with sqlite3.connect(data_dir / "keyservice.sqlite3") as db:
        events = [json.loads(row[0]) for row in db.execute("SELECT event FROM audit ORDER BY seq")]
    return [e["reason"] for e in events if e.get("session") == session and e.get("decision") == "deny"]


def test_run_injects_env_files_argv_and_a_volume_then_refuses_another_program(
    keyservice: tuple[str, Path], tmp_path: Path
) -> None:
    url, data_dir = keyservice
    app = tmp_path / "app.py"
    session = Session(url, "acme/run")
    session.put(
        {
            "app": {
                "measurements": {"simulated": [program(app, APP)]},
                "env": {"TOKEN": "${secret:token}"},
                "files": {"/run/secrets/token": "${secret:token}"},
                "argv": ["--from-session"],
                "volumes": {"data": "vk"},
            }
        }
    )
    volume = tmp_path / "volume"
    for runs in (1, 2):  # the second run finds what the first wrote in the encrypted volume
        proc = subprocess.run(
            [*run_args(url, "acme/run", "app", "--volume", f"data={volume}"), "--", "python", str(app), "x"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out == {"token_matches": True, "len": 20, "argv": ["x", "--from-session"], "runs": runs,
                       "listing": ["runs.txt"]}  # fmt: skip
    assert sorted(p.name for p in volume.iterdir()) == [".volume", "runs.txt.sealed"]
    # Sealed, not plain: the one-byte file became a record with a 16-byte tag. (Searching the
    # ciphertext's tail for the byte b"2" failed about one run in fifteen: random bytes hold it.)
    sealed = (volume / "runs.txt.sealed").read_bytes()
    assert sealed != b"2" and len(sealed) >= 1 + 16

    app.write_text(APP + "\nprint('changed')\n")  # another program: nothing is released
    proc = subprocess.run(
        [*run_args(url, "acme/run", "app", "--volume", f"data={volume}"), "--", "python", str(app)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 4 and "denied" in proc.stderr and "token_matches" not in proc.stdout  # exit code: denied
    assert any("does not allow runtime simulated:" in reason for reason in denials(data_dir, "acme/run"))


def test_revocation_stops_a_running_program_and_a_restart_gets_nothing(
    keyservice: tuple[str, Path], tmp_path: Path
) -> None:
    url, data_dir = keyservice
    sleeper = tmp_path / "sleeper.py"
    measurement = program(sleeper, SLEEPER)
    session = Session(url, "acme/revoke")
    session.put({"worker": {"measurements": {"simulated": [measurement]}}})
    command = [*run_args(url, "acme/revoke", "worker"), "--", "python", str(sleeper)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        session.put({"worker": {"measurements": {"simulated": ["0" * 96]}}})  # revoke this program
        revoked_at = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - revoked_at < 3 + 6  # within the lease TTL (3 s), plus the stop's grace
        assert proc.returncode != 0
        assert proc.stderr is not None and "revoked" in proc.stderr.read()
    finally:
        proc.kill()
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 4 and "started" not in again.stdout  # denied


def test_two_services_talk_over_mutual_tls_and_another_session_is_refused(
    keyservice: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = keyservice
    server, client = tmp_path / "server.py", tmp_path / "client.py"
    server_m, client_m = program(server, ECHO_SERVER), program(client, CLIENT)
    session = Session(url, "acme/net")
    session.put(
        {
            "db": {"measurements": {"simulated": [server_m]}, "peers": ["app"]},
            "app": {"measurements": {"simulated": [client_m]}, "peers": ["db"]},
        }
    )
    stranger = Session(url, "other/net")
    stranger.put({"app": {"measurements": {"simulated": [client_m]}, "peers": ["db"]},
                  "db": {"measurements": {"simulated": [server_m]}}})  # fmt: skip

    def serve() -> tuple[subprocess.Popen[str], int]:
        plain, tls = free_port(), free_port()
        proc = subprocess.Popen(
            [*run_args(url, "acme/net", "db", "--expose", f"127.0.0.1:{tls}=127.0.0.1:{plain}"),
             "--", "python", str(server), str(plain)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        return proc, tls

    def connect(session_name: str, tls: int) -> subprocess.CompletedProcess[str]:
        local = free_port()
        return subprocess.run(
            [*run_args(url, session_name, "app", "--connect", f"127.0.0.1:{local}=db@127.0.0.1:{tls}"),
             "--", "python", str(client), str(local)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    proc, tls = serve()
    try:
        refused = connect("other/net", tls)  # another session's CA: the handshake fails both ways
        assert refused.returncode == 0 and refused.stdout.strip() == "refused", refused.stderr[-2000:]
        assert "TLS handshake failed" in refused.stderr
        talked = connect("acme/net", tls)
        assert talked.returncode == 0, talked.stderr[-2000:]
        assert talked.stdout.strip() == "echo:hello over the shield"
        proc.wait(timeout=30)
        assert proc.returncode == 0
    finally:
        proc.kill()


def test_owners_manage_a_session_from_the_command_line(keyservice: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = keyservice
    owners = [tmp_path / "alice.json", tmp_path / "bob.json"]

    def cli(*args: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "sealedml", *args, "--json"], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    keys = []
    for path in owners:
        cli("identity", "new", "--out", str(path))
        cli("register", "--keyservice", url, "--identity", str(path))
        keys.append(Identity.load(path).signing_key.public_bytes.hex())
    document = tmp_path / "session.yaml"
    document.write_text(
        textwrap.dedent(f"""\
        version: 1
        name: acme/cli
        revision: 1
        access_policy: {{signers: [{keys[0]}, {keys[1]}], threshold: 2}}
        secrets:
          password: {{kind: ascii, uploaded: true}}
        services:
          app:
            measurements: {{simulated: ["{"a" * 96}"]}}
            env: {{PASSWORD: "${{secret:password}}"}}
        """)
    )
    digest = cli("session", "digest", str(document))
    signatures = tmp_path / "signatures.json"
    for path in owners:
        signed = cli("session", "sign", str(document), "--identity", str(path), "--signatures", str(signatures))
    assert signed["signatures"] == 2
    put = cli("session", "put", str(document), "--signatures", str(signatures), "--keyservice", url,
              "--identity", str(owners[1]))  # fmt: skip
    assert put["digest"] == digest["digest"] and put["revision"] == 1
    value = tmp_path / "password.txt"
    value.write_text("correct horse")
    cli("session", "secret", "acme/cli", "password", "--value-file", str(value), "--keyservice", url,
        "--identity", str(owners[0]))  # fmt: skip
    shown = cli("session", "show", "acme/cli", "--keyservice", url, "--identity", str(owners[0]))
    assert shown["secrets_set"] == ["password"] and shown["digest"] == digest["digest"]
    assert "correct horse" not in json.dumps(shown)
