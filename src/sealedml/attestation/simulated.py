"""The simulated TEE: runs the full attestation code path on any machine.

**No hardware protection.** A per-host Ed25519 "platform root" key (in
``$SEALEDML_HOME/simulated-platform/``) plays the part of the CPU vendor's
attestation key: the attester signs claims with it, and verifiers on the same
host trust its public key. Anyone with access to that directory can forge
evidence. Everything that uses it logs a warning, and claims say
``tee: simulated`` so a policy for real TEEs never accepts them.

Sealing (``seal_key``) imitates SGX's MRENCLAVE-bound sealing key: a key derived
from the platform secret and the measurement, so data sealed by one build cannot
be unsealed by another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sealedml._internal.encoding import canonical_json, fields, loads_json
from sealedml._internal.paths import sealedml_home, write_private_file_once
from sealedml.attestation.base import Attester, Claims, Evidence, TeeType, Verifier
from sealedml.attestation.measurement import measurement_for
from sealedml.crypto import SigningKey, hkdf_sha256, verify_signature
from sealedml.errors import ConfigurationError, EvidenceError, SignatureError

__all__ = [
    "SIMULATED_WARNING",
    "SimulatedAttester",
    "SimulatedPlatform",
    "SimulatedVerifier",
]

log = logging.getLogger(__name__)

SIMULATED_WARNING = "SIMULATED TEE: no hardware protection; for development and tests only"
_EVIDENCE_LABEL = b"sealedml/v1/simulated-evidence"
_SEAL_LABEL = b"sealedml/v1/simulated-seal-key"
#: Simulated evidence is accepted for this long after it was issued.
MAX_EVIDENCE_AGE = 300


_warned: list[bool] = []


def _warn_once() -> None:
    """The simulated-TEE warning, once per process (every attester would otherwise repeat it)."""
    if not _warned:
        _warned.append(True)
        log.warning(SIMULATED_WARNING)


@dataclass(frozen=True)
class SimulatedPlatform:
    """The per-host simulated platform root."""

    directory: Path
    public_key: bytes
    _signing_key: SigningKey | None

    @classmethod
    def load(cls, home: Path | None = None, *, create: bool = True) -> SimulatedPlatform:
        """Load (or create, if ``create``) the platform root of this host.

        Raises:
            ConfigurationError: no platform root exists and ``create`` is false.
        """
        directory = (home or sealedml_home()) / "simulated-platform"
        key_path = directory / "root.key"
        if not key_path.exists():
            if not create:
                raise ConfigurationError(
                    f"no simulated platform root at {directory}; start a KeyService or worker first"
                )
            if write_private_file_once(key_path, SigningKey.generate().private_bytes()):
                log.info("created the simulated platform root %s", key_path)
        try:
            key = SigningKey.from_bytes(key_path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read simulated platform root {key_path}") from exc
        return cls(directory, key.public_bytes, key)

    def seal_key(self, measurement: str) -> bytes:
        """A 32-byte key bound to this platform and ``measurement`` (like an SGX sealing key)."""
        if self._signing_key is None:
            raise ConfigurationError("platform root private key not available")
        return hkdf_sha256(self._signing_key.private_bytes(), info=fields(_SEAL_LABEL, measurement))


class SimulatedAttester(Attester):
    """Signs claims with the host's simulated platform root."""

    tee = TeeType.SIMULATED

    def __init__(
        self,
        platform: SimulatedPlatform | None = None,
        *,
        role: str = "runtime",
        measurement: str | None = None,
        debug: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Create an attester for this process.

        Args:
            platform: the platform root (default: this host's).
            role: ``runtime`` or ``keyservice``; selects the measured configuration.
            measurement: override the computed measurement (tests only).
            debug: claim a debug TEE (tests of the debug policy only).
            config: security-relevant configuration measured beside ``{"tee": "simulated"}``
                (for a runtime: the KeyService it trusts).
        """
        self.platform = platform or SimulatedPlatform.load()
        self._measurement = measurement or measurement_for(role, {"tee": "simulated", **(config or {})})
        self._debug = debug
        _warn_once()

    @property
    def measurement(self) -> str:
        return self._measurement

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise EvidenceError("report data must be 64 bytes")
        if self.platform._signing_key is None:
            raise ConfigurationError("platform root private key not available")
        body = {
            "v": 1,
            "tee": TeeType.SIMULATED.value,
            "measurement": self._measurement,
            "debug": self._debug,
            "report_data": report_data.hex(),
            "issued_at": int(time.time()),
            "platform": self.platform.public_key.hex(),
        }
        raw = canonical_json(body)
        signature = self.platform._signing_key.sign(_EVIDENCE_LABEL + raw)
        doc = {"body": body, "signature": signature.hex()}
        return Evidence(TeeType.SIMULATED, canonical_json(doc))


class SimulatedVerifier(Verifier):
    """Verifies simulated evidence against trusted platform root public keys."""

    tee = TeeType.SIMULATED

    def __init__(self, trusted_roots: list[bytes] | None = None, *, max_age: int = MAX_EVIDENCE_AGE) -> None:
        """Args:
        trusted_roots: accepted platform root public keys (default: this host's).
        max_age: maximum evidence age in seconds.
        """
        if trusted_roots is None:
            trusted_roots = [SimulatedPlatform.load(create=False).public_key]
        self._roots = frozenset(trusted_roots)
        self._max_age = max_age

    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        if evidence.tee is not TeeType.SIMULATED:
            raise EvidenceError("not simulated evidence")
        try:
            doc = loads_json(evidence.data)
            body, signature = doc["body"], bytes.fromhex(doc["signature"])
            platform = bytes.fromhex(body["platform"])
            report_data = bytes.fromhex(body["report_data"])
            issued_at = int(body["issued_at"])
            measurement, debug = str(body["measurement"]), body["debug"]
            if body["v"] != 1 or body["tee"] != TeeType.SIMULATED.value or not isinstance(debug, bool):
                raise EvidenceError("unsupported simulated evidence")
        except EvidenceError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EvidenceError("malformed simulated evidence") from exc
        if platform not in self._roots:
            raise EvidenceError("evidence signed by an untrusted platform root")
        try:
            verify_signature(platform, signature, _EVIDENCE_LABEL + canonical_json(body))
        except SignatureError as exc:
            raise EvidenceError("simulated evidence signature does not verify") from exc
        current = (now or datetime.now(UTC)).timestamp()
        if not -60 <= current - issued_at <= self._max_age:
            raise EvidenceError("simulated evidence is stale")
        if len(report_data) != 64:
            raise EvidenceError("report data must be 64 bytes")
        return Claims(
            tee=TeeType.SIMULATED,
            measurement=measurement.lower(),
            report_data=report_data,
            debug=debug,
            details={"platform": platform.hex(), "issued_at": issued_at},
        )
