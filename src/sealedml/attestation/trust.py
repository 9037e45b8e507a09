"""How a client — an owner, a user, or a runtime — decides to trust a KeyService.

The client fetches evidence bound to a fresh nonce and both of the
KeyService's keys (:func:`~sealedml.protocol.keyservice.service_key_binding`),
verifies it, and checks the measurement against the expected one. With the
simulated TEE the expected measurement defaults to *this build's* KeyService
measurement (the client runs the same code), and the platform root is this
host's; ``--keyservice-measurement`` pins another, ``--keyservice-policy`` a
KeyService in a real TEE.

For a runtime, what it trusts is part of what it is: the pin or the policy
enters the runtime's measured configuration (:meth:`KeyServiceTrust.measured_config`),
so an operator who starts a runtime trusting another KeyService starts a runtime
with another measurement, which owners have not allowed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealedml._internal.encoding import b64d
from sealedml.attestation.base import Evidence, TeeType, Verifier, check_binding
from sealedml.attestation.measurement import measurement_for
from sealedml.attestation.policy import Policy
from sealedml.attestation.simulated import SimulatedVerifier
from sealedml.crypto import HpkePublicKey
from sealedml.errors import AttestationError, Error
from sealedml.protocol import keyservice as p

__all__ = [
    "AttestedKeyService",
    "KeyServiceTrust",
    "default_trust",
    "measured_trust",
    "runtime_trust_config",
    "trust_from_options",
    "trust_option_flags",
    "verify_attestation",
]


@dataclass(frozen=True)
class KeyServiceTrust:
    """What a client accepts as a genuine KeyService.

    Attributes:
        policy: the policy the KeyService's claims must satisfy.
        verifiers: verifiers by the KeyService's TEE type.
        measured: what of this trust is security-relevant configuration of a
            runtime that holds it (the pinned measurement, or the policy file's digest).
    """

    policy: Policy
    verifiers: dict[TeeType, Verifier]
    measured: Mapping[str, str] = field(default_factory=dict)

    def verify(self, evidence: Evidence, nonce: bytes, bound_keys: bytes) -> None:
        """Verify evidence, its binding to ``nonce`` and ``bound_keys``, and the policy.

        Raises:
            AttestationError: the KeyService is not the one expected.
        """
        verifier = self.verifiers.get(evidence.tee)
        if verifier is None:
            raise AttestationError(f"no verifier for KeyService TEE {evidence.tee.value}")
        claims = verifier.verify(evidence)
        check_binding(claims, nonce, bound_keys)
        self.policy.verify(claims)

    def measured_config(self) -> dict[str, Any]:
        """The part of a runtime's measured configuration that says which KeyService it trusts.

        Empty for the default (this build's simulated KeyService), so a default
        runtime's measurement is ``sealedml measurement``'s.
        """
        return runtime_trust_config(self.measured)


def runtime_trust_config(measured: Mapping[str, str]) -> dict[str, Any]:
    """A runtime's measured-configuration entry for a trust whose :func:`measured_trust` is ``measured``."""
    return {"keyservice": dict(sorted(measured.items()))} if measured else {}


@dataclass(frozen=True)
class AttestedKeyService:
    """A KeyService whose evidence a client verified, with the keys the evidence binds.

    Attributes:
        service_id: the KeyService's id (signed calls and answers are bound to it).
        hpke_key: the key secrets are sealed to.
        signing_key: the Ed25519 public key release answers and audit heads are signed with.
        measurement: the KeyService's verified measurement.
        tee: its TEE type.
        accepts: the runtime TEE types it verifies.
        unsafe_allow_simulated: it accepts simulated evidence beside hardware TEEs.
    """

    service_id: str
    hpke_key: HpkePublicKey
    signing_key: bytes
    measurement: str
    tee: str
    accepts: tuple[str, ...] = ()
    unsafe_allow_simulated: bool = False

    @property
    def kem(self) -> str:
        """The KEM of :attr:`hpke_key` (``MLKEM768_X25519`` by default)."""
        return self.hpke_key.kem.name


def verify_attestation(doc: p.AttestationResponse, nonce: bytes, trust: KeyServiceTrust) -> AttestedKeyService:
    """Check a ``/v1/attestation`` answer to our ``nonce`` against ``trust``.

    Raises:
        AttestationError: malformed, not bound to the nonce and both keys, or not
            the KeyService ``trust`` expects.
    """
    try:
        service_key = b64d(doc.hpke_public_key)
        signing_key = b64d(doc.signing_public_key)
        evidence = Evidence(TeeType(doc.tee), b64d(doc.evidence), b64d(doc.aux))
        hpke_key = HpkePublicKey.from_bytes(service_key)
    except (ValueError, Error) as exc:
        raise AttestationError("KeyService sent malformed attestation") from exc
    if len(signing_key) != 32 or hpke_key.kem.name != doc.kem:
        raise AttestationError("KeyService sent malformed attestation")
    trust.verify(evidence, nonce, p.service_key_binding(service_key, signing_key))
    return AttestedKeyService(
        service_id=doc.service_id,
        hpke_key=hpke_key,
        signing_key=signing_key,
        measurement=doc.measurement,
        tee=doc.tee,
        accepts=tuple(doc.accepts),
        unsafe_allow_simulated=doc.unsafe_allow_simulated,
    )


def trust_option_flags(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The command-line flags that give a runtime instance the trust ``trust_from_options(**options)`` makes."""
    out: list[str] = []
    for name, flag in (
        ("measurement", "--keyservice-measurement"),
        ("policy_file", "--keyservice-policy"),
        ("collateral", "--collateral"),
        ("vcek", "--vcek"),
        ("pccs_url", "--pccs-url"),
    ):
        if options.get(name):
            out += [flag, str(options[name])]
    return tuple(out)


def trust_from_options(
    *,
    measurement: str | None = None,
    policy_file: Path | None = None,
    collateral: Path | None = None,
    pccs_url: str | None = None,
    vcek: Path | None = None,
) -> KeyServiceTrust:
    """Trust as the command line describes it.

    Without ``policy_file``: a simulated KeyService on this host (:func:`default_trust`).
    With it: a KeyService in a real TEE, verified against the policy document, with
    SGX/TDX collateral from ``collateral`` or ``pccs_url`` and an SEV-SNP VCEK from
    ``vcek`` (or the report's certificate table).

    Raises:
        ConfigurationError: malformed policy document or verifier options.
    """
    if policy_file is None:
        return default_trust(measurement)
    if measurement is not None:
        from sealedml.errors import ConfigurationError

        raise ConfigurationError("give --keyservice-measurement or --keyservice-policy, not both")
    from sealedml.attestation.policy_document import load_policy
    from sealedml.attestation.tee import VerifierOptions, build_verifiers

    policy = load_policy(policy_file)
    accept = ["sev-snp"]
    if collateral is not None or pccs_url is not None:
        accept += ["sgx", "tdx"]
    verifiers = build_verifiers(
        VerifierOptions(accept=tuple(accept), collateral=collateral, pccs_url=pccs_url, vcek=vcek)
    )
    return KeyServiceTrust(policy, verifiers, measured_trust(policy_file=policy_file))


def measured_trust(*, measurement: str | None = None, policy_file: Path | None = None) -> dict[str, str]:
    """What of a KeyService trust is measured with a runtime (see :attr:`KeyServiceTrust.measured`).

    Nothing for the default (this build's simulated KeyService); the pinned
    measurement; or the SHA-256 of the policy document's bytes.

    Raises:
        ConfigurationError: the policy file cannot be read.
    """
    if policy_file is not None:
        try:
            return {"policy_sha256": hashlib.sha256(policy_file.read_bytes()).hexdigest()}
        except OSError as exc:
            from sealedml.errors import ConfigurationError

            raise ConfigurationError(f"cannot read KeyService policy {policy_file}: {exc.strerror or exc}") from exc
    own = measurement_for("keyservice", {"tee": "simulated"})
    pinned = (measurement or own).strip().lower()
    return {} if pinned == own else {"measurement": pinned}


def default_trust(expected_measurement: str | None = None) -> KeyServiceTrust:
    """Trust for a simulated KeyService on this host (this build's measurement unless pinned).

    Raises:
        ConfigurationError: no simulated platform root on this host.
    """
    measured = measured_trust(measurement=expected_measurement)
    measurement = measured.get("measurement") or measurement_for("keyservice", {"tee": "simulated"})
    return KeyServiceTrust(Policy.for_measurements([measurement]), {TeeType.SIMULATED: SimulatedVerifier()}, measured)
