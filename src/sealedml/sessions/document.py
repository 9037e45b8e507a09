"""Session documents: what an attested program receives, and who may change that.

A session (secureTF's CAS session, SCONE's session language, a MarbleRun manifest) names
*services* — programs identified by the runtimes that may run them — the *secrets* the
session holds, and how each secret reaches each service: in an environment variable, an
argument, or a file injected into memory. It is versioned: every revision names its
predecessor's digest, and an update must be signed by k of the n signers that the *current*
revision's access policy lists, so no single owner key, and no KeyService operator, can
rewrite it alone. ``docs/sessions.md`` has the format with examples.

Placeholders in ``argv``, ``env`` and ``files``: ``${secret:NAME}`` (an ``ascii`` secret as
text; ``binary`` ones must name an encoding) or ``${secret:NAME:hex}`` /
``${secret:NAME:base64}``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sealedml._internal.encoding import canonical_json, fields
from sealedml.attestation.policy_document import PolicyDocument
from sealedml.crypto import SigningKey, verify_signature
from sealedml.errors import CryptoError, PolicyError

__all__ = [
    "Bundle",
    "SessionDocument",
    "SessionError",
    "SessionSignature",
    "SessionUpdateError",
    "check_update",
    "load_session",
    "sign_session",
]

_NAME = r"[a-z0-9][a-z0-9_.-]{0,62}"
_PLACEHOLDER = re.compile(r"\$\{secret:([A-Za-z0-9_.-]+)(?::(hex|base64))?\}")
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SessionError(PolicyError):
    """A session document that is malformed, or a bundle that cannot be made from it."""

    code = "session"


class SessionUpdateError(SessionError):
    """A revision that does not follow the current one, or lacks the signatures its policy needs."""

    code = "session_update"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class SecretSpec(_Strict):
    """A secret of the session: generated inside the KeyService, or uploaded sealed by an owner."""

    kind: Literal["ascii", "binary"]
    size: int = Field(default=32, ge=1, le=4096)  # bytes (generated secrets)
    uploaded: bool = False  # True: an owner uploads the value (HPKE-sealed); else the KeyService makes it


class AccessPolicy(_Strict):
    """Who may change the session: ``threshold`` distinct signatures of the listed Ed25519 keys."""

    signers: list[Hex32] = Field(min_length=1)
    threshold: int = Field(ge=1)

    @model_validator(mode="after")
    def _reachable(self) -> AccessPolicy:
        if self.threshold > len(set(self.signers)):
            raise ValueError("threshold exceeds the number of distinct signers")
        return self


class ServiceSpec(_Strict):
    """One program of the session and what it receives."""

    measurements: dict[Literal["simulated", "sgx", "tdx", "sev-snp"], list[str]] = Field(default_factory=dict)
    policy: PolicyDocument | None = None  # an attestation policy document for real TEEs
    argv: list[str] = Field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")], str] = Field(default_factory=dict)
    files: dict[Annotated[str, Field(pattern=r"^/[A-Za-z0-9._/-]+$")], str] = Field(default_factory=dict)
    volumes: dict[Annotated[str, Field(pattern=rf"^{_NAME}$")], str] = Field(default_factory=dict)  # name → key secret
    peers: list[Annotated[str, Field(pattern=rf"^{_NAME}$")]] = Field(default_factory=list)  # services it may talk to

    @model_validator(mode="after")
    def _identified(self) -> ServiceSpec:
        if not self.measurements and self.policy is None:
            raise ValueError("a service needs measurements or an attestation policy: who may run it")
        return self


class SessionDocument(_Strict):
    """One revision of a session (see the module docstring)."""

    version: Literal[1]
    name: Annotated[str, Field(pattern=rf"^{_NAME}(/{_NAME})?$")]
    revision: int = Field(ge=1)
    predecessor: Hex32 | None = None
    access_policy: AccessPolicy
    secrets: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], SecretSpec] = Field(default_factory=dict)
    services: dict[Annotated[str, Field(pattern=rf"^{_NAME}$")], ServiceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> SessionDocument:
        if (self.revision == 1) != (self.predecessor is None):
            raise ValueError("revision 1 has no predecessor; every later revision names one")
        for service_name, service in self.services.items():
            texts = [*service.argv, *service.env.values(), *service.files.values()]
            for name, encoding in (m.groups() for text in texts for m in _PLACEHOLDER.finditer(text)):
                spec = self.secrets.get(name)
                if spec is None:
                    raise ValueError(f"service {service_name!r} uses secret {name!r}, which the session lacks")
                if spec.kind == "binary" and encoding is None:
                    raise ValueError(f"binary secret {name!r} needs :hex or :base64 in service {service_name!r}")
            for peer in service.peers:
                if peer not in self.services:
                    raise ValueError(f"service {service_name!r} names peer {peer!r}, which the session lacks")
            for volume, secret in service.volumes.items():
                if secret not in self.secrets or self.secrets[secret].kind != "binary":
                    raise ValueError(f"volume {volume!r} of {service_name!r} needs a binary secret as its key")
        return self

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", by_alias=True, exclude_none=True))

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: what signatures cover and successors name."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def bundle(self, service: str, values: dict[str, bytes]) -> Bundle:
        """What ``service`` receives, with every placeholder replaced by its secret.

        Raises:
            SessionError: no such service, or a secret without a value.
        """
        spec = self.services.get(service)
        if spec is None:
            raise SessionError(f"session {self.name} has no service {service!r}")

        def render(text: str) -> str:
            def one(match: re.Match[str]) -> str:
                name, encoding = match.group(1), match.group(2)
                if name not in values:
                    raise SessionError(f"secret {name!r} of session {self.name} has no value yet")
                value = values[name]
                if encoding == "hex":
                    return value.hex()
                if encoding == "base64":
                    return base64.b64encode(value).decode()
                return value.decode("ascii")

            return _PLACEHOLDER.sub(one, text)

        return Bundle(
            argv=[render(a) for a in spec.argv],
            env={k: render(v) for k, v in spec.env.items()},
            files={k: render(v).encode() for k, v in spec.files.items()},
            volume_keys={volume: values[secret] for volume, secret in spec.volumes.items() if secret in values},
        )


class Bundle(_Strict):
    """What one service receives: arguments, environment, files (in memory), volume keys."""

    argv: list[str]
    env: dict[str, str]
    files: dict[str, bytes]
    volume_keys: dict[str, bytes]


class SessionSignature(_Strict):
    """One signer's Ed25519 signature over a revision's digest."""

    signer: Hex32
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


def _signed_message(document: SessionDocument) -> bytes:
    return fields(b"sealedml/v1/session", document.name, document.revision, document.digest())


def sign_session(document: SessionDocument, key: SigningKey) -> SessionSignature:
    """``key``'s signature over ``document`` (name, revision and digest)."""
    return SessionSignature(signer=key.public_bytes.hex(), signature=key.sign(_signed_message(document)).hex())


def _count_valid(document: SessionDocument, signatures: list[SessionSignature], policy: AccessPolicy) -> int:
    message, valid = _signed_message(document), set()
    for signature in signatures:
        if signature.signer not in policy.signers or signature.signer in valid:
            continue  # a stranger's or a repeated signature counts for nothing
        try:
            verify_signature(bytes.fromhex(signature.signer), bytes.fromhex(signature.signature), message)
        except CryptoError:
            continue
        valid.add(signature.signer)
    return len(valid)


def check_update(current: SessionDocument | None, new: SessionDocument, signatures: list[SessionSignature]) -> None:
    """Refuse ``new`` unless it may replace ``current`` (None: ``new`` creates the session).

    A first revision must satisfy its own access policy; every later one names the current
    revision's digest, has the next revision number and the same name, and satisfies the
    *current* access policy — an update cannot lower the bar it is judged by.

    Raises:
        SessionUpdateError: naming what is wrong.
    """
    if current is None:
        if new.revision != 1:
            raise SessionUpdateError(f"session {new.name} does not exist; its first revision is 1")
        policy = new.access_policy
    else:
        if new.name != current.name:
            raise SessionUpdateError("an update keeps the session's name")
        if new.revision != current.revision + 1 or new.predecessor != current.digest():
            raise SessionUpdateError(
                f"revision {new.revision} does not follow revision {current.revision} (revision or predecessor digest)"
            )
        policy = current.access_policy
    count = _count_valid(new, signatures, policy)
    if count < policy.threshold:
        raise SessionUpdateError(f"{count} valid signature(s) of the session's signers; {policy.threshold} needed")


def load_session(source: str | bytes | Path) -> SessionDocument:
    """Read and validate a session document (YAML or JSON; a path or the text).

    Raises:
        SessionError: unreadable, not YAML/JSON, or not a valid session (the message names the field).
    """
    try:
        text = source.read_text() if isinstance(source, Path) else source
        data: Any = yaml.safe_load(text)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SessionError(f"unreadable session document ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise SessionError("a session document is a mapping with a version field")
    try:
        return SessionDocument.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise SessionError(f"session document: {where}: {first['msg']}") from None
