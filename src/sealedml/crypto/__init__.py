"""The only package that touches cryptographic primitives.

Safe recipes for the rest of SealedML, built on pyca/cryptography:

* :mod:`.aead` — AES-256-GCM with derived, never-fixed nonces.
* :mod:`.kdf` — HKDF-SHA256 with explicit labels.
* :mod:`.hpke` — RFC 9180 HPKE (X25519 or hybrid ML-KEM-768+X25519) for every
  secret sent to an attested party.
* :mod:`.signing` — Ed25519 identities.
"""

from __future__ import annotations

from sealedml.crypto.aead import KEY_SIZE, NONCE_SIZE, TAG_SIZE, aead_decrypt, aead_encrypt, derive_nonce
from sealedml.crypto.hpke import HpkeKem, HpkePrivateKey, HpkePublicKey, hpke_open, hpke_seal
from sealedml.crypto.kdf import hkdf_sha256
from sealedml.crypto.random import random_bytes
from sealedml.crypto.signing import SigningKey, verify_signature

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "HpkeKem",
    "HpkePrivateKey",
    "HpkePublicKey",
    "SigningKey",
    "aead_decrypt",
    "aead_encrypt",
    "derive_nonce",
    "hkdf_sha256",
    "hpke_open",
    "hpke_seal",
    "random_bytes",
    "verify_signature",
]
