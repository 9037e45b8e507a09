"""Client of the KeyService for owners and users."""

from __future__ import annotations

import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from sealedml._internal.encoding import b64d, b64e
from sealedml._internal.httpclient import sync_client
from sealedml.attestation.base import Evidence, TeeType
from sealedml.client.identity import Identity
from sealedml.client.trust import KeyServiceTrust, default_trust
from sealedml.crypto import HpkePublicKey, hpke_seal, random_bytes
from sealedml.errors import (
    AttestationError,
    ConfigurationError,
    Conflict,
    Error,
    ProtocolError,
    ServiceUnavailable,
    error_from_code,
)
from sealedml.keyservice import protocol as p

__all__ = ["AttestedKeyService", "KeyServiceClient", "raise_for_error"]


def raise_for_error(response: httpx.Response) -> None:
    """Turn an error response into the typed SealedML error it names."""
    if response.status_code < 400:
        return
    try:
        doc = response.json()
        code, message = str(doc["error"]), str(doc.get("message", ""))
    except (ValueError, KeyError, TypeError):
        code, message = "service", f"HTTP {response.status_code}"
    exc = error_from_code(code, message)
    if response.status_code == 429 and hasattr(exc, "retry_after"):
        try:
            exc.retry_after = float(response.headers.get("retry-after", "1"))
        except ValueError:
            exc.retry_after = 1.0
    raise exc


@dataclass(frozen=True)
class AttestedKeyService:
    """A KeyService whose evidence this client verified."""

    service_id: str
    hpke_key: HpkePublicKey
    measurement: str
    tee: str


class KeyServiceClient:
    """Talk to a KeyService as ``identity``.

    Args:
        url: the KeyService base URL.
        identity: the caller (needed for signed calls).
        trust: how to verify the KeyService (default: simulated TEE, this build).
        timeout: seconds per HTTP call.
    """

    def __init__(
        self,
        url: str,
        identity: Identity | None = None,
        *,
        trust: KeyServiceTrust | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        self._trust = trust
        self._timeout = timeout
        self._client: httpx.Client | None = None
        self._attested: AttestedKeyService | None = None

    @property
    def _http(self) -> httpx.Client:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.url.startswith("https://"):
                verify = self._attest_tls()
            self._client = sync_client(self.url, timeout=self._timeout, verify=verify)
        return self._client

    def _attest_tls(self) -> ssl.SSLContext:
        """RA-TLS: verify the evidence in the KeyService's certificate before sending anything; pin it."""
        from sealedml.attestation.ratls import (
            client_ssl_context,
            extract_evidence,
            fetch_peer_certificate,
            verify_ratls_certificate,
        )

        parsed = httpx.URL(self.url)
        trust = self._trust or default_trust()
        der = fetch_peer_certificate(parsed.host, parsed.port or 443, timeout=self._timeout)
        verifier = trust.verifiers.get(extract_evidence(der).tee)
        if verifier is None:
            raise AttestationError("no verifier for the TEE in the KeyService's RA-TLS certificate")
        verify_ratls_certificate(der, verifier, trust.policy)
        return client_ssl_context(der)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> KeyServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- transport
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"KeyService at {self.url} unreachable: {type(exc).__name__}") from exc
        raise_for_error(response)
        return response

    def _signed(self, path: str, body: BaseModel | None, *, identity: Identity | None = None) -> dict[str, Any]:
        who = identity or self.identity
        if who is None:
            raise ConfigurationError("this call needs an identity (--identity FILE)")
        raw = body.model_dump_json().encode() if body is not None else b""
        service_id = self.attest().service_id
        ts, nonce = int(time.time()), secrets.token_hex(16)
        signature = who.signing_key.sign(p.signed_call_message("POST", path, ts, nonce, raw, service_id))
        headers = {
            "content-type": "application/json",
            p.HDR_PRINCIPAL: who.principal_id,
            p.HDR_TIMESTAMP: str(ts),
            p.HDR_NONCE: nonce,
            p.HDR_SIGNATURE: b64e(signature),
        }
        result: dict[str, Any] = self._request("POST", path, content=raw, headers=headers).json()
        return result

    # -------------------------------------------------------------- attestation
    def attest(self, *, refresh: bool = False) -> AttestedKeyService:
        """Verify the KeyService's evidence (cached for this client).

        Raises:
            AttestationError: the evidence does not verify, is not bound to our
                nonce and the service key, or the measurement is not the expected one.
        """
        if self._attested is not None and not refresh:
            return self._attested
        trust = self._trust or default_trust()
        nonce = random_bytes(32)
        doc = p.AttestationResponse.model_validate(
            self._request("GET", "/v1/attestation", params={"nonce": nonce.hex()}).json()
        )
        try:
            service_key = b64d(doc.hpke_public_key)
            evidence = Evidence(TeeType(doc.tee), b64d(doc.evidence), b64d(doc.aux))
            hpke_key = HpkePublicKey.from_bytes(service_key)
        except (ValueError, Error) as exc:
            raise AttestationError("KeyService sent malformed attestation") from exc
        trust.verify(evidence, nonce, service_key)
        self._attested = AttestedKeyService(doc.service_id, hpke_key, doc.measurement, doc.tee)
        return self._attested

    def _with_service_key(self, build: Any, path: str) -> dict[str, Any]:
        """Seal a secret to the attested service key; re-attest once if the service restarted."""
        for attempt in range(2):
            service = self.attest(refresh=attempt > 0)
            try:
                return self._signed(path, build(service))
            except Conflict as exc:
                if "re-attest" not in exc.message or attempt:
                    raise
        raise ProtocolError("unreachable")  # pragma: no cover

    # -------------------------------------------------------------- principals
    def register(self) -> str:
        """Register this identity (idempotent); return the principal id."""
        if self.identity is None:
            raise ConfigurationError("register needs an identity")
        service = self.attest()
        public_key = self.identity.signing_key.public_bytes
        proof = self.identity.signing_key.sign(p.registration_message(service.service_id, public_key))
        body = p.RegisterRequest(public_key=b64e(public_key), proof=b64e(proof))
        return str(self._signed("/v1/principals", body)["principal_id"])

    # -------------------------------------------------------------- owner
    def upload_model_key(self, model_id: str, version: int, model_key: bytes) -> None:
        """Send a model version's key, HPKE-sealed to the attested KeyService."""
        if self.identity is None:
            raise ConfigurationError("this call needs an identity")
        owner = self.identity.principal_id

        def build(service: AttestedKeyService) -> p.ModelKeyRequest:
            raw = service.hpke_key.to_bytes()
            sealed = hpke_seal(service.hpke_key, model_key, p.model_key_info(raw, model_id, version, owner))
            return p.ModelKeyRequest(model_version=version, sealed_key=b64e(sealed), service_key=b64e(raw))

        self._with_service_key(build, f"/v1/models/{model_id}/keys")

    def allow_runtime(self, model_id: str, measurement: str, *, allow: bool = True) -> None:
        """Allow (or disallow) a runtime measurement for the owner's model."""
        self._signed(f"/v1/models/{model_id}/runtimes", p.AllowRuntimeRequest(measurement=measurement, allow=allow))

    def grant(self, model_id: str, user_id: str, *, grant: bool = True) -> None:
        """Grant (or revoke) a user."""
        self._signed(f"/v1/models/{model_id}/grants", p.GrantRequest(user_id=user_id, grant=grant))

    # -------------------------------------------------------------- user
    def enable(self, model_id: str, measurements: list[str]) -> None:
        """Upload this user's request key for ``model_id`` and consent to ``measurements``."""
        if self.identity is None:
            raise ConfigurationError("this call needs an identity")
        user = self.identity.principal_id
        request_key = self.identity.request_key(model_id)

        def build(service: AttestedKeyService) -> p.ConsentRequest:
            raw = service.hpke_key.to_bytes()
            sealed = hpke_seal(service.hpke_key, request_key, p.consent_info(raw, model_id, user))
            return p.ConsentRequest(sealed_request_key=b64e(sealed), service_key=b64e(raw), measurements=measurements)

        self._with_service_key(build, f"/v1/models/{model_id}/consent")

    def model_info(self, model_id: str) -> p.ModelInfoResponse:
        """What this principal may know about a model."""
        return p.ModelInfoResponse.model_validate(self._signed(f"/v1/models/{model_id}/info", None))
