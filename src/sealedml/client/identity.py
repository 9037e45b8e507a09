"""Principal identities: an Ed25519 signing key plus a seed for per-model request keys.

The identity file is JSON, mode 0600::

    {"kind": "sealedml-identity", "version": 1, "ed25519": B64, "request_seed": B64}

A user's request key for a model is derived, not stored:
``HKDF(request_seed, info="sealedml/v1/user-request-key" ‖ model_id)``, so
``model enable`` is idempotent and the file never grows.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sealedml._internal.encoding import b64d, b64e, fields
from sealedml.crypto import HpkeKem, HpkePrivateKey, SigningKey, hkdf_sha256, random_bytes
from sealedml.errors import ConfigurationError, CryptoError
from sealedml.protocol.keyservice import principal_id_for

__all__ = ["Identity"]

_KIND = "sealedml-identity"


@dataclass(frozen=True, repr=False)
class Identity:
    """A principal's secret identity."""

    signing_key: SigningKey
    request_seed: bytes

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity."""
        return cls(SigningKey.generate(), random_bytes(32))

    @functools.cached_property
    def principal_id(self) -> str:
        """The id the KeyService knows this principal by (computed once: every request names it)."""
        return principal_id_for(self.signing_key.public_bytes)

    def recovery_key(self) -> HpkePrivateKey:
        """This identity's HPKE key for KeyService recovery shares (hybrid ML-KEM-768 + X25519, derived)."""
        seed = hkdf_sha256(self.request_seed, info=fields(b"sealedml/v1/recovery-key"), length=96)
        return HpkePrivateKey.from_seed(seed, HpkeKem.MLKEM768_X25519)

    def request_key(self, model_id: str) -> bytes:
        """This user's 32-byte request key for ``model_id``."""
        return hkdf_sha256(self.request_seed, info=fields(b"sealedml/v1/user-request-key", model_id))

    def save(self, path: Path) -> None:
        """Write the identity to ``path`` (mode 0600); refuses to overwrite.

        Raises:
            ConfigurationError: ``path`` exists.
        """
        doc = {
            "kind": _KIND,
            "version": 1,
            "principal_id": self.principal_id,
            "ed25519": b64e(self.signing_key.private_bytes()),
            "request_seed": b64e(self.request_seed),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigurationError(f"{path} exists; refusing to overwrite an identity") from exc
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read an identity file.

        Raises:
            ConfigurationError: missing, unreadable or malformed file (the message names the file only).
        """
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("kind") != _KIND or doc.get("version") != 1:
                raise ConfigurationError(f"{path} is not a SealedML identity file")
            return cls(SigningKey.from_bytes(b64d(doc["ed25519"])), _seed(b64d(doc["request_seed"])))
        except FileNotFoundError as exc:
            raise ConfigurationError(
                f"identity file {path} not found (create one with `sealedml identity new`)"
            ) from exc
        except ConfigurationError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CryptoError) as exc:
            raise ConfigurationError(f"{path} is not a valid SealedML identity file") from exc

    def __repr__(self) -> str:
        return f"Identity(principal_id={self.principal_id!r})"


def _seed(raw: bytes) -> bytes:
    if len(raw) != 32:
        raise ValueError("request seed must be 32 bytes")
    return raw
