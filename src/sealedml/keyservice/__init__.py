"""The KeyService: attestation-gated key release and access control (runs in a TEE)."""

from __future__ import annotations

from sealedml.keyservice.server import build_keyservice
from sealedml.keyservice.service import KeyService
from sealedml.keyservice.store import KeyStore, SQLiteKeyStore

__all__ = ["KeyService", "KeyStore", "SQLiteKeyStore", "build_keyservice"]
