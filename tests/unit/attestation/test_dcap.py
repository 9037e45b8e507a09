"""SGX and TDX DCAP verification against real quotes and collateral."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.collateral import LocalCollateral, collateral_window
from sealedml.attestation.dcap import (
    DcapVerifier,
    SgxDcapVerifier,
    TdxDcapVerifier,
    parse_quote_layout,
    quote_report_data,
)
from sealedml.attestation.registry import verifier_for
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

from ._support import MRENCLAVE, MRSIGNER, MRTD, SGX_TIME, TDX_OUTDATED_TIME, TDX_TIME


def _sgx(vectors: Path) -> tuple[bytes, Path]:
    return (vectors / "sgx-dcap" / "quote.bin").read_bytes(), vectors / "sgx-dcap" / "collateral.json"


def _tdx(vectors: Path) -> tuple[bytes, Path]:
    return (vectors / "tdx" / "quote-v4.bin").read_bytes(), vectors / "tdx" / "collateral-v4.json"


def test_sgx_vector_claims(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    claims = SgxDcapVerifier(collateral).verify(Evidence(TeeType.SGX, quote), now=SGX_TIME)
    assert claims.tee is TeeType.SGX
    assert claims.measurement == MRENCLAVE
    assert claims.signer == MRSIGNER
    assert claims.report_data.startswith(b"Hello, world!")
    assert len(claims.report_data) == 64
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.debug is False
    assert claims.details["isv_prod_id"] == 0
    assert claims.details["isv_svn"] == 0
    assert claims.details["attributes"] == "0500000000000000e700000000000000"
    assert claims.details["quote_version"] == 3
    assert claims.details["tcb_eval_data_number"] == 17
    assert claims.details["collateral_issued"] == "2025-06-19T10:56:11+00:00"
    assert claims.collateral_expires == datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)
    json.dumps(claims.to_json())  # claims are JSON-serializable


def test_tdx_vector_claims(vectors: Path) -> None:
    quote, collateral = _tdx(vectors)
    claims = TdxDcapVerifier(collateral).verify(Evidence(TeeType.TDX, quote), now=TDX_TIME)
    assert claims.tee is TeeType.TDX
    assert claims.measurement == MRTD
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.debug is False
    assert claims.signer is None
    assert claims.report_data == quote[568:632]
    details = claims.details
    assert details["td_attributes"] == "0000001000000000"
    assert details["mrseam"].startswith("5b38e33a6487958b")
    assert details["rtmr0"].startswith("44c0197b39157fdd")
    assert details["rtmr3"] == "00" * 48
    assert details["quote_version"] == 4
    assert claims.collateral_expires is not None
    assert claims.collateral_expires < datetime(2025, 7, 20, tzinfo=UTC)


def test_tdx_outdated_quote_has_no_matching_tcb_level(vectors: Path) -> None:
    quote = (vectors / "tdx" / "quote-outdated.bin").read_bytes()
    verifier = TdxDcapVerifier(vectors / "tdx" / "collateral-outdated.json")
    assert parse_quote_layout(quote).version == 5
    with pytest.raises(EvidenceError, match="No matching TCB level"):
        verifier.verify(Evidence(TeeType.TDX, quote), now=TDX_OUTDATED_TIME)


def test_quote_layouts(vectors: Path) -> None:
    sgx, _ = _sgx(vectors)
    tdx, _ = _tdx(vectors)
    outdated = (vectors / "tdx" / "quote-outdated.bin").read_bytes()
    assert parse_quote_layout(sgx).tee is TeeType.SGX
    assert parse_quote_layout(sgx).signed_len == 432
    assert parse_quote_layout(tdx).signed_len == 632
    layout = parse_quote_layout(outdated)
    assert (layout.tee, layout.body_kind, layout.body_offset) == (TeeType.TDX, "td15", 54)
    assert quote_report_data(sgx).startswith(b"Hello, world!")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q: q[:40], "truncated"),
        (lambda q: struct.pack("<H", 9) + q[2:], "unsupported quote version"),
        (lambda q: q[:2] + struct.pack("<H", 7) + q[4:], "attestation key type"),
        (lambda q: q[:432], "no signature section"),
        (lambda q: q + bytes(70 * 1024), "too large"),
    ],
)
def test_malformed_quotes_are_evidence_errors(vectors: Path, mutate: object, message: str) -> None:
    quote, collateral = _sgx(vectors)
    bad = mutate(quote)  # type: ignore[operator]
    with pytest.raises(EvidenceError, match=message):
        SgxDcapVerifier(collateral).verify(Evidence(TeeType.SGX, bad), now=SGX_TIME)


def test_sgx_quote_given_to_tdx_verifier_is_rejected(vectors: Path) -> None:
    quote, _ = _sgx(vectors)
    verifier = TdxDcapVerifier(vectors / "tdx" / "collateral-v4.json")
    with pytest.raises(EvidenceError, match="sgx quote, expected tdx"):
        verifier.verify(Evidence(TeeType.TDX, quote), now=TDX_TIME)


def test_tdx_quote_given_to_sgx_verifier_is_rejected(vectors: Path) -> None:
    quote, _ = _tdx(vectors)
    verifier = SgxDcapVerifier(vectors / "sgx-dcap" / "collateral.json")
    with pytest.raises(EvidenceError, match="tdx quote, expected sgx"):
        verifier.verify(Evidence(TeeType.SGX, quote), now=SGX_TIME)


def test_evidence_tee_must_match_verifier(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    with pytest.raises(EvidenceError, match="tdx evidence given to the sgx verifier"):
        SgxDcapVerifier(collateral).verify(Evidence(TeeType.TDX, quote), now=SGX_TIME)


def test_tdx_quote_with_sgx_collateral_is_rejected(vectors: Path) -> None:
    quote, _ = _tdx(vectors)
    verifier = TdxDcapVerifier(vectors / "sgx-dcap" / "collateral.json")
    with pytest.raises((EvidenceError, CollateralError)):
        verifier.verify(Evidence(TeeType.TDX, quote), now=TDX_TIME)


def test_collateral_not_yet_valid(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    with pytest.raises(CollateralError, match="not valid before"):
        SgxDcapVerifier(collateral).verify(Evidence(TeeType.SGX, quote), now=datetime(2025, 6, 1, tzinfo=UTC))


def test_collateral_expiry_boundary(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    window = collateral_window(collateral.read_text())
    verifier = SgxDcapVerifier(collateral)
    verifier.verify(Evidence(TeeType.SGX, quote), now=window.expires - timedelta(seconds=1))
    with pytest.raises(CollateralError, match="expired"):
        verifier.verify(Evidence(TeeType.SGX, quote), now=window.expires + timedelta(seconds=1))


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '{"tcb_info": 1}', json.dumps({"pck_crl": "zz"})],
)
def test_malformed_collateral_is_collateral_error(vectors: Path, text: str) -> None:
    quote, _ = _sgx(vectors)
    verifier = SgxDcapVerifier(LocalCollateral.from_text(text))
    with pytest.raises(CollateralError):
        verifier.verify(Evidence(TeeType.SGX, quote), now=SGX_TIME)


def test_tampered_tcb_info_is_collateral_error(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    doc = json.loads(collateral.read_text())
    doc["tcb_info"] = doc["tcb_info"].replace('"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18')
    with pytest.raises(CollateralError):
        SgxDcapVerifier(json.dumps(doc)).verify(Evidence(TeeType.SGX, quote), now=SGX_TIME)


def test_naive_now_is_utc(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    claims = SgxDcapVerifier(collateral).verify(Evidence(TeeType.SGX, quote), now=datetime(2025, 7, 1))
    assert claims.measurement == MRENCLAVE


def test_dcap_rejects_other_tees() -> None:
    with pytest.raises(ConfigurationError):
        DcapVerifier(TeeType.SEV_SNP, "{}")


def test_registry_builds_verifiers(vectors: Path) -> None:
    quote, collateral = _sgx(vectors)
    verifier = verifier_for("sgx", collateral=collateral)
    assert verifier.verify(Evidence(TeeType.SGX, quote), now=SGX_TIME).measurement == MRENCLAVE
    assert verifier_for(TeeType.TDX, collateral=collateral).tee is TeeType.TDX
    assert verifier_for("sev-snp").tee is TeeType.SEV_SNP
    with pytest.raises(ConfigurationError, match="exactly one"):
        verifier_for("sgx")
    with pytest.raises(ConfigurationError, match="unknown sgx verifier options"):
        verifier_for("sgx", collateral=collateral, vcek="x")
    with pytest.raises(ConfigurationError, match="unknown TEE type"):
        verifier_for("tpm")
    with pytest.raises(ConfigurationError, match="no verifier registered"):
        verifier_for("simulated")
