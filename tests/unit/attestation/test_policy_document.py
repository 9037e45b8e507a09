"""Policy documents (YAML / JSON) → Policy, with the real vectors' claims."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sealedml.attestation.base import Claims, Evidence, TeeType
from sealedml.attestation.dcap import TdxDcapVerifier
from sealedml.attestation.policy_document import (
    describe_policy,
    load_policy,
    load_policy_document,
    parse_duration,
)
from sealedml.attestation.sev_snp import SevSnpVerifier
from sealedml.errors import ConfigurationError, PolicyError

from ._support import MRENCLAVE, MRSIGNER, MRTD, SGX_TIME, SNP_MEASUREMENT, SNP_TIME, TDX_TIME

SGX_POLICY = f"""
version: 1
tcb_statuses: [UpToDate, ConfigurationAndSWHardeningNeeded]
accepted_advisories: [INTEL-SA-00289, INTEL-SA-00615]
max_collateral_age: 30d
sgx:
  mrenclave: ["{MRENCLAVE}"]
  mrsigner: ["{MRSIGNER}"]
  isv_prod_id: [0]
  min_isv_svn: 0
  min_tcb_eval_data_number: 17
"""

TDX_POLICY = {
    "version": 1,
    "tdx": {
        "mrtd": [MRTD],
        "rtmr": {
            "rtmr0": [
                "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0"
            ],
            "3": ["00" * 48],
        },
        "mrseam": ["5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab58c7d5ecee41d7c436489d6c8e4f92f160b7cad34207b00c1"],
    },
}

SNP_POLICY = f"""
version: 1
sev-snp:
  measurement: ["{SNP_MEASUREMENT}"]
  host_data: ["{"00" * 32}"]
  vmpl: [0]
  signing_key: [vcek]
  min_tcb: {{bootloader: 2, tee: 0, snp: 5, microcode: 68}}
  min_guest_svn: 0
  allow_debug: true   # the public vector is a debug guest
"""


def test_sgx_document_accepts_the_vector(sgx_vector_claims: Claims) -> None:
    claims = sgx_vector_claims
    policy = load_policy(SGX_POLICY)
    policy.verify(claims, now=SGX_TIME)
    assert policy.tee_types == frozenset({TeeType.SGX})
    with pytest.raises(PolicyError, match="older than"):
        policy.verify(claims, now=datetime(2025, 7, 30, tzinfo=UTC))
    with pytest.raises(PolicyError, match="isv_svn 0 below minimum 1"):
        load_policy(SGX_POLICY.replace("min_isv_svn: 0", "min_isv_svn: 1")).verify(claims, now=SGX_TIME)
    with pytest.raises(PolicyError, match="signer"):
        load_policy(SGX_POLICY.replace(MRSIGNER, "00" * 32)).verify(claims, now=SGX_TIME)


def test_tdx_document_accepts_the_vector(vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    claims = TdxDcapVerifier(vectors / "tdx" / "collateral-v4.json").verify(Evidence(TeeType.TDX, quote), now=TDX_TIME)
    path = tmp_path / "tdx.json"
    path.write_text(json.dumps(TDX_POLICY))
    policy = load_policy(path)
    policy.verify(claims, now=TDX_TIME)
    assert load_policy(str(path)) == policy
    changed = json.loads(json.dumps(TDX_POLICY))
    changed["tdx"]["rtmr"]["rtmr0"] = ["11" * 48]
    with pytest.raises(PolicyError, match="rtmr0"):
        load_policy(json.dumps(changed)).verify(claims, now=TDX_TIME)


def test_snp_document_accepts_the_vector(vectors: Path) -> None:
    report = (vectors / "sev-snp" / "report-milan.bin").read_bytes()
    claims = SevSnpVerifier(vcek=vectors / "sev-snp" / "vcek-milan.der").verify(
        Evidence(TeeType.SEV_SNP, report), now=SNP_TIME
    )
    policy = load_policy(SNP_POLICY)
    policy.verify(claims)
    with pytest.raises(PolicyError, match="debug"):
        load_policy(SNP_POLICY.replace("allow_debug: true", "allow_debug: false")).verify(claims)
    with pytest.raises(PolicyError, match=r"reported_tcb\.snp 5 below minimum 6"):
        load_policy(SNP_POLICY.replace("snp: 5", "snp: 6")).verify(claims)


def test_documents_compose_by_intersection(sgx_vector_claims: Claims) -> None:
    claims = sgx_vector_claims
    owner = load_policy(SGX_POLICY)
    user = load_policy(SGX_POLICY.replace("[UpToDate, ConfigurationAndSWHardeningNeeded]", "[UpToDate]"))
    owner.verify(claims, now=SGX_TIME)
    with pytest.raises(PolicyError, match="TCB status"):
        owner.intersect(user).verify(claims, now=SGX_TIME)
    with pytest.raises(PolicyError, match="empty policy"):
        owner.intersect(load_policy(SNP_POLICY)).verify(claims, now=SGX_TIME)


def test_empty_document_denies() -> None:
    policy = load_policy("version: 1\n")
    assert describe_policy(policy)["denies_everything"] is True
    with pytest.raises(PolicyError, match="empty policy"):
        policy.verify(Claims(TeeType.SGX, MRENCLAVE, bytes(64), False))


def test_describe_policy_is_json() -> None:
    summary = describe_policy(load_policy(SGX_POLICY))
    json.dumps(summary)
    assert summary["max_collateral_age_seconds"] == 30 * 86400
    assert summary["tee_rules"]["sgx"]["signers"] == [MRSIGNER]


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("version: 2", PolicyError, "policy version: Input should be 1"),
        ("sgx: {}", PolicyError, "policy version: Field required"),
        ("version: 1\nsgx: {mrenclave: [abc]}", PolicyError, "sgx.mrenclave.0: expected 64 hex digits"),
        ("version: 1\nsgx: {mrenclave: []}", PolicyError, "sgx: list mrenclave, or name the enclave by signer"),
        ("version: 1\nsgx: {mrenclave: ['" + "a" * 64 + "'], foo: 1}", PolicyError, "sgx.foo: Extra"),
        ("version: 1\nsev_snp: {}", PolicyError, "sev_snp: Extra inputs"),
        ("version: 1\ntcb_statuses: [Revoked]", PolicyError, "Revoked can never be accepted"),
        ("version: 1\ntcb_statuses: [Fine]", PolicyError, "unknown TCB status"),
        ("version: 1\nmax_collateral_age: 0d", PolicyError, "duration must be positive"),
        ("version: 1\nmax_collateral_age: soon", PolicyError, "max_collateral_age"),
        ("version: 1\ntdx: {mrtd: ['" + "b" * 96 + "'], rtmr: {rtmr9: []}}", PolicyError, "unknown RTMR"),
        ("version: 1\nsev-snp: {measurement: ['" + "c" * 96 + "'], vmpl: [4]}", PolicyError, "vmpl.0"),
        ("version: 1\nsgx: {mrenclave: ['" + "a" * 64 + "'], min_isv_svn: '1'}", PolicyError, "min_isv_svn"),
        ("- 1\n- 2", PolicyError, "must be a mapping"),
        ("version: [1", ConfigurationError, "not valid YAML/JSON"),
        ('{"version": 1, "version": 1}', ConfigurationError, "duplicate key"),
        ("version: 1\nversion: 1", ConfigurationError, "duplicate key"),
        ("a: &x [1]\nb: *x", ConfigurationError, "aliases are not allowed"),
        ("version: 1\n" + "#" * 70000, ConfigurationError, "larger than"),
    ],
)
def test_malformed_documents_name_the_field(text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        load_policy(text)
    assert "\n" not in str(caught.value)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(ConfigurationError, match="cannot read policy file"):
        load_policy(str(tmp_path / "missing.yaml"))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigurationError, match="UTF-8"):
        load_policy(tmp_path / "bin.yaml")


def test_duration_parsing() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration(60) == timedelta(minutes=1)
    for bad in ("", "-1d", "1y", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_duration_rejects_values_that_would_overflow() -> None:
    for huge in ("999999999w", 86400000000000):
        with pytest.raises(ValueError, match="at most 3650d"):
            parse_duration(huge)
    with pytest.raises(PolicyError, match="max_collateral_age"):
        load_policy('{"version": 1, "max_collateral_age": 86400000000000}')


def test_document_model_is_frozen() -> None:
    document = load_policy_document(SGX_POLICY)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        document.version = 2  # type: ignore[misc]
    assert replace(load_policy(SGX_POLICY)) == load_policy(SGX_POLICY)
