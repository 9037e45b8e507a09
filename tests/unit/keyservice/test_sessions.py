"""The KeyService's sessions over real HTTP on loopback: k-of-n revisions, generated and uploaded
secrets, attested release of a service's bundle, revocation, and volume root tags."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealedml.attestation.simulated import SimulatedAttester
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.errors import AccessDenied, AuthenticationError, Conflict, ProtocolError, StoreError
from sealedml.keyservice import build_keyservice
from sealedml.keyservice.app import create_app
from sealedml.protocol import sessions as ps
from sealedml.sessions.ca import certificate_identity
from sealedml.sessions.document import SessionDocument, sign_session
from sealedml.sessions.program import LeaseTracker, SessionLease, release_session
from sealedml.shield.volume import Volume, VolumeRollbackError
from tests.conftest import Served, serve_in_thread


class _Attesters:
    """Made on first use, inside the test session's own SEALEDML_HOME (its platform root)."""

    @functools.cached_property
    def program(self) -> SimulatedAttester:
        return SimulatedAttester(role="program", config={"program": "a" * 64})

    @functools.cached_property
    def other(self) -> SimulatedAttester:
        return SimulatedAttester(role="program", config={"program": "b" * 64})


ATTESTERS = _Attesters()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def keyservice(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, Any]]:
    """A KeyService on each store; the second item is where its audit log is (a directory or a URL)."""
    data = tmp_path_factory.mktemp("ks-sessions")
    url = None
    if request.param == "postgresql":
        import psycopg

        server = request.getfixturevalue("postgres_server")
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE sessions_{data.name.replace('-', '_')}")
        url = server.get_uri(f"sessions_{data.name.replace('-', '_')}")
    service = build_keyservice(data, lease_ttl=30, store=url)
    served = serve_in_thread(create_app(service))
    yield served, url or data
    served.stop()
    service.store.close()


class Owners:
    def __init__(self, url: str, n: int = 3) -> None:
        self.identities = [Identity.generate() for _ in range(n)]
        self.clients = [KeyServiceClient(url, identity) for identity in self.identities]
        for client in self.clients:
            client.register()

    def document(self, name: str, *, revision: int = 1, predecessor: str | None = None, **changes: Any) -> dict:
        doc: dict[str, Any] = {
            "version": 1,
            "name": name,
            "revision": revision,
            "access_policy": {"signers": [i.signing_key.public_bytes.hex() for i in self.identities], "threshold": 2},
            "secrets": {
                "token": {"kind": "ascii", "size": 24},
                "password": {"kind": "ascii", "uploaded": True},
                "volume_key": {"kind": "binary", "size": 32},
            },
            "services": {
                "app": {
                    "measurements": {"simulated": [ATTESTERS.program.measurement]},
                    "env": {"TOKEN": "${secret:token}"},
                    "argv": ["--password", "${secret:password}"],
                    "files": {"/run/secrets/token": "${secret:token}"},
                    "volumes": {"data": "volume_key"},
                    "peers": ["db"],
                },
                "db": {"measurements": {"simulated": [ATTESTERS.other.measurement]}, "peers": ["app"]},
            },
        }
        if predecessor is not None:
            doc["predecessor"] = predecessor
        doc.update(changes)
        return doc

    def put(self, doc: dict, signers: tuple[int, ...] = (0, 1), caller: int = 0) -> dict:
        document = SessionDocument.model_validate(doc)
        signatures = [sign_session(document, self.identities[i].signing_key).model_dump() for i in signers]
        return self.clients[caller].put_session(doc, signatures)


@pytest.fixture
def owners(keyservice: tuple[Served, Any]) -> Owners:
    return Owners(keyservice[0].url)


def release(url: str, name: str, service: str = "app", attester: SimulatedAttester | None = None) -> SessionLease:
    with KeyServiceClient(url) as ks:
        return release_session(ks, attester or ATTESTERS.program, name, service)


def audit(where: Any) -> list[dict[str, Any]]:
    if isinstance(where, str):  # PostgreSQL
        import psycopg

        with psycopg.connect(where) as conn:
            return [json.loads(row[0]) for row in conn.execute("SELECT event FROM audit ORDER BY seq")]
    with sqlite3.connect(where / "keyservice.sqlite3") as db:
        return [json.loads(row[0]) for row in db.execute("SELECT event FROM audit ORDER BY seq")]


def test_release_delivers_generated_and_uploaded_secrets(keyservice: tuple[Served, Any], owners: Owners) -> None:
    url, _ = keyservice
    answer = owners.put(owners.document("acme/one"))
    assert answer["revision"] == 1 and answer["generated"] == ["token", "volume_key"]
    with pytest.raises(AccessDenied):  # the uploaded password has no value yet: nothing is released
        release(url.url, "acme/one")
    owners.clients[2].upload_session_secret("acme/one", "password", b"hunter2")
    lease = release(url.url, "acme/one")
    token = lease.env["TOKEN"]
    assert len(token) == 24 and token.isalnum()
    assert lease.files == {"/run/secrets/token": token.encode()}
    assert lease.argv == ["--password", "hunter2"]
    assert len(lease.volume_keys["data"]) == 32
    assert certificate_identity(_der(lease.tls.cert_pem)) == ("acme/one", "app")
    assert lease.tls.peers == frozenset({"db"})
    assert release(url.url, "acme/one").env["TOKEN"] == token  # generated once, kept
    shown = owners.clients[1].show_session("acme/one")
    assert shown.secrets_set == ["password", "token", "volume_key"] and shown.secrets_missing == []
    assert "hunter2" not in shown.model_dump_json() and token not in shown.model_dump_json()


def _der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_update_needs_k_of_n_of_current_signers_and_the_chain(owners: Owners) -> None:
    first = owners.put(owners.document("acme/two"))
    with pytest.raises(Conflict, match="1 valid signature"):
        owners.put(owners.document("acme/two", revision=2, predecessor=first["digest"]), signers=(0,))
    with pytest.raises(Conflict, match="does not follow"):
        owners.put(owners.document("acme/two", revision=2, predecessor="0" * 64))
    second = owners.put(owners.document("acme/two", revision=2, predecessor=first["digest"]), signers=(1, 2))
    assert second["revision"] == 2 and second["generated"] == []
    with pytest.raises(Conflict):  # the same revision again: the chain has moved on
        owners.put(owners.document("acme/two", revision=2, predecessor=first["digest"]))


def test_strangers_cannot_create_or_change_or_read_sessions(keyservice: tuple[Served, Any], owners: Owners) -> None:
    url, data = keyservice
    stranger = Owners(url.url, n=1)
    owners.put(owners.document("acme/three"))
    doc = owners.document("acme/three", revision=2, predecessor="0" * 64)
    with pytest.raises(AccessDenied):
        stranger.clients[0].put_session(doc, [])
    with pytest.raises(AccessDenied):
        stranger.clients[0].show_session("acme/three")
    with pytest.raises(AccessDenied):
        stranger.clients[0].upload_session_secret("acme/three", "password", b"x")
    reasons = [e["reason"] for e in audit(data) if e.get("session") == "acme/three" and e["decision"] == "deny"]
    assert reasons.count("caller is not a signer of the session") == 3


def test_generated_secrets_cannot_be_overwritten_by_upload(owners: Owners) -> None:
    owners.put(owners.document("acme/four"))
    with pytest.raises(ProtocolError, match="no uploaded secret"):
        owners.clients[0].upload_session_secret("acme/four", "token", b"chosen by the owner")


def test_disallowed_measurement_gets_nothing_and_the_reason_is_audited(
    keyservice: tuple[Served, Any], owners: Owners
) -> None:
    url, data = keyservice
    owners.put(owners.document("acme/five"))
    owners.clients[0].upload_session_secret("acme/five", "password", b"pw")
    with pytest.raises(AccessDenied):
        release(url.url, "acme/five", "app", ATTESTERS.other)
    with pytest.raises(AccessDenied):
        release(url.url, "acme/five", "nosuch")
    denials = [e for e in audit(data) if e.get("session") == "acme/five" and e["action"] == "session_release"]
    assert "does not allow runtime simulated:" + ATTESTERS.other.measurement in denials[0]["reason"]
    assert denials[1]["reason"] == "session has no service 'nosuch'"


def test_revocation_stops_release_and_volume_calls(keyservice: tuple[Served, Any], owners: Owners) -> None:
    url, _ = keyservice
    first = owners.put(owners.document("acme/six"))
    owners.clients[0].upload_session_secret("acme/six", "password", b"pw")
    lease = release(url.url, "acme/six")
    with KeyServiceClient(url.url) as ks:
        tracker = LeaseTracker(ks, lambda: lease)
        assert tracker.current(lease.volume_id("data")) is None
        revoked = owners.document("acme/six", revision=2, predecessor=first["digest"])
        revoked["services"]["app"]["measurements"] = {"simulated": [ATTESTERS.other.measurement]}
        owners.put(revoked)
        with pytest.raises(AccessDenied):  # the live lease is refused at once
            tracker.current(lease.volume_id("data"))
    with pytest.raises(AccessDenied):  # and a restarted program gets nothing
        release(url.url, "acme/six")


def test_volume_roots_in_the_keyservice_catch_a_rolled_back_volume(
    keyservice: tuple[Served, Any], owners: Owners, tmp_path: Path
) -> None:
    url, _ = keyservice
    owners.put(owners.document("acme/seven"))
    owners.clients[0].upload_session_secret("acme/seven", "password", b"pw")
    lease = release(url.url, "acme/seven")
    key, volume_id = lease.volume_keys["data"], lease.volume_id("data")
    with KeyServiceClient(url.url) as ks:
        tracker = LeaseTracker(ks, lambda: lease)
        volume = Volume.create(tmp_path / "vol", volume_id, key, tracker)
        volume.write("a.txt", b"first")
        snapshot = {p.name: p.read_bytes() for p in (tmp_path / "vol").iterdir()}
        volume.write("a.txt", b"second")
        assert tracker.current(volume_id) == (3, volume._tag)
        for name, data in snapshot.items():  # the host puts the whole older volume back
            (tmp_path / "vol" / name).write_bytes(data)
        with pytest.raises(VolumeRollbackError):
            Volume.open_existing(tmp_path / "vol", volume_id, key, tracker)
        with pytest.raises(Conflict):  # a stale writer cannot advance the root
            tracker.advance(volume_id, 3, "f" * 64, "e" * 64)
    assert owners.clients[0].show_session("acme/seven").volumes["data"]["version"] == 3


def test_volume_calls_need_the_lease_key(keyservice: tuple[Served, Any], owners: Owners) -> None:
    url, _ = keyservice
    owners.put(owners.document("acme/eight"))
    owners.clients[0].upload_session_secret("acme/eight", "password", b"pw")
    lease = release(url.url, "acme/eight")
    forged = ps.VolumeRootRequest(lease=lease.lease_id, volume="data", op="get", nonce="1" * 64, mac="2" * 64)
    with KeyServiceClient(url.url) as ks:
        with pytest.raises(AuthenticationError):
            ks.post("/v1/sessions/volume-root", forged)
        unknown = forged.model_copy(update={"lease": "3" * 64})
        with pytest.raises(AccessDenied):
            ks.post("/v1/sessions/volume-root", unknown)


def test_malformed_documents_are_refused_with_the_field(owners: Owners) -> None:
    doc = owners.document("acme/nine")
    doc["services"]["app"]["env"] = {"TOKEN": "${secret:missing}"}
    with pytest.raises(ProtocolError, match="missing"):
        owners.clients[0].put_session(doc, [])


def test_a_newer_revision_deleted_by_hand_is_refused(keyservice: tuple[Served, Any], owners: Owners) -> None:
    """Deleting the newest revision in the database would make the older one current: refused."""
    url, where = keyservice
    first = owners.put(owners.document("acme/ten"))
    owners.put(owners.document("acme/ten", revision=2, predecessor=first["digest"]))
    sql = "DELETE FROM sessions WHERE name = 'acme/ten' AND revision = 2"
    if isinstance(where, str):
        import psycopg

        with psycopg.connect(where, autocommit=True) as conn:
            conn.execute(sql)
    else:
        with sqlite3.connect(where / "keyservice.sqlite3") as db:
            db.execute(sql)
    with pytest.raises(StoreError, match="deleted"):
        owners.clients[0].show_session("acme/ten")
    with pytest.raises(AccessDenied):
        release(url.url, "acme/ten")
    assert "deleted" in [e for e in audit(where) if e.get("session") == "acme/ten"][-1]["reason"]
