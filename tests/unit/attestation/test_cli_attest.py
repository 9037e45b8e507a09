"""``sealedml attest verify`` and ``sealedml attest policy check`` handlers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sealedml.attestation.sev_snp_collateral import build_snp_cert_table
from sealedml.attestation.sev_snp_report import parse_snp_report
from sealedml.cli._common import run_handler
from sealedml.cli.attest import add_parser
from sealedml.errors import ConfigurationError, PolicyError

from ._snp_chain import Chain, make_chain, make_vcek, make_vlek, milan_tcb, set_signing_key, sign_report
from ._support import MRENCLAVE, MRTD, SNP_MEASUREMENT


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sealedml")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _sgx_args(vectors: Path, *extra: str) -> list[str]:
    return [
        "attest",
        "verify",
        str(vectors / "sgx-dcap" / "quote.bin"),
        "--tee",
        "sgx",
        "--collateral",
        str(vectors / "sgx-dcap" / "collateral.json"),
        "--now",
        "2025-07-01T00:00:00Z",
        *extra,
    ]


def test_verify_without_policy_checks_authenticity_only(vectors: Path) -> None:
    args = _parse(_sgx_args(vectors))
    result = args.func(args)
    assert result["verdict"] == "authentic (no policy checked)"
    assert result["claims"]["measurement"] == MRENCLAVE
    assert "_exit" not in result


def test_verify_with_accepting_policy(vectors: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ntcb_statuses: [ConfigurationAndSWHardeningNeeded]\nsgx:\n  mrenclave: ['{MRENCLAVE}']\n"
    )
    args = _parse(_sgx_args(vectors, "--policy", str(policy)))
    assert args.func(args)["verdict"] == "accepted"


def test_verify_with_rejecting_policy_exits_1(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nsgx:\n  mrenclave: ['{MRENCLAVE}']\n")
    args = _parse(_sgx_args(vectors, "--policy", str(policy), "--json"))
    assert run_handler(args.func, args) == 1
    output = json.loads(capsys.readouterr().out)
    assert output["verdict"] == "rejected"
    assert output["reason"] == "TCB status ConfigurationAndSWHardeningNeeded not accepted"
    assert output["claims"]["measurement"] == MRENCLAVE


def test_verify_rejects_expired_collateral(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _sgx_args(vectors)
    argv[argv.index("--now") + 1] = "2026-01-01T00:00:00+00:00"
    args = _parse(argv)
    assert args.run(args) == 1
    out = capsys.readouterr().out
    assert "verdict: rejected" in out
    assert "collateral expired" in out


def test_verify_tdx_and_snp(vectors: Path) -> None:
    args = _parse(
        [
            "attest",
            "verify",
            str(vectors / "tdx" / "quote-v4.bin"),
            "--tee",
            "tdx",
            "--collateral",
            str(vectors / "tdx" / "collateral-v4.json"),
            "--now",
            "2025-07-01T00:00:00",
        ]
    )
    assert args.func(args)["claims"]["measurement"] == MRTD
    args = _parse(
        [
            "attest",
            "verify",
            str(vectors / "sev-snp" / "report-milan.bin"),
            "--tee",
            "sev-snp",
            "--vcek",
            str(vectors / "sev-snp" / "vcek-milan.der"),
            "--now",
            "2025-07-01T00:00:00Z",
        ]
    )
    result = args.func(args)
    assert result["claims"]["measurement"] == SNP_MEASUREMENT
    assert result["claims"]["debug"] is True


def test_verify_flag_errors(vectors: Path) -> None:
    args = _parse(_sgx_args(vectors, "--vcek", "x"))
    with pytest.raises(ConfigurationError, match="sev-snp only"):
        args.func(args)
    args = _parse(_sgx_args(vectors, "--amd-roots", "x"))
    with pytest.raises(ConfigurationError, match="sev-snp only"):
        args.func(args)
    argv = _sgx_args(vectors)
    argv[argv.index("--now") + 1] = "yesterday"
    args = _parse(argv)
    with pytest.raises(ConfigurationError, match="ISO 8601"):
        args.func(args)
    args = _parse(["attest", "verify", str(vectors / "sgx-dcap" / "quote.bin"), "--tee", "sgx"])
    with pytest.raises(ConfigurationError, match="needs --collateral or --pccs-url"):
        args.func(args)
    args = _parse(["attest", "verify", "/nonexistent", "--tee", "sgx", "--collateral", "x"])
    with pytest.raises(ConfigurationError, match="cannot read evidence"):
        args.func(args)


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(f"version: 1\nsgx:\n  mrenclave: ['{MRENCLAVE}']\n")
    args = _parse(["attest", "policy", "check", str(good), "--json"])
    assert args.run(args) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["valid"] is True
    assert output["tee_types"] == ["sgx"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsgx:\n  mrenclave: [nothex]\n")
    args = _parse(["attest", "policy", "check", str(bad), "--json"])
    with pytest.raises(PolicyError, match=r"sgx\.mrenclave\.0"):
        args.func(args)
    assert args.run(args) == 1
    output = json.loads(capsys.readouterr().out)
    assert output == {"error": "policy", "message": "policy sgx.mrenclave.0: expected 64 hex digits"}


# ---------------------------------------------------------------------------
# SEV-SNP VLEK (test chains pinned with --amd-roots)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def milan() -> Chain:
    return make_chain("Milan")


@pytest.fixture(scope="module")
def genoa() -> Chain:
    return make_chain("Genoa")


def _write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


def _vlek_case(vectors: Path, chain: Chain, tmp_path: Path) -> tuple[str, str, bytes]:
    """A VLEK-signed copy of the Milan vector: (report file, VLEK file, the VLEK's key as a signer)."""
    report = (vectors / "sev-snp" / "report-milan.bin").read_bytes()
    vlek, key = make_vlek(chain.asvk, chain.asvk_key, tcb=milan_tcb(parse_snp_report(report).reported_tcb))
    signed = sign_report(set_signing_key(report, 1), key)
    return _write(tmp_path, "report.bin", signed), _write(tmp_path, "vlek.der", vlek), signed


def _snp_verify(report: str, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    argv = ["attest", "verify", report, "--tee", "sev-snp", "--now", "2025-07-01T00:00:00Z", "--json", *extra]
    args = _parse(argv)
    code = run_handler(args.func, args)
    return code, json.loads(capsys.readouterr().out)


def test_cli_verifies_a_vlek_signed_report(
    vectors: Path, tmp_path: Path, milan: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    report, vlek, _ = _vlek_case(vectors, milan, tmp_path)
    roots = _write(tmp_path, "milan.pem", milan.roots_asvk_pem)
    code, output = _snp_verify(report, "--vcek", vlek, "--amd-roots", roots, capsys=capsys)
    assert code == 0, output
    assert output["verdict"] == "authentic (no policy checked)"
    claims = output["claims"]
    assert isinstance(claims, dict)
    assert claims["measurement"] == SNP_MEASUREMENT
    assert claims["details"]["signing_key"] == "vlek"
    assert claims["details"]["product"] == "Milan"


def test_cli_verifies_a_vlek_signed_report_from_the_cert_table(
    vectors: Path, tmp_path: Path, milan: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    report, vlek, _ = _vlek_case(vectors, milan, tmp_path)
    # Roots without the ASVK: the table's ASVK (in the ASK slot) is signed by the pinned ARK.
    roots = _write(tmp_path, "milan.pem", milan.roots_pem)
    table = _write(tmp_path, "aux.bin", build_snp_cert_table({"vlek": Path(vlek).read_bytes(), "ask": milan.asvk_der}))
    code, output = _snp_verify(report, "--cert-table", table, "--amd-roots", roots, capsys=capsys)
    assert code == 0, output
    assert output["claims"]["details"]["signing_key"] == "vlek"  # type: ignore[index]


def test_cli_vlek_under_another_products_chain_is_rejected(
    vectors: Path, tmp_path: Path, milan: Chain, genoa: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    report, vlek, _ = _vlek_case(vectors, milan, tmp_path)
    roots = _write(tmp_path, "genoa.pem", genoa.roots_asvk_pem)
    code, output = _snp_verify(report, "--vcek", vlek, "--amd-roots", roots, capsys=capsys)
    assert code == 1
    assert output["verdict"] == "rejected"
    assert "VLEK does not chain to a pinned AMD root" in str(output["reason"])
    # Nor under the shipped AMD roots: test roots are pinned only when asked for.
    code, output = _snp_verify(report, "--vcek", vlek, capsys=capsys)
    assert code == 1
    assert "VLEK does not chain to a pinned AMD root" in str(output["reason"])


def test_cli_vcek_offered_for_a_vlek_signed_report_is_rejected(
    vectors: Path, tmp_path: Path, milan: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = (vectors / "sev-snp" / "report-milan.bin").read_bytes()
    parsed = parse_snp_report(raw)
    vcek, key = make_vcek(milan.ask, milan.ask_key, tcb=milan_tcb(parsed.reported_tcb), hwid=parsed.chip_id)
    report = _write(tmp_path, "report.bin", sign_report(set_signing_key(raw, 1), key))
    roots = _write(tmp_path, "milan.pem", milan.roots_asvk_pem)
    code, output = _snp_verify(
        report, "--vcek", _write(tmp_path, "vcek.der", vcek), "--amd-roots", roots, capsys=capsys
    )
    assert code == 1
    assert "signed by a VLEK but the certificate is not a VLEK" in str(output["reason"])
    # AMD's real VCEK with the shipped roots, for the vector turned VLEK-signed.
    report = _write(tmp_path, "vector-as-vlek.bin", set_signing_key(raw, 1))
    code, output = _snp_verify(report, "--vcek", str(vectors / "sev-snp" / "vcek-milan.der"), capsys=capsys)
    assert code == 1
    assert "not a VLEK: it is a VCEK" in str(output["reason"])


def test_cli_vlek_offered_for_a_vcek_signed_report_is_rejected(
    vectors: Path, tmp_path: Path, milan: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    _, vlek, signed = _vlek_case(vectors, milan, tmp_path)
    report = _write(tmp_path, "as-vcek.bin", set_signing_key(signed, 0))
    roots = _write(tmp_path, "milan.pem", milan.roots_asvk_pem)
    code, output = _snp_verify(report, "--vcek", vlek, "--amd-roots", roots, capsys=capsys)
    assert code == 1
    assert "signed by a VCEK but the certificate is not a VCEK" in str(output["reason"])
    table = _write(tmp_path, "aux.bin", build_snp_cert_table({"vlek": Path(vlek).read_bytes()}))
    code, output = _snp_verify(report, "--cert-table", table, "--amd-roots", roots, capsys=capsys)
    assert code == 1
    assert "not a VCEK: it is a VLEK" in str(output["reason"])


def test_cli_altered_vlek_signed_report_is_rejected(
    vectors: Path, tmp_path: Path, milan: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    _, vlek, signed = _vlek_case(vectors, milan, tmp_path)
    altered = bytearray(signed)
    altered[0x50] ^= 1  # REPORT_DATA
    report = _write(tmp_path, "altered.bin", bytes(altered))
    roots = _write(tmp_path, "milan.pem", milan.roots_asvk_pem)
    code, output = _snp_verify(report, "--vcek", vlek, "--amd-roots", roots, capsys=capsys)
    assert code == 1
    assert output["reason"] == "SEV-SNP report signature invalid"


def test_cli_amd_roots_replace_the_shipped_roots(
    vectors: Path, tmp_path: Path, genoa: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    # With only Genoa test roots pinned, AMD's real Milan VCEK no longer verifies.
    args = [
        "--vcek",
        str(vectors / "sev-snp" / "vcek-milan.der"),
        "--amd-roots",
        _write(tmp_path, "genoa.pem", genoa.roots_asvk_pem),
    ]
    code, output = _snp_verify(str(vectors / "sev-snp" / "report-milan.bin"), *args, capsys=capsys)
    assert code == 1
    assert "does not chain to a pinned AMD root" in str(output["reason"])
    # The shipped AMD bundle given back explicitly works.
    args[-1] = str(vectors / "sev-snp" / "ask_ark_asvk_milan.pem")
    code, output = _snp_verify(str(vectors / "sev-snp" / "report-milan.bin"), *args, capsys=capsys)
    assert code == 0, output


def test_cli_amd_roots_flag_errors(vectors: Path, tmp_path: Path, milan: Chain) -> None:
    report = str(vectors / "sev-snp" / "report-milan.bin")
    base = ["attest", "verify", report, "--tee", "sev-snp", "--vcek", str(vectors / "sev-snp" / "vcek-milan.der")]
    roots = _write(tmp_path, "milan.pem", milan.roots_asvk_pem)
    args = _parse([*base, "--amd-roots", roots, "--amd-roots", roots])
    with pytest.raises(ConfigurationError, match="Milan roots twice"):
        args.func(args)
    no_ark = _write(
        tmp_path,
        "ask.pem",
        milan.roots_asvk_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n",
    )
    args = _parse([*base, "--amd-roots", no_ark])
    with pytest.raises(ConfigurationError, match="one ARK"):
        args.func(args)
    args = _parse([*base, "--amd-roots", str(tmp_path / "missing.pem")])
    with pytest.raises(ConfigurationError, match="cannot read AMD roots"):
        args.func(args)
    # A bundle whose ASVK is not signed by its ARK is refused before anything is verified.
    other = make_chain("Milan")
    bad = _write(tmp_path, "bad.pem", milan.roots_pem + other.asvk.public_bytes(serialization.Encoding.PEM))
    args = _parse([*base, "--amd-roots", bad])
    with pytest.raises(ConfigurationError, match="ASVK is not signed by the ARK"):
        args.func(args)
