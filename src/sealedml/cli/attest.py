"""``sealedml attest``: verify evidence and check policy documents offline.

::

    sealedml attest verify EVIDENCE --tee sgx|tdx|sev-snp
        [--collateral FILE | --pccs-url URL [--cache-dir DIR]]
        [--vcek FILE] [--cert-table FILE] [--amd-roots FILE ...]
        [--policy FILE] [--now ISO8601] [--json]
    sealedml attest policy check FILE [--json]

``verify`` exits 0 when the evidence is authentic and (with ``--policy``)
accepted, and 1 with the reason otherwise. Without ``--policy`` only
authenticity is checked, and the verdict says so.

For SEV-SNP, ``--vcek`` takes the VCEK or the VLEK that signed the report (the
report's SIGNING_KEY says which, and the certificate must chain through the
matching AMD ASK or ASVK). ``--amd-roots FILE`` (repeatable) pins a bundle of
ASK, ARK and optionally ASVK for the product named by the ARK
(``ARK-<product>``) and replaces all the shipped AMD roots for that run: for
test infrastructures, or to trust only a subset of products.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.policy_document import describe_policy, load_policy
from sealedml.attestation.registry import verifier_for
from sealedml.cli._common import add_json_flag, run_handler
from sealedml.errors import AttestationError, CollateralError, ConfigurationError, EvidenceError

__all__ = ["add_parser", "handle_policy_check", "handle_verify"]

_MAX_EVIDENCE = 1 << 20


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_EVIDENCE + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_EVIDENCE:
        raise ConfigurationError(f"{what} {path} is too large")
    return data


def _parse_now(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigurationError(f"--now is not an ISO 8601 time: {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _amd_roots(paths: list[str]) -> dict[str, bytes]:
    """Read ``--amd-roots`` bundles into ``{product: PEM}``, the product named by each ARK."""
    from sealedml.attestation.sev_snp_roots import roots_bundle_product

    roots: dict[str, bytes] = {}
    for path in paths:
        pem = _read(path, "AMD roots")
        try:
            product = roots_bundle_product(pem)
        except ConfigurationError as exc:
            raise ConfigurationError(f"--amd-roots {path}: {exc.message}") from exc
        if product in roots:
            raise ConfigurationError(f"--amd-roots gives {product} roots twice")
        roots[product] = pem
    return roots


def _verifier_options(args: argparse.Namespace, tee: TeeType) -> dict[str, Any]:
    if tee in (TeeType.SGX, TeeType.TDX):
        if args.vcek or args.cert_table or args.amd_roots:
            raise ConfigurationError("--vcek, --cert-table and --amd-roots apply to sev-snp only")
        if args.collateral and args.pccs_url:
            raise ConfigurationError("give --collateral or --pccs-url, not both")
        if args.collateral:
            return {"collateral": Path(args.collateral)}
        if args.pccs_url:
            options: dict[str, Any] = {"pccs_url": args.pccs_url}
            if args.cache_dir:
                options["cache_dir"] = Path(args.cache_dir)
            return options
        raise ConfigurationError(f"{tee.value} verification needs --collateral or --pccs-url")
    if args.collateral or args.pccs_url:
        raise ConfigurationError("--collateral and --pccs-url apply to sgx and tdx only")
    snp_options: dict[str, Any] = {}
    if args.vcek:
        snp_options["vcek"] = Path(args.vcek)
    if args.cache_dir:
        snp_options["vcek_cache_dir"] = Path(args.cache_dir)
    if args.amd_roots:
        snp_options["roots"] = _amd_roots(args.amd_roots)
    return snp_options


def handle_verify(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``attest verify``.

    Returns:
        ``{"verdict", "reason"?, "error"?, "tee", "claims"?, "_exit"?}``;
        ``_exit`` is 1 when the evidence is rejected.

    Raises:
        ConfigurationError: bad flags or unreadable files.
    """
    tee = TeeType(args.tee)
    evidence_bytes = _read(args.evidence, "evidence")
    aux = _read(args.cert_table, "certificate table") if args.cert_table else b""
    now = _parse_now(args.now)
    policy = load_policy(Path(args.policy)) if args.policy else None
    verifier = verifier_for(tee, **_verifier_options(args, tee))
    try:
        claims = verifier.verify(Evidence(tee, evidence_bytes, aux), now=now)
    except (EvidenceError, CollateralError) as exc:
        return {"verdict": "rejected", "reason": exc.message, "error": exc.code, "tee": tee.value, "_exit": 1}
    if policy is None:
        return {"verdict": "authentic (no policy checked)", "tee": tee.value, "claims": claims.to_json()}
    try:
        policy.verify(claims, now=now)
    except AttestationError as exc:  # PolicyError
        return {
            "verdict": "rejected",
            "reason": exc.message,
            "error": exc.code,
            "tee": tee.value,
            "claims": claims.to_json(),
            "_exit": 1,
        }
    return {"verdict": "accepted", "tee": tee.value, "claims": claims.to_json()}


def handle_policy_check(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``attest policy check``: validate a policy document and summarize it.

    Raises:
        ConfigurationError: unreadable or syntactically invalid file.
        PolicyError: the document does not match the schema.
    """
    policy = load_policy(Path(args.file))
    summary = describe_policy(policy)
    return {"valid": True, "file": args.file, **summary}


def add_parser(subparsers: Any) -> None:
    """Register ``attest verify`` and ``attest policy check`` on ``subparsers``.

    Each leaf parser sets ``func`` to its handler (taking the parsed arguments
    and returning a dict; key ``_exit`` is the exit code) and ``run`` to a
    callable that runs it through :func:`sealedml.cli._common.run_handler`.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    attest = subparsers.add_parser("attest", help="verify attestation evidence offline")
    commands = attest.add_subparsers(dest="attest_command", metavar="COMMAND", required=True)

    verify = commands.add_parser(
        "verify",
        help="verify SGX / TDX / SEV-SNP evidence",
        description="Verify evidence; exit 0 if accepted, 1 with the reason if rejected.",
    )
    verify.add_argument("evidence", metavar="EVIDENCE", help="quote or report file")
    verify.add_argument(
        "--tee",
        required=True,
        choices=[t.value for t in (TeeType.SGX, TeeType.TDX, TeeType.SEV_SNP)],
        help="the TEE that produced the evidence",
    )
    verify.add_argument("--collateral", metavar="FILE", help="DCAP collateral JSON (sgx, tdx)")
    verify.add_argument("--pccs-url", metavar="URL", help="fetch DCAP collateral from a PCCS")
    verify.add_argument("--cache-dir", metavar="DIR", help="collateral / VCEK cache directory")
    verify.add_argument(
        "--vcek",
        metavar="FILE",
        help="VCEK or VLEK certificate (sev-snp); it must be the kind of key the report's SIGNING_KEY names",
    )
    verify.add_argument("--cert-table", metavar="FILE", help="SNP certificate table, e.g. configfs-tsm auxblob")
    verify.add_argument(
        "--amd-roots",
        metavar="FILE",
        action="append",
        default=[],
        help=(
            "AMD roots to pin instead of the shipped ones (sev-snp; repeatable, one PEM bundle per product: "
            "ASK, ARK and optionally ASVK, the product taken from the ARK's name ARK-<product>). "
            "Replaces all shipped roots for this run: for test infrastructures, or to pin a subset of products"
        ),
    )
    verify.add_argument("--policy", metavar="FILE", help="policy document (YAML or JSON)")
    verify.add_argument("--now", metavar="ISO8601", help="verification time (default: now)")
    add_json_flag(verify)
    verify.set_defaults(func=handle_verify, run=lambda a: run_handler(handle_verify, a))

    policy = commands.add_parser("policy", help="policy documents")
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    check = policy_commands.add_parser("check", help="validate a policy document")
    check.add_argument("file", metavar="FILE")
    add_json_flag(check)
    check.set_defaults(func=handle_policy_check, run=lambda a: run_handler(handle_policy_check, a))
