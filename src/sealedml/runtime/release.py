"""The runtime side of the release protocol: attest the KeyService, then challenge → evidence → sealed keys.

The KeyService's address comes from the untrusted platform, so the runtime
trusts nothing that only *reaches* it from there:

1. It attests the KeyService first (once, then on a key change): evidence bound
   to the runtime's own nonce and both KeyService keys, checked against the
   :class:`~sealedml.attestation.trust.KeyServiceTrust` that is part of the runtime's
   measured configuration. Over ``https`` every TLS handshake also verifies the
   KeyService's RA-TLS certificate.
2. Each release uses a fresh ephemeral HPKE key pair (hybrid ML-KEM-768 +
   X25519 by default); the runtime's evidence binds the KeyService's nonce and
   that key, so the released keys can only be opened by this attested instance.
3. The answer must carry the attested KeyService's signature over the
   challenge, that key and the sealed bytes: HPKE base mode does not
   authenticate the sender, and without the signature whoever stands between
   the runtime and the KeyService could answer with keys of its own choosing.
4. A lease lives at most ``lease_ttl`` seconds from when it was asked for, and
   never longer than :data:`~sealedml.protocol.keyservice.MAX_LEASE_TTL`.

Each answer carries the challenge for the next release, so in steady state a
release is one round trip (``POST /v1/release``); a fresh challenge is fetched
only when none is at hand (the first release, after a denial, after it expired).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any

from sealedml._internal.encoding import b64d, b64e
from sealedml._internal.http import raise_for_error
from sealedml._internal.httpclient import FastAsyncClient, HttpResponse, TransportError
from sealedml.attestation.base import Attester
from sealedml.attestation.trust import AttestedKeyService, KeyServiceTrust, default_trust, verify_attestation
from sealedml.crypto import HpkeKem, HpkePrivateKey, random_bytes, verify_signature
from sealedml.errors import (
    AccessDenied,
    AttestationError,
    CryptoError,
    ProtocolError,
    ServiceUnavailable,
    SignatureError,
)
from sealedml.protocol import keyservice as p

__all__ = ["Lease", "ReleaseClient", "model_key_id"]

_KEY_ID_LABEL = b"sealedml/v1/model-key-id"
#: A challenge received with an answer is used only up to this many seconds before it expires.
_CHALLENGE_MARGIN = 10.0
#: Challenges kept for later releases (one per release in flight is enough).
_KEPT_CHALLENGES = 16
_JSON = {"content-type": "application/json"}


def model_key_id(model_key: bytes) -> str:
    """A public, one-way name of a model key (for cache keys; reveals nothing of a 256-bit key)."""
    return hashlib.sha256(_KEY_ID_LABEL + model_key).hexdigest()[:32]


@dataclass(frozen=True, repr=False)
class Lease:
    """Keys of one (model, user) pair, valid until ``expires_at`` (unix seconds)."""

    model_id: str
    user_id: str
    model_version: int
    model_key: bytes
    request_key: bytes
    expires_at: float
    #: The KeyService's record that this version is partitioned (its manifest's digest), or None.
    partition_sha256: str | None = None

    @property
    def key_id(self) -> str:
        """:func:`model_key_id` of the model key: what a decrypted model is cached under, with id and version."""
        return model_key_id(self.model_key)

    def __repr__(self) -> str:
        return f"Lease({self.model_id!r}, {self.user_id!r}, v{self.model_version}, expires_at={self.expires_at})"


def _digest(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("malformed partition digest")
    return value


class ReleaseClient:
    """Asks an attested KeyService for keys on behalf of an attested runtime.

    Args:
        keyservice_url: where the KeyService is (told by the untrusted platform).
        attester: this runtime's attester.
        trust: which KeyService to accept (default: this build's simulated
            KeyService on this host); part of the runtime's measured configuration.
        kem: the KEM of the ephemeral key releases are sealed to.
        timeout: seconds per HTTP call.
    """

    def __init__(
        self,
        keyservice_url: str,
        attester: Attester,
        *,
        trust: KeyServiceTrust | None = None,
        kem: HpkeKem = HpkeKem.MLKEM768_X25519,
        timeout: float = 30.0,
    ) -> None:
        self._attester = attester
        self._trust = trust or default_trust()
        self._kem = kem
        verify: ssl.SSLContext | bool = True
        if keyservice_url.startswith("https://"):
            from sealedml.attestation.ratls import attested_client_context

            verify = attested_client_context(self._trust.verifiers, self._trust.policy)
        self._http = FastAsyncClient(keyservice_url, timeout=timeout, verify=verify)
        self._service: AttestedKeyService | None = None
        self._attesting: asyncio.Lock | None = None
        # Challenges received with earlier answers: (challenge, monotonic deadline).
        self._challenges: list[tuple[p.ChallengeResponse, float]] = []

    @property
    def keyservice(self) -> AttestedKeyService | None:
        """The KeyService this client attested last, if any."""
        return self._service

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        try:
            response = await self._http.request(method, path, **kwargs)
        except TransportError as exc:
            from sealedml.attestation.ratls import attestation_failure

            failure = attestation_failure(exc)
            if failure is not None:  # an unattested RA-TLS certificate: name the reason
                raise failure from exc
            raise ServiceUnavailable(f"KeyService unreachable: {type(exc).__name__}") from exc
        raise_for_error(response)
        return response

    async def attest(self, *, refresh: bool = False) -> AttestedKeyService:
        """The attested KeyService (verified once; again with ``refresh``).

        Concurrent callers share one attestation.

        Raises:
            AttestationError: the KeyService's evidence does not verify against the trust.
            ServiceUnavailable: the KeyService cannot be reached.
        """
        if self._attesting is None:
            self._attesting = asyncio.Lock()
        known = self._service
        async with self._attesting:
            if self._service is not None and (not refresh or self._service is not known):
                return self._service  # attested meanwhile by another caller
            nonce = random_bytes(32)
            response = await self._send("GET", "/v1/attestation", params={"nonce": nonce.hex()})
            try:
                doc = p.AttestationResponse.model_validate_json(response.content)
            except ValueError as exc:
                raise AttestationError("KeyService sent malformed attestation") from exc
            self._service = verify_attestation(doc, nonce, self._trust)
            return self._service

    async def prepare(self) -> float:
        """Attest the KeyService and hold a fresh challenge, so that the next release is one round trip.

        For an instance waiting for its first request (a warm-pool spare, a freshly
        started instance at ``/init``): both would otherwise be fetched while a user waits.

        Returns:
            Seconds until the challenge held is too old to use (then call again).

        Raises:
            AttestationError: the KeyService is not the one this runtime trusts.
            ServiceUnavailable: the KeyService cannot be reached.
        """
        await self.attest()
        now = time.monotonic()
        fresh = [deadline for _, deadline in self._challenges if deadline > now]
        if not fresh:
            challenge, _ = await self._challenge(fresh=True)
            self._keep(challenge)
            fresh = [self._challenges[-1][1]]
        return max(1.0, max(fresh) - time.monotonic())

    async def release(self, pairs: list[tuple[str, str]]) -> list[Lease]:
        """Obtain leases for ``pairs`` of (model id, user id) (see :meth:`release_timed`)."""
        leases, _ = await self.release_timed(pairs)
        return leases

    async def release_timed(self, pairs: list[tuple[str, str]]) -> tuple[list[Lease], dict[str, float]]:
        """Obtain leases for ``pairs``; also return seconds spent attesting and in the release round trips.

        Raises:
            AccessDenied: the KeyService refused (opaque by design).
            AttestationError: the KeyService is not the one this runtime trusts.
            ServiceUnavailable: the KeyService cannot be reached.
            ProtocolError: the answer is not signed by the attested KeyService, does
                not open, or does not match the request.
        """
        started, asked_at = time.perf_counter(), time.time()
        service = self._service or await self.attest()
        challenge, kept = await self._challenge()
        try:
            leases, attest_s = await self._release_once(service, challenge, pairs, asked_at)
        except AccessDenied:
            if not kept:
                raise
            # A challenge kept from an earlier answer may have died with a KeyService
            # restart: one more try with a fresh one tells that apart from a denial.
            challenge, _ = await self._challenge(fresh=True)
            leases, attest_s = await self._release_once(service, challenge, pairs, asked_at)
        return leases, {"attest": attest_s, "release": time.perf_counter() - started - attest_s}

    async def _release_once(
        self,
        service: AttestedKeyService,
        challenge: p.ChallengeResponse,
        pairs: list[tuple[str, str]],
        asked_at: float,
    ) -> tuple[list[Lease], float]:
        """One release with ``challenge``; return the leases and the seconds spent attesting."""
        nonce = b64d(challenge.nonce)
        key = HpkePrivateKey(self._kem)
        runtime_key = key.public_key.to_bytes()
        t0 = time.perf_counter()
        evidence = self._attester.attest(nonce, runtime_key)
        attest_s = time.perf_counter() - t0
        request = p.ReleaseRequest(
            challenge_id=challenge.challenge_id,
            evidence=p.EvidenceMessage(tee=evidence.tee.value, data=b64e(evidence.data), aux=b64e(evidence.aux)),
            runtime_key=b64e(runtime_key),
            pairs=[p.ReleasePair(model_id=m, user_id=u) for m, u in pairs],
        )
        body = request.model_dump_json().encode()
        answer = p.ReleaseResponse.model_validate_json(
            (await self._send("POST", "/v1/release", content=body, headers=_JSON)).content
        )
        if not self._signed_by(service, answer, challenge.challenge_id, runtime_key):
            # The KeyService may have restarted with new keys since it was attested:
            # attest it again, once; a forged answer fails against the fresh keys too.
            service = await self.attest(refresh=True)
            if not self._signed_by(service, answer, challenge.challenge_id, runtime_key):
                raise ProtocolError("release answer is not signed by the attested KeyService")
        if not 1 <= answer.lease_ttl <= p.MAX_LEASE_TTL:
            raise ProtocolError("release answer has an unacceptable lease TTL")
        leases = self._open(key, answer, challenge.challenge_id, runtime_key, asked_at + answer.lease_ttl)
        if {(x.model_id, x.user_id) for x in leases} != set(pairs) or len(leases) != len(set(pairs)):
            raise ProtocolError("release answer does not match the request")
        if answer.next_challenge is not None:  # only from an answer that verified
            self._keep(answer.next_challenge)
        return leases, attest_s

    async def _challenge(self, *, fresh: bool = False) -> tuple[p.ChallengeResponse, bool]:
        """A challenge kept from an earlier answer and still fresh, or a new one; and which it is."""
        now = time.monotonic()
        while self._challenges and not fresh:
            challenge, deadline = self._challenges.pop()
            if deadline > now:
                return challenge, True
        response = await self._send("POST", "/v1/release/challenge", content=b"{}", headers=_JSON)
        return p.ChallengeResponse.model_validate_json(response.content), False

    def _keep(self, challenge: p.ChallengeResponse) -> None:
        # Used well before the KeyService forgets it; a few are kept for concurrent releases.
        deadline = time.monotonic() + max(0.0, challenge.expires_in - _CHALLENGE_MARGIN)
        self._challenges.append((challenge, deadline))
        del self._challenges[:-_KEPT_CHALLENGES]

    @staticmethod
    def _signed_by(
        service: AttestedKeyService, answer: p.ReleaseResponse, challenge_id: str, runtime_key: bytes
    ) -> bool:
        try:
            sealed = b64d(answer.sealed)
            message = p.release_answer_message(
                service.service_id, challenge_id, runtime_key, sealed, answer.expires_at, answer.lease_ttl
            )
            verify_signature(service.signing_key, b64d(answer.signature), message)
        except (SignatureError, ValueError):
            return False
        return True

    @staticmethod
    def _open(
        key: HpkePrivateKey, answer: p.ReleaseResponse, challenge_id: str, runtime_key: bytes, latest: float
    ) -> list[Lease]:
        try:
            payload = json.loads(key.open(b64d(answer.sealed), p.release_info(challenge_id, runtime_key)))
            # Counted from when this runtime asked, not from the KeyService's clock.
            expires_at = min(float(payload["expires_at"]), latest)
            return [
                Lease(
                    model_id=str(item["model_id"]),
                    user_id=str(item["user_id"]),
                    model_version=int(item["model_version"]),
                    model_key=b64d(item["model_key"]),
                    request_key=b64d(item["request_key"]),
                    expires_at=expires_at,
                    partition_sha256=_digest(item.get("partition_sha256")),
                )
                for item in payload["leases"]
            ]
        except (CryptoError, ValueError, KeyError, TypeError) as exc:
            raise ProtocolError("release answer does not open") from exc
