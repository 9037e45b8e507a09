"""The SealedML error tree.

Every error the package raises on purpose derives from :class:`Error`, so a
caller can catch one type. Third-party exceptions (``cryptography``,
``onnxruntime``, ``httpx``, ``dcap_qvl``) are translated at the boundary where
they occur with ``raise X from exc``.

Messages never contain secrets: no key bytes, no request or response
plaintext. Callers outside a trust boundary get opaque errors
(:class:`AccessDenied` says only "denied"); the exact reason goes to the
KeyService audit log.

::

    Error
    ├── ConfigurationError        bad flags, files or settings
    ├── CryptoError               a primitive failed (bad key size, bad signature)
    │   └── SignatureError
    ├── EnvelopeError             request/response envelope malformed or unauthentic
    │   └── SealedModelError      sealed model container malformed or unauthentic
    ├── AttestationError
    │   ├── EvidenceError         evidence malformed, badly signed, or not bound
    │   ├── CollateralError       collateral missing, malformed or expired
    │   └── PolicyError           claims do not satisfy the policy
    ├── AuthenticationError       a signed call failed (signature, timestamp, replay)
    ├── AccessDenied              opaque refusal of a key release or operation
    ├── NotFound
    ├── Conflict
    ├── InputError                tensors do not fit the model
    ├── StoreError                key or model store failure
    ├── ProtocolError             a peer sent something that breaks the protocol
    └── ServiceError              a remote service failed
        ├── ServiceUnavailable
        └── Overloaded            queue full (HTTP 429); ``retry_after`` seconds
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AttestationError",
    "AuthenticationError",
    "CollateralError",
    "ConfigurationError",
    "Conflict",
    "CryptoError",
    "EnvelopeError",
    "Error",
    "EvidenceError",
    "InputError",
    "MaskError",
    "NotFound",
    "Overloaded",
    "PolicyError",
    "ProtocolError",
    "SealedModelError",
    "ServiceError",
    "ServiceUnavailable",
    "SignatureError",
    "StoreError",
    "VerificationError",
]


class Error(Exception):
    """Base class of every error SealedML raises on purpose.

    ``code`` is a short stable identifier used on the wire (``{"error": code}``)
    and by the CLI's ``--json`` output.
    """

    code = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ConfigurationError(Error):
    code = "configuration"


class CryptoError(Error):
    code = "crypto"


class SignatureError(CryptoError):
    code = "bad_signature"


class MaskError(CryptoError):
    """A sealed mask record of blinded offload is missing, altered, swapped or replayed."""

    code = "mask_integrity"


class EnvelopeError(Error):
    code = "bad_envelope"


class SealedModelError(EnvelopeError):
    code = "model_integrity"


class AttestationError(Error):
    code = "attestation"


class EvidenceError(AttestationError):
    code = "bad_evidence"


class CollateralError(AttestationError):
    code = "bad_collateral"


class PolicyError(AttestationError):
    code = "policy"


class AuthenticationError(Error):
    code = "unauthenticated"


class AccessDenied(Error):
    code = "denied"

    def __init__(self, message: str = "denied") -> None:
        super().__init__(message)


class NotFound(Error):
    code = "not_found"


class Conflict(Error):
    code = "conflict"


class InputError(Error):
    code = "bad_input"


class StoreError(Error):
    code = "store"


class ProtocolError(Error):
    code = "protocol"


class ServiceError(Error):
    code = "service"


class ServiceUnavailable(ServiceError):
    code = "unavailable"


class VerificationError(ServiceError):
    """An untrusted executor's answer failed verification (the request fails; the executor is replaced)."""

    code = "verification_failed"


class Overloaded(ServiceError):
    code = "overloaded"

    def __init__(self, message: str = "overloaded", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_BY_CODE: dict[str, type[Error]] = {}


def _collect(cls: type[Error]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(Error)


def error_from_code(code: str, message: str) -> Error:
    """Rebuild a typed error from its wire ``code`` (unknown codes → :class:`ServiceError`).

    Subclasses defined in other modules (SECO's link and engine errors, say) exist only once
    those modules are imported, so an unknown code triggers one more walk of the tree. An
    error whose constructor takes more than a message comes back as :class:`ServiceError`.
    """
    if code not in _BY_CODE:
        _collect(Error)
    cls = _BY_CODE.get(code, ServiceError)
    if cls is AccessDenied:
        return AccessDenied()
    try:
        return cls(message)
    except TypeError:
        return ServiceError(message)
