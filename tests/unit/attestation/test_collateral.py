"""Collateral sources: PCCS over httpx with a cache, SNP certificate tables, VCEK sources."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.collateral import LocalCollateral, collateral_window, load_certificate, quote_collateral_key
from sealedml.attestation.dcap import SgxDcapVerifier, TdxDcapVerifier
from sealedml.attestation.pccs import PccsCollateral
from sealedml.attestation.sev_snp_collateral import (
    CacheDirVcekSource,
    CertTableVcekSource,
    FileVcekSource,
    build_snp_cert_table,
    parse_snp_cert_table,
)
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

from ._support import MRENCLAVE, MRTD, SGX_TIME, TDX_TIME


def _fake_pccs(collateral: dict[str, str], tee: str, fmspc: str, ca: str) -> httpx.MockTransport:
    """A PCCS serving one collateral bundle through the v4 API."""
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(str(request.url))
        path = request.url.path
        query = dict(urllib.parse.parse_qsl(request.url.query.decode()))
        quote = urllib.parse.quote
        if path == "/sgx/certification/v4/pckcrl" and query == {"ca": ca, "encoding": "der"}:
            return httpx.Response(
                200,
                content=bytes.fromhex(collateral["pck_crl"]),
                headers={"SGX-PCK-CRL-Issuer-Chain": quote(collateral["pck_crl_issuer_chain"])},
            )
        if path == f"/{tee}/certification/v4/tcb" and query == {"fmspc": fmspc}:
            body = '{"tcbInfo":' + collateral["tcb_info"] + ',"signature":"' + collateral["tcb_info_signature"] + '"}'
            return httpx.Response(
                200,
                text=body,
                headers={"TCB-Info-Issuer-Chain": quote(collateral["tcb_info_issuer_chain"])},
            )
        if path == f"/{tee}/certification/v4/qe/identity":
            body = (
                '{"enclaveIdentity": '
                + collateral["qe_identity"]
                + ', "signature": "'
                + collateral["qe_identity_signature"]
                + '"}'
            )
            chain = quote(collateral["qe_identity_issuer_chain"])
            return httpx.Response(200, text=body, headers={"SGX-Enclave-Identity-Issuer-Chain": chain})
        if path == "/sgx/certification/v4/rootcacrl":
            return httpx.Response(200, text=collateral["root_ca_crl"])
        return httpx.Response(404)

    transport = httpx.MockTransport(handler)
    transport.requests = requests  # type: ignore[attr-defined]
    return transport


@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_pccs_collateral_verifies_real_quotes(vectors: Path, tmp_path: Path, tee: str) -> None:
    if tee == "sgx":
        quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
        bundle = json.loads((vectors / "sgx-dcap" / "collateral.json").read_text())
        verifier_cls, at, expected, kind = SgxDcapVerifier, SGX_TIME, MRENCLAVE, TeeType.SGX
    else:
        quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
        bundle = json.loads((vectors / "tdx" / "collateral-v4.json").read_text())
        verifier_cls, at, expected, kind = TdxDcapVerifier, TDX_TIME, MRTD, TeeType.TDX
    _, fmspc, ca = quote_collateral_key(quote)
    transport = _fake_pccs(bundle, tee, fmspc, ca)
    source = PccsCollateral(
        "https://pccs.test/sgx/certification/v4/",
        cache_dir=tmp_path / "cache",
        client=httpx.Client(transport=transport),
    )
    claims = verifier_cls(source).verify(Evidence(kind, quote), now=at)
    assert claims.measurement == expected
    fetched = len(transport.requests)  # type: ignore[attr-defined]
    assert fetched == 4
    assert (tmp_path / "cache" / f"{tee}-{fmspc}-{ca}.json").is_file()

    # A second verification is served from the cache: no new requests.
    verifier_cls(source).verify(Evidence(kind, quote), now=at)
    assert len(transport.requests) == fetched  # type: ignore[attr-defined]


def test_pccs_cache_survives_an_unreachable_pccs(vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    bundle = (vectors / "sgx-dcap" / "collateral.json").read_text()
    _, fmspc, ca = quote_collateral_key(quote)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"sgx-{fmspc}-{ca}.json").write_text(bundle)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("unreachable", request=request)

    source = PccsCollateral(
        "https://pccs.test", cache_dir=cache, client=httpx.Client(transport=httpx.MockTransport(down))
    )
    # Near expiry the source tries to refresh, fails, and falls back to the cache.
    near_expiry = collateral_window(bundle).expires - timedelta(minutes=5)
    claims = SgxDcapVerifier(source).verify(Evidence(TeeType.SGX, quote), now=near_expiry)
    assert claims.measurement == MRENCLAVE
    # Without a cache the failure is a CollateralError.
    empty = PccsCollateral("https://pccs.test", client=httpx.Client(transport=httpx.MockTransport(down)))
    with pytest.raises(CollateralError, match="PCCS request failed"):
        SgxDcapVerifier(empty).verify(Evidence(TeeType.SGX, quote), now=SGX_TIME)


def test_pccs_http_errors_and_bad_bodies(vectors: Path) -> None:
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()

    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404)

    source = PccsCollateral("https://pccs.test", client=httpx.Client(transport=httpx.MockTransport(not_found)))
    with pytest.raises(CollateralError, match="HTTP 404"):
        source.fetch(quote)

    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"\x00garbage", headers={"SGX-PCK-CRL-Issuer-Chain": "x"})

    source = PccsCollateral("https://pccs.test", client=httpx.Client(transport=httpx.MockTransport(garbage)))
    with pytest.raises(CollateralError):
        source.fetch(quote)
    with pytest.raises(ConfigurationError):
        PccsCollateral("ftp://pccs.test")
    with pytest.raises(EvidenceError):
        source.fetch(b"\x03\x00" + bytes(100))


def test_local_collateral_from_path_and_text(vectors: Path, tmp_path: Path) -> None:
    path = vectors / "sgx-dcap" / "collateral.json"
    text = path.read_text()
    assert LocalCollateral(path).collateral_for(b"", now=SGX_TIME) == text
    assert LocalCollateral(str(path)).collateral_for(b"", now=SGX_TIME) == text
    assert LocalCollateral(text).collateral_for(b"", now=SGX_TIME) == text
    assert LocalCollateral.from_text("x").collateral_for(b"", now=SGX_TIME) == "x"
    with pytest.raises(ConfigurationError):
        LocalCollateral(tmp_path / "missing.json")


def test_collateral_window_of_vectors(vectors: Path) -> None:
    window = collateral_window((vectors / "sgx-dcap" / "collateral.json").read_text())
    assert window.issued == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)
    assert window.expires == datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)
    assert window.contains(SGX_TIME)
    assert not window.contains(datetime(2026, 1, 1, tzinfo=UTC))


# ---------------------------------------------------------------------------
# SNP certificate table
# ---------------------------------------------------------------------------


def test_cert_table_round_trip(vectors: Path) -> None:
    vcek = (vectors / "sev-snp" / "vcek-milan.der").read_bytes()
    table = build_snp_cert_table({"vcek": vcek, "ask": b"ask-bytes", "ark": b"ark-bytes"})
    parsed = parse_snp_cert_table(table)
    assert parsed == {"vcek": vcek, "ask": b"ask-bytes", "ark": b"ark-bytes"}
    assert parse_snp_cert_table(b"") == {}
    assert parse_snp_cert_table(bytes(4096)) == {}
    # The entry layout: GUID (RFC 4122 byte order), u32 offset, u32 length.
    assert table[:16] == uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
    assert int.from_bytes(table[16:20], "little") == 24 * 4
    assert int.from_bytes(table[20:24], "little") == len(vcek)


def test_cert_table_accepts_mixed_endian_guids(vectors: Path) -> None:
    guid = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le
    table = guid + (48).to_bytes(4, "little") + (3).to_bytes(4, "little") + bytes(24) + b"abc"
    assert parse_snp_cert_table(table) == {"vcek": b"abc"}


@pytest.mark.parametrize(
    "table",
    [
        b"\x01" * 23,  # no room for an entry
        b"\x01" * 24,  # no terminator
        b"\x01" * 16 + (9999).to_bytes(4, "little") + (5).to_bytes(4, "little") + bytes(24),
        b"\x01" * 16 + (48).to_bytes(4, "little") + (0).to_bytes(4, "little") + bytes(24),
        b"\x01" * 16 + (0).to_bytes(4, "little") + (8).to_bytes(4, "little") + bytes(24),
    ],
)
def test_malformed_cert_tables(table: bytes) -> None:
    with pytest.raises(CollateralError):
        parse_snp_cert_table(table)


def test_build_cert_table_rejects_unknown_names() -> None:
    with pytest.raises(ConfigurationError):
        build_snp_cert_table({"pck": b"x"})


def test_vcek_sources(vectors: Path, tmp_path: Path) -> None:
    vcek_path = vectors / "sev-snp" / "vcek-milan.der"
    vcek = vcek_path.read_bytes()
    chip = bytes(range(64))
    table = build_snp_cert_table({"vcek": vcek})
    assert CertTableVcekSource().find(chip_id=chip, reported_tcb=1, aux=table) == vcek
    assert CertTableVcekSource().find(chip_id=chip, reported_tcb=1, aux=b"") is None
    assert FileVcekSource(vcek_path).find(chip_id=chip, reported_tcb=1, aux=b"") == vcek
    with pytest.raises(ConfigurationError):
        FileVcekSource(tmp_path / "none.der")
    cache = CacheDirVcekSource(tmp_path / "vceks")
    assert cache.find(chip_id=chip, reported_tcb=0x4405000000000002, aux=b"") is None
    cache.store(chip, 0x4405000000000002, vcek)
    assert cache.find(chip_id=chip, reported_tcb=0x4405000000000002, aux=b"") == vcek
    assert cache.path_for(chip, 0x4405000000000002).name == chip.hex() + "-4405000000000002.der"
    assert load_certificate(vcek).subject.rfc4514_string().startswith("CN=SEV-VCEK")
    with pytest.raises(CollateralError):
        load_certificate(b"not a certificate")
