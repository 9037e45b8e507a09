"""How a client decides to trust a KeyService before sending it a secret.

The client fetches evidence bound to a fresh nonce and the KeyService's HPKE
key, verifies it, and checks the measurement against the expected one. With
the simulated TEE the expected measurement defaults to *this build's*
KeyService measurement (the client runs the same code), and the platform root
is this host's; ``--keyservice-measurement`` pins another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sealedml.attestation.base import Evidence, TeeType, Verifier, check_binding
from sealedml.attestation.measurement import measurement_for
from sealedml.attestation.policy import Policy
from sealedml.attestation.simulated import SimulatedVerifier
from sealedml.errors import AttestationError

__all__ = ["KeyServiceTrust", "default_trust", "trust_from_options"]


@dataclass(frozen=True)
class KeyServiceTrust:
    """What a client accepts as a genuine KeyService."""

    policy: Policy
    verifiers: dict[TeeType, Verifier]

    def verify(self, evidence: Evidence, nonce: bytes, service_key: bytes) -> None:
        """Verify evidence, its binding to ``nonce`` and ``service_key``, and the policy.

        Raises:
            AttestationError: the KeyService is not the one expected.
        """
        verifier = self.verifiers.get(evidence.tee)
        if verifier is None:
            raise AttestationError(f"no verifier for KeyService TEE {evidence.tee.value}")
        claims = verifier.verify(evidence)
        check_binding(claims, nonce, service_key)
        self.policy.verify(claims)


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
    from sealedml.attestation.policy_document import load_policy
    from sealedml.attestation.tee import VerifierOptions, build_verifiers

    policy = load_policy(policy_file)
    accept = ["sev-snp"]
    if collateral is not None or pccs_url is not None:
        accept += ["sgx", "tdx"]
    verifiers = build_verifiers(
        VerifierOptions(accept=tuple(accept), collateral=collateral, pccs_url=pccs_url, vcek=vcek)
    )
    return KeyServiceTrust(policy, verifiers)


def default_trust(expected_measurement: str | None = None) -> KeyServiceTrust:
    """Trust for a simulated KeyService on this host (this build's measurement unless pinned).

    Raises:
        ConfigurationError: no simulated platform root on this host.
    """
    measurement = expected_measurement or measurement_for("keyservice", {"tee": "simulated"})
    return KeyServiceTrust(Policy.for_measurements([measurement]), {TeeType.SIMULATED: SimulatedVerifier()})
