"""The program's side of a session: release its bundle from the KeyService, and track volume roots.

The order is the model release's (``runtime/release.py``): the program attests the KeyService
first (its trust is part of the program's measured configuration), then asks for a challenge,
binds the challenge nonce and a fresh HPKE key into its own evidence, and accepts an answer
only if the attested KeyService signed it (:func:`~sealedml.protocol.sessions.session_answer_message`).
Nothing that merely *reaches* the program from the host is trusted.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from sealedml._internal.encoding import b64d, b64e
from sealedml.attestation.base import Attester
from sealedml.client.keyservice import KeyServiceClient
from sealedml.crypto import HpkeKem, HpkePrivateKey, random_bytes, verify_signature
from sealedml.errors import CryptoError, ProtocolError, SignatureError
from sealedml.protocol import keyservice as p
from sealedml.protocol import sessions as ps
from sealedml.shield.network import TlsIdentity

__all__ = ["LeaseTracker", "SessionLease", "release_session"]


@dataclass(frozen=True, repr=False)
class SessionLease:
    """What one service of a session received, valid until ``expires_at`` (unix seconds)."""

    session: str
    service: str
    revision: int
    digest: str
    argv: list[str]
    env: dict[str, str]
    files: dict[str, bytes]
    volume_keys: dict[str, bytes]
    tls: TlsIdentity
    lease_id: str
    lease_key: bytes
    expires_at: float

    def volume_id(self, volume: str) -> str:
        """The id a volume of this session is sealed under (bound into its keys)."""
        return f"{self.session}/{volume}"

    def __repr__(self) -> str:
        return (
            f"SessionLease({self.session!r}, {self.service!r}, revision={self.revision}, expires_at={self.expires_at})"
        )


def release_session(
    keyservice: KeyServiceClient,
    attester: Attester,
    session: str,
    service: str,
    *,
    kem: HpkeKem = HpkeKem.MLKEM768_X25519,
) -> SessionLease:
    """Attest to the KeyService and receive ``service``'s bundle of ``session``.

    Raises:
        AccessDenied: the KeyService refused (opaque; its audit log says why).
        AttestationError: the KeyService is not the one the program trusts.
        ServiceUnavailable: the KeyService cannot be reached.
        ProtocolError: the answer is not signed by the attested KeyService, or does not open.
    """
    attested = keyservice.attest()
    challenge = p.ChallengeResponse.model_validate(keyservice.post("/v1/release/challenge"))
    key = HpkePrivateKey(kem)
    runtime_key = key.public_key.to_bytes()
    asked_at = time.time()
    evidence = attester.attest(b64d(challenge.nonce), runtime_key)
    request = ps.SessionReleaseRequest(
        challenge_id=challenge.challenge_id,
        evidence=p.EvidenceMessage(tee=evidence.tee.value, data=b64e(evidence.data), aux=b64e(evidence.aux)),
        runtime_key=b64e(runtime_key),
        session=session,
        service=service,
    )
    answer = p.ReleaseResponse.model_validate(keyservice.post("/v1/sessions/release", request))
    try:
        sealed = b64d(answer.sealed)
        message = ps.session_answer_message(
            attested.service_id, challenge.challenge_id, runtime_key, sealed, answer.expires_at, answer.lease_ttl
        )
        verify_signature(attested.signing_key, b64d(answer.signature), message)
    except (SignatureError, ValueError) as exc:
        raise ProtocolError("session answer is not signed by the attested KeyService") from exc
    if not 1 <= answer.lease_ttl <= p.MAX_LEASE_TTL:
        raise ProtocolError("session answer has an unacceptable lease TTL")
    try:
        payload = json.loads(key.open(sealed, ps.session_release_info(challenge.challenge_id, runtime_key)))
        if payload["session"] != session or payload["service"] != service:
            raise ProtocolError("session answer is for another session or service")
        tls = payload["tls"]
        return SessionLease(
            session=session,
            service=service,
            revision=int(payload["revision"]),
            digest=str(payload["digest"]),
            argv=[str(a) for a in payload["argv"]],
            env={str(k): str(v) for k, v in payload["env"].items()},
            files={str(k): b64d(v) for k, v in payload["files"].items()},
            volume_keys={str(k): b64d(v) for k, v in payload["volume_keys"].items()},
            tls=TlsIdentity(
                session=session,
                service=service,
                ca_pem=str(tls["ca"]).encode(),
                cert_pem=str(tls["cert"]).encode(),
                key_pem=str(tls["key"]).encode(),
                peers=frozenset(str(x) for x in tls["peers"]),
            ),
            lease_id=str(payload["lease"]["id"]),
            lease_key=b64d(payload["lease"]["key"]),
            # Counted from when this program asked, not from the KeyService's clock.
            expires_at=min(float(payload["expires_at"]), asked_at + answer.lease_ttl),
        )
    except (CryptoError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError("session answer does not open") from exc


class LeaseTracker:
    """A :class:`~sealedml.shield.volume.RootTracker` in the KeyService, reached with the program's lease.

    Every call carries a fresh nonce and the lease key's MAC; the answer must carry the lease
    key's MAC over that nonce, so the host can neither forge an answer (an older root tag, to
    make a rolled-back volume pass) nor replay an old one.

    Args:
        keyservice: the attested KeyService's client.
        lease: the current lease (a callable: the launcher renews leases while the program runs).
    """

    def __init__(self, keyservice: KeyServiceClient, lease: Callable[[], SessionLease]) -> None:
        self._keyservice = keyservice
        self._lease = lease

    def _volume(self, lease: SessionLease, volume_id: str) -> str:
        prefix = f"{lease.session}/"
        if not volume_id.startswith(prefix):
            raise ProtocolError(f"volume {volume_id} is not a volume of session {lease.session}")
        return volume_id[len(prefix) :]

    def _call(
        self, op: str, volume_id: str, version: int = 0, root: str | None = None, previous: str | None = None
    ) -> tuple[int, str] | None:
        lease = self._lease()
        volume = self._volume(lease, volume_id)
        unsigned = ps.VolumeRootRequest(
            lease=lease.lease_id,
            volume=volume,
            op=op,  # type: ignore[arg-type]
            version=version,
            root=root,
            previous=previous,
            nonce=random_bytes(32).hex(),
            mac="0" * 64,
        )
        request = unsigned.model_copy(update={"mac": ps.volume_request_mac(lease.lease_key, unsigned)})
        answer = ps.VolumeRootResponse.model_validate(self._keyservice.post("/v1/sessions/volume-root", request))
        expected = ps.volume_response_mac(
            lease.lease_key, lease.lease_id, volume, request.nonce, answer.version, answer.root
        )
        if not hmac.compare_digest(expected, answer.mac):
            raise ProtocolError("volume root answer is not authenticated by the lease")
        if answer.version is None or answer.root is None:
            return None
        return answer.version, answer.root

    def current(self, volume_id: str) -> tuple[int, str] | None:
        return self._call("get", volume_id)

    def advance(self, volume_id: str, version: int, root_tag: str, previous: str | None) -> None:
        self._call("advance", volume_id, version, root_tag, previous)
