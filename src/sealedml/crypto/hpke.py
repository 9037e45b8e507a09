"""HPKE (RFC 9180) base mode from pyca/cryptography, for every secret sent to an attested party.

Suite: KEM X25519 (default) or the hybrid post-quantum ML-KEM-768+X25519,
KDF HKDF-SHA256, AEAD AES-256-GCM. The ``info`` string binds each ciphertext to
its purpose and context (for example the release challenge it answers), so a
ciphertext cannot be replayed into another protocol step.

Public keys travel as ``kem_id (2 bytes, big-endian) ‖ key bytes`` so the
receiver knows the suite; the key bytes are what attestation evidence binds.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.hpke import (
    AEAD,
    KDF,
    KEM,
    MLKEM768X25519PrivateKey,
    MLKEM768X25519PublicKey,
    Suite,
)

from sealedml.errors import CryptoError

__all__ = ["HpkeKem", "HpkePrivateKey", "HpkePublicKey", "hpke_open", "hpke_seal"]


class HpkeKem(enum.IntEnum):
    """KEM identifiers (RFC 9180 §7.1 and the X-Wing/ML-KEM hybrid draft)."""

    X25519 = 0x0020
    MLKEM768_X25519 = 0x647A


_SUITES = {
    HpkeKem.X25519: Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
    HpkeKem.MLKEM768_X25519: Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
}
_X25519_LEN = 32
_MLKEM768_PUB_LEN = 1184


class HpkePublicKey:
    """A recipient's HPKE public key."""

    __slots__ = ("_key", "_raw", "kem")

    def __init__(self, kem: HpkeKem, key: x25519.X25519PublicKey | MLKEM768X25519PublicKey, raw: bytes) -> None:
        self.kem = kem
        self._key = key
        self._raw = raw

    @classmethod
    def from_bytes(cls, data: bytes) -> HpkePublicKey:
        """Parse ``kem_id ‖ key bytes``.

        Raises:
            CryptoError: unknown KEM or malformed key.
        """
        if len(data) < 2:
            raise CryptoError("HPKE public key too short")
        try:
            kem = HpkeKem(int.from_bytes(data[:2], "big"))
        except ValueError as exc:
            raise CryptoError("unknown HPKE KEM") from exc
        body = data[2:]
        try:
            if kem is HpkeKem.X25519:
                if len(body) != _X25519_LEN:
                    raise CryptoError("X25519 public key must be 32 bytes")
                return cls(kem, x25519.X25519PublicKey.from_public_bytes(body), data)
            if len(body) != _MLKEM768_PUB_LEN + _X25519_LEN:
                raise CryptoError("ML-KEM-768+X25519 public key has the wrong length")
            key = MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(body[:_MLKEM768_PUB_LEN]),
                x25519.X25519PublicKey.from_public_bytes(body[_MLKEM768_PUB_LEN:]),
            )
            return cls(kem, key, data)
        except ValueError as exc:
            raise CryptoError("malformed HPKE public key") from exc

    def to_bytes(self) -> bytes:
        """``kem_id ‖ key bytes``."""
        return self._raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HpkePublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)


class HpkePrivateKey:
    """An HPKE private key (ephemeral in runtimes, per process in the KeyService)."""

    __slots__ = ("_key", "_public", "kem")

    def __init__(self, kem: HpkeKem = HpkeKem.X25519) -> None:
        self.kem = kem
        if kem is HpkeKem.X25519:
            xk = x25519.X25519PrivateKey.generate()
            self._key: x25519.X25519PrivateKey | MLKEM768X25519PrivateKey = xk
            raw = xk.public_key().public_bytes_raw()
            self._public = HpkePublicKey(kem, xk.public_key(), kem.to_bytes(2, "big") + raw)
        else:
            mk = mlkem.MLKEM768PrivateKey.generate()
            xk = x25519.X25519PrivateKey.generate()
            hybrid = MLKEM768X25519PrivateKey(mk, xk)
            self._key = hybrid
            raw = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
            self._public = HpkePublicKey(kem, hybrid.public_key(), kem.to_bytes(2, "big") + raw)

    @classmethod
    def from_seed(cls, seed: bytes, kem: HpkeKem = HpkeKem.MLKEM768_X25519) -> HpkePrivateKey:
        """The key pair derived from a 96-byte seed (64 for ML-KEM-768, 32 for X25519; X25519 alone: 32).

        For keys a person re-derives from an identity file (recovery keys), not for ephemeral ones.
        """
        self = cls.__new__(cls)
        self.kem = kem
        if kem is HpkeKem.X25519:
            xk = x25519.X25519PrivateKey.from_private_bytes(seed[-32:])
            self._key = xk
            self._public = HpkePublicKey(
                kem, xk.public_key(), kem.to_bytes(2, "big") + xk.public_key().public_bytes_raw()
            )
            return self
        if len(seed) != 96:
            raise CryptoError("a hybrid HPKE seed is 96 bytes")
        mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed[:64])
        xk = x25519.X25519PrivateKey.from_private_bytes(seed[64:])
        hybrid = MLKEM768X25519PrivateKey(mk, xk)
        self._key = hybrid
        raw = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
        self._public = HpkePublicKey(kem, hybrid.public_key(), kem.to_bytes(2, "big") + raw)
        return self

    @property
    def public_key(self) -> HpkePublicKey:
        return self._public

    def open(self, ciphertext: bytes, info: bytes) -> bytes:
        """Decrypt a ciphertext sealed to this key with the same ``info``.

        Raises:
            CryptoError: wrong key, wrong info, or tampered ciphertext.
        """
        return hpke_open(self, ciphertext, info)

    def __repr__(self) -> str:
        return f"HpkePrivateKey(kem={self.kem.name})"


def hpke_seal(recipient: HpkePublicKey, plaintext: bytes, info: bytes) -> bytes:
    """Seal ``plaintext`` to ``recipient`` (single-shot HPKE, base mode): ``enc ‖ ct``.

    Raises:
        CryptoError: the recipient key is unusable (for example a low-order X25519 point).
    """
    try:
        return _SUITES[recipient.kem].encrypt(plaintext, recipient._key, info=info)
    except ValueError as exc:
        raise CryptoError("cannot seal to this HPKE public key") from exc


def hpke_open(recipient: HpkePrivateKey, ciphertext: bytes, info: bytes) -> bytes:
    """Open a single-shot HPKE ciphertext.

    Raises:
        CryptoError: authentication failed or the ciphertext is malformed.
    """
    try:
        return _SUITES[recipient.kem].decrypt(ciphertext, recipient._key, info=info)
    except Exception as exc:  # InvalidTag, ValueError on short input: all mean "not for us"
        raise CryptoError("HPKE decryption failed") from exc
