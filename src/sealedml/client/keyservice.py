"""Client of the KeyService for owners and users."""

from __future__ import annotations

import re
import secrets
import ssl
import time
from typing import Any

import httpx
from pydantic import BaseModel

from sealedml._internal.encoding import b64d, b64e
from sealedml._internal.http import check_url, raise_for_error
from sealedml._internal.httpclient import sync_client
from sealedml.attestation.trust import AttestedKeyService, KeyServiceTrust, default_trust, verify_attestation
from sealedml.client.identity import Identity
from sealedml.crypto import hpke_seal, random_bytes, verify_signature
from sealedml.envelope.request import ID_PATTERN
from sealedml.errors import (
    AttestationError,
    ConfigurationError,
    Conflict,
    InputError,
    ProtocolError,
    ServiceUnavailable,
    SignatureError,
)
from sealedml.protocol import keyservice as p
from sealedml.protocol import sessions as ps

__all__ = ["AttestedKeyService", "KeyServiceClient", "describe_denial", "parse_runtime"]


def describe_denial(info: p.ModelInfoResponse | None) -> str:
    """What a user may be told of a denial: their own pair's category (``info``: their ``model info``,
    None when even that is denied)."""
    if info is None:
        return "denied (you are not granted this model, or it does not exist)"
    if info.access not in (None, "ok"):
        return f"denied ({info.access}): {info.access_hint}"
    return (
        "denied: your grant and consent are in order, so the runtime's attestation did not satisfy the policy "
        "(the model's owner can see the exact reason with `sealedml model audit`)"
    )


def parse_runtime(text: str, tee: str | None = None) -> p.RuntimeRef:
    """A runtime from ``[TEE:]HEX`` (``tee`` applies where the text names none).

    Raises:
        ConfigurationError: an unknown TEE type or a malformed measurement.
    """
    kind, sep, measurement = text.strip().rpartition(":")
    if not sep:
        kind, measurement = tee or "", text.strip()
    try:
        return p.RuntimeRef(tee=kind or None, measurement=measurement.lower())  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigurationError(
            f"runtime {text!r}: expected [simulated|sgx|tdx|sev-snp:]HEX (64 to 128 hex characters)"
        ) from exc


def _model_path(model_id: str, action: str) -> str:
    """``/v1/models/{model_id}/{action}``.

    Raises:
        InputError: a model id the KeyService would refuse (said here, before any request).
    """
    if not re.match(ID_PATTERN, model_id):
        raise InputError(
            f"model id {model_id[:40]!r} is not valid: 1–128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return f"/v1/models/{model_id}/{action}"


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
        self.url = check_url(url, "the KeyService URL (--keyservice)")
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
                # RA-TLS: every handshake verifies the evidence in the KeyService's
                # certificate before a byte is sent (certificates rotate).
                from sealedml.attestation.ratls import attested_client_context

                trust = self._trust or default_trust()
                verify = attested_client_context(trust.verifiers, trust.policy)
            self._client = sync_client(self.url, timeout=self._timeout, verify=verify)
        return self._client

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
            from sealedml.attestation.ratls import attestation_failure

            failure = attestation_failure(exc)
            if failure is not None:  # the RA-TLS certificate did not verify: say why
                raise failure from exc
            raise ServiceUnavailable(
                f"KeyService at {self.url} unreachable ({type(exc).__name__}): is it running, and is the URL right?"
            ) from exc
        raise_for_error(response, f"the KeyService at {self.url}")
        return response

    def get(self, path: str) -> dict[str, Any]:
        """An unsigned ``GET`` (public documents such as the sealed recovery shares)."""
        result: dict[str, Any] = self._request("GET", path).json()
        return result

    def post(self, path: str, body: BaseModel | None = None) -> dict[str, Any]:
        """An unsigned call (the release protocols authenticate by evidence or lease, not by principal)."""
        raw = body.model_dump_json().encode() if body is not None else b"{}"
        result: dict[str, Any] = self._request(
            "POST", path, content=raw, headers={"content-type": "application/json"}
        ).json()
        return result

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
        try:
            doc = p.AttestationResponse.model_validate(
                self._request("GET", "/v1/attestation", params={"nonce": nonce.hex()}).json()
            )
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise AttestationError("KeyService sent malformed attestation") from exc
        self._attested = verify_attestation(doc, nonce, trust)
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
    def upload_model_key(
        self,
        model_id: str,
        version: int,
        model_key: bytes,
        *,
        partition_sha256: str | None = None,
        signature: p.ModelSignature | None = None,
    ) -> None:
        """Send a model version's key, HPKE-sealed to the attested KeyService.

        ``partition_sha256``: the version is partitioned (that manifest's digest); users
        must then accept partitioned execution before its keys are released.
        ``signature``: the version's inputs and outputs, for ``model info``.
        """
        if self.identity is None:
            raise ConfigurationError("this call needs an identity")
        owner = self.identity.principal_id

        def build(service: AttestedKeyService) -> p.ModelKeyRequest:
            raw = service.hpke_key.to_bytes()
            sealed = hpke_seal(service.hpke_key, model_key, p.model_key_info(raw, model_id, version, owner))
            return p.ModelKeyRequest(
                model_version=version,
                sealed_key=b64e(sealed),
                service_key=b64e(raw),
                partition_sha256=partition_sha256,
                signature=signature,
            )

        self._with_service_key(build, _model_path(model_id, "keys"))

    def allow_runtime(self, model_id: str, measurement: str, *, tee: str | None = None, allow: bool = True) -> None:
        """Allow (or disallow) a runtime measurement of one TEE type for the owner's model.

        ``measurement`` is ``HEX`` or ``TEE:HEX``; without a TEE type (here or in
        ``tee``) the KeyService's only accepted type is meant, and a KeyService that
        accepts several refuses the call.
        """
        runtime = parse_runtime(measurement, tee)
        body = p.AllowRuntimeRequest(tee=runtime.tee, measurement=runtime.measurement, allow=allow)
        self._signed(_model_path(model_id, "runtimes"), body)

    def grant(self, model_id: str, user_id: str, *, grant: bool = True) -> None:
        """Grant (or revoke) a user."""
        self._signed(_model_path(model_id, "grants"), p.GrantRequest(user_id=user_id, grant=grant))

    # -------------------------------------------------------------- user
    def enable(
        self, model_id: str, measurements: list[str], *, tee: str | None = None, accept_partitioned: bool = False
    ) -> None:
        """Upload this user's request key for ``model_id`` and consent to runtimes.

        Args:
            model_id: the model.
            measurements: runtimes as ``HEX`` or ``TEE:HEX``.
            tee: the TEE type of entries that name none (default: the KeyService's
                only accepted type).
            accept_partitioned: also accept partitioned versions, whose middle layers
                run outside the TEE on representations of this user's inputs.
        """
        if self.identity is None:
            raise ConfigurationError("this call needs an identity")
        user = self.identity.principal_id
        request_key = self.identity.request_key(model_id)
        runtimes = [parse_runtime(m, tee) for m in measurements]

        def build(service: AttestedKeyService) -> p.ConsentRequest:
            raw = service.hpke_key.to_bytes()
            sealed = hpke_seal(service.hpke_key, request_key, p.consent_info(raw, model_id, user))
            return p.ConsentRequest(
                sealed_request_key=b64e(sealed),
                service_key=b64e(raw),
                runtimes=runtimes,
                accept_partitioned=accept_partitioned,
            )

        self._with_service_key(build, _model_path(model_id, "consent"))

    def model_info(self, model_id: str) -> p.ModelInfoResponse:
        """What this principal may know about a model."""
        return p.ModelInfoResponse.model_validate(self._signed(_model_path(model_id, "info"), None))

    def list_models(self) -> p.ModelListResponse:
        """The models this principal owns."""
        return p.ModelListResponse.model_validate(self._signed("/v1/models/list", None))

    def delete_model(self, model_id: str) -> None:
        """Delete this owner's model from the KeyService: keys, allowed runtimes, grants and consents."""
        self._signed(_model_path(model_id, "delete"), None)

    def model_audit(self, model_id: str, *, since: int = 0, limit: int = 100) -> p.ModelAuditResponse:
        """A page of the audit records about this owner's model (``next_since`` continues it)."""
        return p.ModelAuditResponse.model_validate(
            self._signed(_model_path(model_id, "audit"), p.ModelAuditRequest(since=since, limit=limit))
        )

    def audit_head(self, at: int | None = None) -> p.AuditHeadResponse:
        """The KeyService's audit-chain head (and the hash of record ``at``), its signature verified.

        Raises:
            AttestationError: the head is not signed by the attested KeyService.
        """
        answer = p.AuditHeadResponse.model_validate(self._signed("/v1/audit/head", p.AuditHeadRequest(at=at)))
        service = self.attest()
        message = p.audit_head_message(
            answer.service_id, answer.records, answer.head, answer.at, answer.at_hash, answer.issued_at
        )
        try:
            if answer.service_id != service.service_id or answer.at != at:
                raise SignatureError("audit head for another service or record")
            verify_signature(service.signing_key, b64d(answer.signature), message)
        except (SignatureError, ValueError) as exc:
            raise AttestationError("audit head is not signed by the attested KeyService") from exc
        return answer

    # -------------------------------------------------------------- sessions (signers)
    def put_session(self, document: dict[str, Any], signatures: list[dict[str, str]]) -> dict[str, Any]:
        """Store a session revision with its signers' signatures; the caller must be one of the signers.

        Returns ``{"session", "revision", "digest", "generated"}`` (the secrets the KeyService made).
        """
        return self._signed("/v1/sessions/put", ps.SessionPutRequest(document=document, signatures=signatures))

    def upload_session_secret(self, session: str, secret: str, value: bytes) -> None:
        """Set an ``uploaded`` secret of ``session``, HPKE-sealed to the attested KeyService."""
        if self.identity is None:
            raise ConfigurationError("this call needs an identity")
        principal = self.identity.principal_id

        def build(service: AttestedKeyService) -> ps.SessionSecretRequest:
            raw = service.hpke_key.to_bytes()
            sealed = hpke_seal(service.hpke_key, value, ps.session_secret_info(raw, session, secret, principal))
            return ps.SessionSecretRequest(session=session, secret=secret, sealed=b64e(sealed), service_key=b64e(raw))

        self._with_service_key(build, "/v1/sessions/secret")

    def show_session(self, session: str) -> ps.SessionShowResponse:
        """The latest revision of ``session`` as the KeyService holds it (signers only)."""
        return ps.SessionShowResponse.model_validate(
            self._signed("/v1/sessions/show", ps.SessionShowRequest(session=session))
        )
