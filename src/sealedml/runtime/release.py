"""The runtime side of the release protocol: challenge → evidence → sealed keys.

Each release uses a fresh ephemeral HPKE key pair; the evidence binds the
KeyService's nonce and that key, so the released keys can only be opened by
this attested instance, for this request.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass

import httpx

from sealedml._internal.encoding import b64d, b64e
from sealedml._internal.httpclient import async_client
from sealedml.attestation.base import Attester
from sealedml.client.keyservice import raise_for_error
from sealedml.crypto import HpkePrivateKey
from sealedml.errors import CryptoError, ProtocolError, ServiceUnavailable
from sealedml.keyservice import protocol as p

__all__ = ["Lease", "ReleaseClient"]


@dataclass(frozen=True, repr=False)
class Lease:
    """Keys of one (model, user) pair, valid until ``expires_at`` (unix seconds)."""

    model_id: str
    user_id: str
    model_version: int
    model_key: bytes
    request_key: bytes
    expires_at: float

    def __repr__(self) -> str:
        return f"Lease({self.model_id!r}, {self.user_id!r}, v{self.model_version}, expires_at={self.expires_at})"


class ReleaseClient:
    """Asks the KeyService for keys on behalf of an attested runtime."""

    def __init__(self, keyservice_url: str, attester: Attester, *, timeout: float = 30.0) -> None:
        self._attester = attester
        # Over https (a KeyService with --tls ra) the channel is encrypted but not
        # attested here: what matters, the released keys, is HPKE-sealed to this
        # instance's attested key, so an impostor KeyService learns nothing.
        verify: ssl.SSLContext | bool = True
        if keyservice_url.startswith("https://"):
            from sealedml.attestation.ratls import client_ssl_context

            verify = client_ssl_context()
        self._http = async_client(keyservice_url.rstrip("/"), timeout=timeout, verify=verify)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: bytes) -> httpx.Response:
        try:
            response = await self._http.post(path, content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"KeyService unreachable: {type(exc).__name__}") from exc
        raise_for_error(response)
        return response

    async def release(self, pairs: list[tuple[str, str]]) -> list[Lease]:
        """Obtain leases for ``pairs`` of (model id, user id) (see :meth:`release_timed`)."""
        leases, _ = await self.release_timed(pairs)
        return leases

    async def release_timed(self, pairs: list[tuple[str, str]]) -> tuple[list[Lease], dict[str, float]]:
        """Obtain leases for ``pairs``; also return seconds spent attesting and in the release round trips.

        Raises:
            AccessDenied: the KeyService refused (opaque by design).
            ServiceUnavailable: the KeyService cannot be reached.
            ProtocolError: the answer does not open or parse.
        """
        started = time.perf_counter()
        challenge = p.ChallengeResponse.model_validate_json((await self._post("/v1/release/challenge", b"{}")).content)
        nonce = b64d(challenge.nonce)
        key = HpkePrivateKey()
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
        answer = p.ReleaseResponse.model_validate_json(
            (await self._post("/v1/release", request.model_dump_json().encode())).content
        )
        try:
            payload = json.loads(key.open(b64d(answer.sealed), p.release_info(challenge.challenge_id, runtime_key)))
            leases = [
                Lease(
                    model_id=str(item["model_id"]),
                    user_id=str(item["user_id"]),
                    model_version=int(item["model_version"]),
                    model_key=b64d(item["model_key"]),
                    request_key=b64d(item["request_key"]),
                    expires_at=float(payload["expires_at"]),
                )
                for item in payload["leases"]
            ]
        except (CryptoError, ValueError, KeyError, TypeError) as exc:
            raise ProtocolError("release answer does not open") from exc
        if {(x.model_id, x.user_id) for x in leases} != set(pairs):
            raise ProtocolError("release answer does not match the request")
        return leases, {"attest": attest_s, "release": time.perf_counter() - started - attest_s}
