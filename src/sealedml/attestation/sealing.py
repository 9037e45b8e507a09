"""Sealing: data only the same code on the same platform can read back.

The KeyService keeps its master key sealed this way, so a copy of its data
directory is useless to the operator and to any other build.

* simulated: a key derived from the simulated platform root and the measurement;
* Gramine (SGX): Gramine's MRENCLAVE-bound sealing key,
  ``/dev/attestation/keys/_sgx_mrenclave`` (SGX EGETKEY with KEYPOLICY=MRENCLAVE);
* configfs-tsm (TDX, SEV-SNP) has no sealing primitive: a KeyService in a
  confidential VM needs its master key from elsewhere (not in this build).
"""

from __future__ import annotations

import abc
from pathlib import Path

from sealedml._internal.encoding import fields
from sealedml.attestation.simulated import SimulatedPlatform
from sealedml.crypto import NONCE_SIZE, aead_decrypt, aead_encrypt, hkdf_sha256, random_bytes
from sealedml.errors import ConfigurationError, CryptoError, StoreError

__all__ = ["GramineSealer", "KeySealer", "Sealer", "SimulatedSealer"]

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


class KeySealer(Sealer):
    """AES-256-GCM under a 32-byte key the TEE derives for this measurement."""

    def __init__(self, key: bytes, measurement: str) -> None:
        self._key = key
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
            raise StoreError("cannot unseal: sealed by another build (measurement) or platform, or tampered") from exc


class SimulatedSealer(KeySealer):
    """Sealing with a key derived from the simulated platform root and the measurement."""

    def __init__(self, platform: SimulatedPlatform, measurement: str) -> None:
        super().__init__(platform.seal_key(measurement), measurement)


class GramineSealer(KeySealer):
    """Sealing with Gramine's MRENCLAVE sealing key.

    Args:
        measurement: this enclave's MRENCLAVE (bound into the AAD as well).
        root: filesystem root (``/`` inside the enclave; a temporary tree in tests).

    Raises:
        ConfigurationError: the sealing key file is missing (not running under Gramine).
    """

    def __init__(self, measurement: str, root: Path = Path("/")) -> None:
        path = Path(root) / "dev" / "attestation" / "keys" / "_sgx_mrenclave"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"Gramine sealing key {path} unavailable: {exc.strerror}") from exc
        if len(raw) < 16:
            raise ConfigurationError("Gramine sealing key too short")
        super().__init__(hkdf_sha256(raw, info=b"sealedml/v1/gramine-seal-key"), measurement)
