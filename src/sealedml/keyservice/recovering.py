"""A KeyService recovering its master key from holders' shares (``sealedml keyservice recover``).

It attests like a KeyService (the same ``/v1/attestation``, binding its own HPKE and signing keys,
so holders verify it with the usual trust flags), serves the sealed shares from the store, takes
holders' shares sealed to it, and stops once k of them rebuild a key that authenticates the
store's anchored audit head (``keyservice/recovery.py``). Routes:

=======  =========================  ==========================================
GET      /v1/health                 status, shares received, threshold
GET      /v1/attestation?nonce=HEX  as the KeyService's
GET      /v1/recovery/shares        the sealed shares (ciphertext for each holder)
POST     /v1/recovery/share         ``{holder, sealed, service_key}``
=======  =========================  ==========================================
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sealedml._internal.encoding import b64d, b64e, fields, loads_json
from sealedml._internal.http import guarded, json_response, read_body, read_model
from sealedml._internal.paths import write_private_file_once
from sealedml.attestation.base import Attester
from sealedml.attestation.sealing import Sealer
from sealedml.crypto import HpkeKem, HpkePrivateKey, SigningKey, hpke_open, verify_signature
from sealedml.errors import (
    AuthenticationError,
    ConfigurationError,
    Conflict,
    CryptoError,
    ProtocolError,
    SignatureError,
)
from sealedml.keyservice.app import attestation_endpoint
from sealedml.keyservice.recovery import META_KEY, SealedShares, ShareCollector, combine_shares, reshare_info
from sealedml.keyservice.service import MASTER_FILE, MasterKey, attestation_response
from sealedml.keyservice.store import KeyStore
from sealedml.protocol import keyservice as p

__all__ = ["RecoveringKeyService", "ShareMessage", "create_recovery_app", "share_post_message", "stop_soon"]

log = logging.getLogger(__name__)


class ShareMessage(BaseModel):
    """``POST /v1/recovery/share``: one holder's share, HPKE-sealed to the recovering instance and
    signed with the holder's identity key (:func:`share_post_message`), so nobody else can post a
    share in a holder's name and spoil a round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holder: str
    sealed: p.B64
    service_key: p.B64
    public_key: p.B64  # the holder's Ed25519 key: its hash is the holder's principal id
    signature: p.B64


def share_post_message(service_key: bytes, holder: str, sealed: bytes) -> bytes:
    """What a holder signs when it posts its share."""
    return fields(b"sealedml/v1/recovery-share-post", service_key, holder, sealed)


class RecoveringKeyService:
    """Collects shares until they rebuild the master key (see the module docstring).

    ``on_recovered`` runs once the key is sealed (the command stops its server with it).

    Raises:
        ConfigurationError: ``data_dir`` already has a master key, or the store holds no shares.
    """

    def __init__(
        self,
        data_dir: Path,
        store: KeyStore,
        attester: Attester,
        sealer: Sealer,
        *,
        on_recovered: Callable[[], None] = lambda: None,
    ) -> None:
        if (data_dir / MASTER_FILE).exists():
            raise ConfigurationError(f"{data_dir / MASTER_FILE} exists: nothing to recover")
        raw, service_id = store.meta(META_KEY), store.meta("service_id")
        if raw is None or service_id is None:
            raise ConfigurationError(
                "this store holds no recovery shares (start the KeyService with --recovery-holders)"
            )
        self.sealed = SealedShares.model_validate_json(raw)
        self.service_id = service_id
        self.data_dir, self.store, self.attester, self.sealer = data_dir, store, attester, sealer
        self._hpke = HpkePrivateKey(HpkeKem.MLKEM768_X25519)
        self._hpke_public = self._hpke.public_key.to_bytes()
        self._signer = SigningKey.generate()
        self._collector = ShareCollector(self.sealed)
        self.recovered = threading.Event()
        self._on_recovered = on_recovered

    def attestation(self, nonce: bytes) -> p.AttestationResponse:
        return attestation_response(
            self.attester,
            nonce,
            service_id=self.service_id,
            hpke_public=self._hpke_public,
            signing_public=self._signer.public_bytes,
            kem=self._hpke.kem,
            accepts=[],
            unsafe_allow_simulated=False,
        )

    def status(self) -> dict[str, Any]:
        return {
            "status": "recovering" if not self.recovered.is_set() else "recovered",
            "received": self._collector.received,
            "threshold": self.sealed.threshold,
            "service_id": self.service_id,
        }

    def receive(self, req: ShareMessage) -> dict[str, Any]:
        """Take one holder's share; with enough, rebuild, check and seal the master key.

        Raises:
            AuthenticationError: the post is not signed by the holder it names.
            Conflict: the holder attested an earlier incarnation (re-attest).
            ProtocolError: the share does not open, is not this service's, or the shares do not
                rebuild its master key (they are then all forgotten).
        """
        if req.service_key != b64e(self._hpke_public):
            raise Conflict("recovering KeyService key changed: re-attest and retry")
        try:
            public_key, sealed = b64d(req.public_key), b64d(req.sealed)
            if p.principal_id_for(public_key) != req.holder:
                raise SignatureError("key of another principal")
            verify_signature(public_key, b64d(req.signature), share_post_message(self._hpke_public, req.holder, sealed))
        except (SignatureError, ValueError):
            raise AuthenticationError(f"the share is not signed by holder {req.holder}") from None
        try:
            share = loads_json(hpke_open(self._hpke, sealed, reshare_info(self._hpke_public, req.holder)))
        except (ValueError, CryptoError):
            raise ProtocolError("the share does not open") from None
        if not isinstance(share, dict) or share.get("service_id") != self.service_id:
            raise ProtocolError("the share is for another service")
        ready = self._collector.add(req.holder, share)
        if ready is None:
            return {**self.status(), "recovered": False}
        master = MasterKey(combine_shares(ready))
        anchored = self.store.audit_anchor()
        if anchored is None or not master.audit_anchor().check(*anchored):
            self._collector.reset()
            raise ProtocolError(
                "the shares do not rebuild this service's master key (wrong or mixed shares): start over"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_file_once(
            self.data_dir / MASTER_FILE, self.sealer.seal(master.export_for_replica(), label="keyservice-master")
        )
        self.recovered.set()
        log.warning("master key recovered from %d share(s) and sealed to this instance", len(ready))
        self._on_recovered()
        return {**self.status(), "recovered": True}


def stop_soon() -> None:
    """Stop this process shortly (after the answer is sent): ``keyservice serve`` takes over the data directory."""
    threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGTERM)).start()


def create_recovery_app(service: RecoveringKeyService) -> Starlette:
    """The ASGI app of a recovering KeyService."""

    async def health(request: Request) -> Response:
        return json_response(service.status())

    async def shares(request: Request) -> Response:
        return json_response(service.sealed.model_dump())

    async def share(request: Request) -> Response:
        req = read_model(await read_body(request, 64 * 1024), ShareMessage)
        return json_response(await run_in_threadpool(service.receive, req))

    return Starlette(
        routes=[
            Route("/v1/health", guarded(health), methods=["GET"]),
            Route("/v1/attestation", guarded(attestation_endpoint(service.attestation)), methods=["GET"]),
            Route("/v1/recovery/shares", guarded(shares), methods=["GET"]),
            Route("/v1/recovery/share", guarded(share), methods=["POST"]),
        ]
    )
