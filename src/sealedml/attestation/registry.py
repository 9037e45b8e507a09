"""Pick a verifier for a TEE type, and detect which attester a machine offers.

``verifier_for(TeeType.SGX, collateral="collateral.json")`` builds a
configured :class:`~sealedml.attestation.base.Verifier`;
``detect_attester()`` looks at the filesystem for Gramine's
``/dev/attestation`` or Linux configfs-tsm.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealedml.attestation.base import Attester, TeeType, Verifier
from sealedml.errors import ConfigurationError

__all__ = ["attester_for", "detect_attester", "verifier_for"]

_DCAP_OPTIONS = frozenset({"collateral", "pccs_url", "cache_dir", "root_ca_der", "client"})
_SNP_OPTIONS = frozenset({"vcek", "vcek_cache_dir", "vcek_sources", "roots"})


def _dcap(tee: TeeType, options: dict[str, Any]) -> Verifier:
    from sealedml.attestation.dcap import DcapVerifier
    from sealedml.attestation.pccs import PccsCollateral

    unknown = set(options) - _DCAP_OPTIONS
    if unknown:
        raise ConfigurationError(f"unknown {tee.value} verifier options: {', '.join(sorted(unknown))}")
    collateral = options.get("collateral")
    pccs_url = options.get("pccs_url")
    if (collateral is None) == (pccs_url is None):
        raise ConfigurationError(f"{tee.value} verification needs exactly one of collateral or pccs_url")
    source: Any = collateral
    if pccs_url is not None:
        cache_dir = options.get("cache_dir")
        source = PccsCollateral(
            str(pccs_url),
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            client=options.get("client"),
        )
    return DcapVerifier(tee, source, root_ca_der=options.get("root_ca_der"))


def _sev_snp(options: dict[str, Any]) -> Verifier:
    from sealedml.attestation.sev_snp import SevSnpVerifier

    unknown = set(options) - _SNP_OPTIONS
    if unknown:
        raise ConfigurationError(f"unknown sev-snp verifier options: {', '.join(sorted(unknown))}")
    vcek = options.get("vcek")
    cache_dir = options.get("vcek_cache_dir")
    return SevSnpVerifier(
        options.get("vcek_sources"),
        vcek=Path(vcek) if isinstance(vcek, str) else vcek,
        vcek_cache_dir=Path(cache_dir) if cache_dir is not None else None,
        roots=options.get("roots"),
    )


_FACTORIES: dict[TeeType, Callable[[dict[str, Any]], Verifier]] = {
    TeeType.SGX: lambda options: _dcap(TeeType.SGX, options),
    TeeType.TDX: lambda options: _dcap(TeeType.TDX, options),
    TeeType.SEV_SNP: _sev_snp,
}


def verifier_for(tee: TeeType | str, **options: Any) -> Verifier:
    """Build the verifier for ``tee``.

    Args:
        tee: ``sgx``, ``tdx`` or ``sev-snp`` (a :class:`TeeType` or its value).
        **options: for SGX / TDX exactly one of ``collateral`` (path or JSON
            text or an ``IntelCollateralSource``) and ``pccs_url`` (with optional
            ``cache_dir`` and ``client``), plus optional ``root_ca_der``; for
            SEV-SNP optional ``vcek`` (path or bytes), ``vcek_cache_dir``,
            ``vcek_sources`` and ``roots``.

    Returns:
        The verifier.

    Raises:
        ConfigurationError: unknown TEE type, unknown or missing options.
    """
    try:
        kind = TeeType(tee)
    except ValueError as exc:
        raise ConfigurationError(f"unknown TEE type {tee!r}") from exc
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise ConfigurationError(f"no verifier registered for {kind.value}")
    return factory(dict(options))


def detect_attester(root: Path = Path("/")) -> str | None:
    """Which attestation interface this machine offers.

    Args:
        root: the filesystem root to look under.

    Returns:
        ``"gramine"`` if ``<root>/dev/attestation/quote`` exists, ``"tsm"`` if
        ``<root>/sys/kernel/config/tsm/report`` exists, otherwise ``None``.
    """
    root = Path(root)
    try:
        if (root / "dev" / "attestation" / "quote").exists():
            return "gramine"
        if (root / "sys" / "kernel" / "config" / "tsm" / "report").is_dir():
            return "tsm"
    except OSError:
        return None
    return None


def attester_for(kind: str, root: Path = Path("/")) -> Attester:
    """Build the attester named by :func:`detect_attester`.

    Args:
        kind: ``"gramine"`` or ``"tsm"``.
        root: the filesystem root.

    Returns:
        The attester.

    Raises:
        ConfigurationError: unknown kind.
        AttestationError: the interface does not work.
    """
    if kind == "gramine":
        from sealedml.attestation.gramine import GramineAttester

        return GramineAttester(root)
    if kind == "tsm":
        from sealedml.attestation.tsm import TsmAttester

        return TsmAttester(root)
    raise ConfigurationError(f"unknown attester {kind!r}; expected gramine or tsm")
