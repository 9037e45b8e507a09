"""``sealedml attest verify`` and ``sealedml attest policy check`` handlers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sealedml.cli._common import run_handler
from sealedml.cli.attest import add_parser
from sealedml.errors import ConfigurationError, PolicyError

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
