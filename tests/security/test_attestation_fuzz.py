"""Fuzzing the attestation parsers: only package errors may escape.

Each parser gets ≥ 2,000 Hypothesis examples, mutating the real vectors
(byte flips, truncation, splices, extensions) and generating random input.
Any mutant that *is* accepted must yield exactly the claims of the original —
so a mutation can only ever have touched unsigned bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealedml.attestation.base import Attester, Claims, Evidence, TeeType, Verifier
from sealedml.attestation.collateral import LocalCollateral
from sealedml.attestation.dcap import SgxDcapVerifier, TdxDcapVerifier
from sealedml.attestation.policy import Policy
from sealedml.attestation.policy_document import load_policy
from sealedml.attestation.ratls import extract_evidence, make_ratls_certificate, verify_ratls_certificate
from sealedml.attestation.ratls_evidence import decode_tagged_evidence
from sealedml.attestation.sev_snp import SevSnpVerifier
from sealedml.attestation.sev_snp_collateral import build_snp_cert_table, parse_snp_cert_table
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError, PolicyError

REPO_ROOT = Path(__file__).resolve().parents[2]
VECTORS = (REPO_ROOT / ".." / "shared" / "vectors" / "attestation").resolve()
if not VECTORS.is_dir():
    pytest.skip(f"attestation vectors not found at {VECTORS}", allow_module_level=True)

PACKAGE_ERRORS = (EvidenceError, CollateralError, PolicyError, ConfigurationError)
AT = datetime(2025, 7, 1, tzinfo=UTC)
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SGX_QUOTE = (VECTORS / "sgx-dcap" / "quote.bin").read_bytes()
TDX_QUOTE = (VECTORS / "tdx" / "quote-v4.bin").read_bytes()
SNP_REPORT = (VECTORS / "sev-snp" / "report-milan.bin").read_bytes()
SNP_VCEK = (VECTORS / "sev-snp" / "vcek-milan.der").read_bytes()

SGX = SgxDcapVerifier(VECTORS / "sgx-dcap" / "collateral.json")
TDX = TdxDcapVerifier(VECTORS / "tdx" / "collateral-v4.json")
SNP = SevSnpVerifier(vcek=SNP_VCEK)
SGX_CLAIMS = SGX.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=AT).to_json()
TDX_CLAIMS = TDX.verify(Evidence(TeeType.TDX, TDX_QUOTE), now=AT).to_json()
SNP_CLAIMS = SNP.verify(Evidence(TeeType.SEV_SNP, SNP_REPORT), now=AT).to_json()


@st.composite
def mutants(draw: st.DrawFn, base: bytes) -> bytes:
    """A mutated copy of ``base`` (or unrelated random bytes)."""
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "splice", "extend", "random"]))
    data = bytearray(base)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "splice":
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 64)))
        data[start:end] = draw(st.binary(max_size=64))
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        return draw(st.binary(max_size=1500))
    return bytes(data)


def _only_package_errors(call: Any) -> Any:
    try:
        return call()
    except PACKAGE_ERRORS as exc:
        return exc


# ---------------------------------------------------------------------------
# DCAP quotes
# ---------------------------------------------------------------------------


@FUZZ
@given(mutants(SGX_QUOTE))
def test_fuzz_sgx_quote_path(quote: bytes) -> None:
    result = _only_package_errors(lambda: SGX.verify(Evidence(TeeType.SGX, quote), now=AT))
    if isinstance(result, Claims):
        assert result.to_json() == SGX_CLAIMS


@FUZZ
@given(mutants(TDX_QUOTE))
def test_fuzz_tdx_quote_path(quote: bytes) -> None:
    result = _only_package_errors(lambda: TDX.verify(Evidence(TeeType.TDX, quote), now=AT))
    if isinstance(result, Claims):
        assert result.to_json() == TDX_CLAIMS


SGX_COLLATERAL = (VECTORS / "sgx-dcap" / "collateral.json").read_bytes()


@FUZZ
@given(mutants(SGX_COLLATERAL))
def test_fuzz_dcap_collateral(collateral: bytes) -> None:
    text = collateral.decode("latin-1")
    verifier = SgxDcapVerifier(LocalCollateral.from_text(text))
    result = _only_package_errors(lambda: verifier.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=AT))
    if isinstance(result, Claims):  # only unsigned parts (e.g. PEM line breaks) changed
        assert result.to_json() == SGX_CLAIMS


# ---------------------------------------------------------------------------
# SEV-SNP reports and certificate tables
# ---------------------------------------------------------------------------


@FUZZ
@given(mutants(SNP_REPORT))
def test_fuzz_snp_report_parser(report: bytes) -> None:
    result = _only_package_errors(lambda: SNP.verify(Evidence(TeeType.SEV_SNP, report), now=AT))
    if isinstance(result, Claims):
        assert result.to_json() == SNP_CLAIMS


CERT_TABLE = build_snp_cert_table({"vcek": SNP_VCEK})


@FUZZ
@given(mutants(CERT_TABLE))
def test_fuzz_snp_cert_table(table: bytes) -> None:
    _only_package_errors(lambda: parse_snp_cert_table(table))
    result = _only_package_errors(lambda: SevSnpVerifier().verify(Evidence(TeeType.SEV_SNP, SNP_REPORT, table), now=AT))
    if isinstance(result, Claims):
        assert result.to_json() == SNP_CLAIMS


# ---------------------------------------------------------------------------
# RA-TLS certificates and TCG DICE tagged evidence
# ---------------------------------------------------------------------------

_KEY = b"fuzz-only platform key"


class _HmacAttester(Attester):
    tee = TeeType.SIMULATED

    def evidence(self, report_data: bytes) -> Evidence:
        body = bytes(48) + report_data
        return Evidence(TeeType.SIMULATED, body + hmac.new(_KEY, body, hashlib.sha256).digest())

    @property
    def measurement(self) -> str:
        return "00" * 48


class _HmacVerifier(Verifier):
    tee = TeeType.SIMULATED

    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        body, tag = evidence.data[:-32], evidence.data[-32:]
        if len(body) != 112 or not hmac.compare_digest(tag, hmac.new(_KEY, body, hashlib.sha256).digest()):
            raise EvidenceError("bad evidence")
        return Claims(TeeType.SIMULATED, body[:48].hex(), body[48:], False, details=MappingProxyType({}))


RATLS_PEM, _ = make_ratls_certificate(_HmacAttester())
RATLS_DER = x509.load_pem_x509_certificate(RATLS_PEM).public_bytes(serialization.Encoding.DER)
RATLS_POLICY = Policy.for_measurements(["00" * 48])
RATLS_CLAIMS = verify_ratls_certificate(RATLS_DER, _HmacVerifier(), RATLS_POLICY).to_json()


@FUZZ
@given(mutants(RATLS_DER))
def test_fuzz_ratls_certificate(der: bytes) -> None:
    _only_package_errors(lambda: extract_evidence(der))
    result = _only_package_errors(lambda: verify_ratls_certificate(der, _HmacVerifier(), RATLS_POLICY))
    if isinstance(result, Claims):
        assert result.to_json() == RATLS_CLAIMS


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


_leaves = st.one_of(
    st.tuples(st.sampled_from([0x02, 0x04, 0x06, 0x0C, 0x05, 0x01]), st.binary(max_size=24)).map(lambda t: _tlv(*t)),
    st.just(_tlv(0x06, bytes.fromhex("2a864886f84d8a3906"))),  # 1.2.840.113741.1337.6
    st.just(_tlv(0x02, bytes.fromhex("1a7504"))),
    st.binary(max_size=8),
)
_der_trees = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4).map(lambda items: _tlv(0x30, b"".join(items))),
    max_leaves=12,
)


@FUZZ
@given(_der_trees)
def test_fuzz_tagged_evidence_der(value: bytes) -> None:
    _only_package_errors(lambda: decode_tagged_evidence(value))


# ---------------------------------------------------------------------------
# Policy documents
# ---------------------------------------------------------------------------

_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.sampled_from(["a" * 64, "b" * 96, "UpToDate", "Revoked", "30d", "rtmr0", "vcek"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "version",
                    "sgx",
                    "tdx",
                    "sev-snp",
                    "mrenclave",
                    "mrtd",
                    "measurement",
                    "rtmr",
                    "min_tcb",
                    "tcb_statuses",
                    "accepted_advisories",
                    "max_collateral_age",
                    "allow_debug",
                    "x",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        ),
    ),
    max_leaves=16,
)

VALID_DOCUMENT: dict[str, Any] = {
    "version": 1,
    "sgx": {"mrenclave": ["a" * 64], "min_isv_svn": 1},
    "tdx": {"mrtd": ["b" * 96], "rtmr": {"rtmr0": ["c" * 96]}},
    "sev-snp": {"measurement": ["d" * 96], "min_tcb": {"snp": 5}},
    "tcb_statuses": ["UpToDate"],
    "max_collateral_age": "30d",
}


@FUZZ
@given(st.one_of(st.text(max_size=400), st.binary(max_size=400)))
def test_fuzz_policy_document_text(text: str | bytes) -> None:
    result = _only_package_errors(lambda: load_policy(text))
    assert isinstance(result, Policy | Exception)


@FUZZ
@given(
    _json_values,
    st.sampled_from(["json", "yaml"]),
    st.lists(st.sampled_from(["sgx", "tdx", "sev-snp", "version", "tcb_statuses"]), max_size=2),
)
def test_fuzz_policy_document_structures(value: Any, form: str, replaced: list[str]) -> None:
    if replaced:  # mutate a valid document
        document: Any = json.loads(json.dumps(VALID_DOCUMENT))
        for key in replaced:
            document[key] = value
    else:
        document = value
    try:
        text = json.dumps(document) if form == "json" else yaml.safe_dump(document)
    except (ValueError, yaml.YAMLError):
        return
    result = _only_package_errors(lambda: load_policy(text))
    if isinstance(result, Policy):
        result.intersect(result)
