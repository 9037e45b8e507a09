"""Choosing the TEE a server runs in, and what it accepts from others.

``--tee simulated|gramine|tsm|auto`` on every server command: ``auto`` picks
Gramine or configfs-tsm when exactly that interface is present, and the
simulated TEE (with its warning) otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealedml.attestation.base import Attester, TeeType, Verifier
from sealedml.attestation.registry import attester_for, detect_attester, verifier_for
from sealedml.attestation.sealing import GramineSealer, Sealer, SimulatedSealer
from sealedml.attestation.simulated import SimulatedAttester, SimulatedPlatform, SimulatedVerifier
from sealedml.errors import ConfigurationError

__all__ = [
    "TEE_CHOICES",
    "VerifierOptions",
    "build_attester",
    "build_sealer",
    "build_verifiers",
    "ratls_identity",
    "resolve_tee",
]

if TYPE_CHECKING:
    from sealedml.attestation.ratls import RotatingRaTlsCertificate

log = logging.getLogger(__name__)

TEE_CHOICES = ("auto", "simulated", "gramine", "tsm")


def resolve_tee(tee: str, root: Path = Path("/")) -> str:
    """``auto`` → the interface this machine offers, or ``simulated``."""
    if tee not in TEE_CHOICES:
        raise ConfigurationError(f"unknown TEE {tee!r}; choose one of {', '.join(TEE_CHOICES)}")
    if tee != "auto":
        return tee
    found = detect_attester(root)
    if found is None:
        log.info("no TEE interface found (--tee auto): using the simulated TEE")  # its attester warns once
        return "simulated"
    return found


def build_attester(tee: str, *, role: str, root: Path = Path("/"), config: Mapping[str, Any] | None = None) -> Attester:
    """The attester of a server of ``role`` running in ``tee``.

    ``config`` is security-relevant configuration beyond the default (for a
    runtime: the KeyService it trusts). The simulated TEE hashes it into the
    measurement; a hardware TEE measures it only if it is part of the measured
    image (Gramine: a trusted file and fixed arguments in the manifest; a TDX or
    SEV-SNP VM: its measured boot), which deploy/ sets up.
    """
    kind = resolve_tee(tee, root)
    if kind == "simulated":
        return SimulatedAttester(role=role, config=config)
    return attester_for(kind, root)


def build_sealer(tee: str, attester: Attester, root: Path = Path("/")) -> Sealer:
    """The sealer for the KeyService master key.

    Raises:
        ConfigurationError: the TEE has no sealing primitive (configfs-tsm).
    """
    kind = resolve_tee(tee, root)
    if kind == "simulated":
        return SimulatedSealer(SimulatedPlatform.load(), attester.measurement)
    if kind == "gramine":
        return GramineSealer(attester.measurement, root)
    raise ConfigurationError(
        "a KeyService in a TDX/SEV-SNP VM needs an external sealing provider for its master key; "
        "this build supports --tee simulated or gramine for the KeyService"
    )


@dataclass(frozen=True)
class VerifierOptions:
    """Which runtime TEEs a KeyService (or client) accepts, and where collateral comes from.

    Attributes:
        accept: TEE types to verify; ``simulated`` uses this host's platform root.
        collateral: Intel collateral JSON file (offline) for SGX/TDX.
        pccs_url: a PCCS to fetch Intel collateral from (cached in ``cache_dir``).
        cache_dir: collateral / VCEK cache directory.
        vcek: an SEV-SNP VCEK certificate file.
    """

    accept: tuple[str, ...] = ("simulated",)
    collateral: Path | None = None
    pccs_url: str | None = None
    cache_dir: Path | None = None
    vcek: Path | None = None


def build_verifiers(options: VerifierOptions) -> dict[TeeType, Verifier]:
    """The verifiers for ``options.accept``.

    Raises:
        ConfigurationError: an unknown TEE type, or SGX/TDX without collateral.
    """
    verifiers: dict[TeeType, Verifier] = {}
    for name in options.accept:
        try:
            tee = TeeType(name)
        except ValueError as exc:
            raise ConfigurationError(f"unknown TEE type {name!r} in --accept") from exc
        if tee is TeeType.SIMULATED:
            verifiers[tee] = SimulatedVerifier([SimulatedPlatform.load().public_key])
        elif tee in (TeeType.SGX, TeeType.TDX):
            source = {"collateral": options.collateral} if options.collateral else {"pccs_url": options.pccs_url}
            if options.collateral is None and options.pccs_url is None:
                raise ConfigurationError(f"accepting {tee.value} needs --collateral FILE or --pccs-url URL")
            extra = {"cache_dir": options.cache_dir} if options.pccs_url and options.cache_dir else {}
            verifiers[tee] = verifier_for(tee, **source, **extra)
        else:
            snp: dict[str, object] = {}
            if options.vcek is not None:
                snp["vcek"] = options.vcek
            if options.cache_dir is not None:
                snp["vcek_cache_dir"] = options.cache_dir
            verifiers[tee] = verifier_for(tee, **snp)
    return verifiers


def ratls_identity(attester: Attester, tls: str) -> RotatingRaTlsCertificate | None:
    """A server's RA-TLS identity for ``--tls ra`` (None for ``--tls none``).

    One key for the server's lifetime, its certificate re-issued with fresh
    evidence every minute and valid for 4 minutes (``serve_app`` installs each
    new one), so clients connecting long after start still see fresh evidence.

    Args:
        attester: produces the evidence in each certificate.
        tls: ``none`` or ``ra``.

    Returns:
        The rotating certificate, or None for plain HTTP.

    Raises:
        ConfigurationError: ``tls`` is neither ``none`` nor ``ra``.
        AttestationError: the attester failed on the first certificate.
    """
    if tls == "none":
        return None
    if tls != "ra":
        raise ConfigurationError("--tls must be none or ra")
    from sealedml.attestation.ratls import RotatingRaTlsCertificate

    return RotatingRaTlsCertificate(attester)
