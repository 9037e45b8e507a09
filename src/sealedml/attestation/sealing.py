"""Sealing: data only the same code on the same platform can read back.

The KeyService keeps its master key sealed this way, so a copy of its data
directory is useless to the operator and to any other build.
"""

from __future__ import annotations

import abc

from sealedml._internal.encoding import fields
from sealedml.attestation.simulated import SimulatedPlatform
from sealedml.crypto import NONCE_SIZE, aead_decrypt, aead_encrypt, random_bytes
from sealedml.errors import CryptoError, StoreError

__all__ = ["Sealer", "SimulatedSealer"]

_MAGIC = b"SMLSEAL1"


class Sealer(abc.ABC):
    """Seals data to the current TEE identity (measurement)."""

    @abc.abstractmethod
    def seal(self, plaintext: bytes, *, label: str) -> bytes:
        """Encrypt ``plaintext`` so only this measurement on this platform can open it."""

    @abc.abstractmethod
    def unseal(self, sealed: bytes, *, label: str) -> bytes:
        """Open data sealed by :meth:`seal`.

        Raises:
            StoreError: sealed by another measurement or platform, or tampered.
        """


class SimulatedSealer(Sealer):
    """Sealing with a key derived from the simulated platform root and the measurement."""

    def __init__(self, platform: SimulatedPlatform, measurement: str) -> None:
        self._key = platform.seal_key(measurement)
        self._measurement = measurement

    def seal(self, plaintext: bytes, *, label: str) -> bytes:
        nonce = random_bytes(NONCE_SIZE)
        aad = fields(b"sealedml/v1/sealed", label, self._measurement)
        return _MAGIC + nonce + aead_encrypt(self._key, nonce, plaintext, aad)

    def unseal(self, sealed: bytes, *, label: str) -> bytes:
        if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + NONCE_SIZE:
            raise StoreError("not a sealed blob")
        nonce = sealed[len(_MAGIC) : len(_MAGIC) + NONCE_SIZE]
        aad = fields(b"sealedml/v1/sealed", label, self._measurement)
        try:
            return aead_decrypt(self._key, nonce, sealed[len(_MAGIC) + NONCE_SIZE :], aad)
        except CryptoError as exc:
            raise StoreError(
                "cannot unseal: sealed by another build (measurement) or platform, or tampered"
            ) from exc
