"""Gramine and configfs-tsm attesters on fake filesystem trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealedml.attestation.base import TeeType
from sealedml.attestation.gramine import GramineAttester
from sealedml.attestation.registry import attester_for, detect_attester
from sealedml.attestation.sev_snp_collateral import build_snp_cert_table
from sealedml.attestation.tsm import TsmAttester
from sealedml.errors import AttestationError, ConfigurationError

from ._support import MRENCLAVE, MRTD, SNP_MEASUREMENT

# ---------------------------------------------------------------------------
# Gramine
# ---------------------------------------------------------------------------


def _gramine_tree(root: Path, quote: bytes, target_info: bytes | None = None) -> Path:
    attestation = root / "dev" / "attestation"
    attestation.mkdir(parents=True)
    (attestation / "user_report_data").write_bytes(b"")
    (attestation / "quote").write_bytes(quote)
    if target_info is not None:
        (attestation / "my_target_info").write_bytes(target_info)
    return attestation


def test_gramine_attester_round_trip(vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    attestation = _gramine_tree(tmp_path, quote)
    report_data = quote[368:432]  # the vector's report data ("Hello, world!" ...)
    attester = GramineAttester(tmp_path)
    evidence = attester.evidence(report_data)
    assert evidence.tee is TeeType.SGX
    assert evidence.data == quote
    assert (attestation / "user_report_data").read_bytes() == report_data


def test_gramine_measurement_from_a_quote(vectors: Path, tmp_path: Path) -> None:
    # Without my_target_info the attester asks for a quote with zero report
    # data; the fake tree serves one (its signature no longer matters here).
    quote = bytearray((vectors / "sgx-dcap" / "quote.bin").read_bytes())
    quote[368:432] = bytes(64)
    _gramine_tree(tmp_path, bytes(quote))
    assert GramineAttester(tmp_path).measurement == MRENCLAVE


def test_gramine_measurement_from_target_info(vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    _gramine_tree(tmp_path, quote, target_info=bytes.fromhex(MRENCLAVE) + bytes(480))
    assert GramineAttester(tmp_path).measurement == MRENCLAVE


def test_gramine_returns_the_tree_quote_and_leaves_judgement_to_the_verifier(
    vectors: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    _gramine_tree(tmp_path, quote)
    evidence = GramineAttester(tmp_path).evidence(b"\x01" * 64)
    assert evidence.data == quote  # the KeyService refuses it for its binding (tests/integration)
    assert (tmp_path / "dev" / "attestation" / "user_report_data").read_bytes() == b"\x01" * 64
    assert "does not carry the requested report data" in caplog.text


def test_gramine_errors(vectors: Path, tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="64 bytes"):
        GramineAttester(tmp_path).evidence(b"short")
    with pytest.raises(AttestationError, match="Gramine attestation interface failed"):
        GramineAttester(tmp_path).evidence(bytes(64))
    _gramine_tree(tmp_path, b"garbage")
    with pytest.raises(AttestationError, match="malformed quote"):
        GramineAttester(tmp_path).evidence(bytes(64))


def test_gramine_rejects_tdx_quotes(vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    _gramine_tree(tmp_path, quote)
    with pytest.raises(AttestationError, match="non-SGX"):
        GramineAttester(tmp_path).evidence(quote[568:632])


# ---------------------------------------------------------------------------
# configfs-tsm
# ---------------------------------------------------------------------------


class FakeTsm(TsmAttester):
    """Plays the kernel's part on a plain directory tree.

    On ``mkdir`` the entry gets ``generation`` and ``provider`` files; a write
    to ``inblob`` (or ``privlevel``) bumps ``generation`` — the test writes the
    file itself, as the kernel would — and produces ``outblob`` / ``auxblob``.
    ``concurrent_writes`` extra bumps simulate another process writing to the
    same request between our write and our final read.
    """

    def __init__(
        self,
        root: Path,
        *,
        provider: str,
        template: bytes,
        report_data_offset: int,
        auxblob: bytes = b"",
        concurrent_writes: int = 0,
        **kwargs: object,
    ) -> None:
        self.provider_name = provider
        self.template = template
        self.offset = report_data_offset
        self.auxblob = auxblob
        self.concurrent_writes = concurrent_writes
        self.created: list[Path] = []
        super().__init__(root, **kwargs)  # type: ignore[arg-type]

    def _mkdir(self, path: Path) -> None:
        path.mkdir()
        self.created.append(path)
        (path / "generation").write_text("0\n")
        (path / "provider").write_text(self.provider_name + "\n")

    def _rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()

    def _bump(self, entry: Path, by: int = 1) -> None:
        generation = int((entry / "generation").read_text())
        (entry / "generation").write_text(f"{generation + by}\n")

    def _write(self, path: Path, data: bytes) -> None:
        super()._write(path, data)
        entry = path.parent
        self._bump(entry)
        if path.name == "inblob":
            blob = bytearray(self.template)
            blob[self.offset : self.offset + 64] = data.ljust(64, b"\x00")
            (entry / "outblob").write_bytes(bytes(blob))
            if self.auxblob:
                (entry / "auxblob").write_bytes(self.auxblob)
            if self.concurrent_writes:
                self._bump(entry, self.concurrent_writes)


def _tsm_root(root: Path) -> Path:
    reports = root / "sys" / "kernel" / "config" / "tsm" / "report"
    reports.mkdir(parents=True)
    return reports


def test_tsm_tdx_round_trip(vectors: Path, tmp_path: Path) -> None:
    reports = _tsm_root(tmp_path)
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    attester = FakeTsm(tmp_path, provider="tdx_guest", template=quote, report_data_offset=568)
    assert attester.tee is TeeType.TDX  # probed from ``provider``
    report_data = bytes(range(64))
    evidence = attester.evidence(report_data)
    assert evidence.tee is TeeType.TDX
    assert evidence.data[568:632] == report_data
    assert evidence.aux == b""
    assert attester.measurement == MRTD
    assert list(reports.iterdir()) == []  # every request directory was removed
    assert len(attester.created) == 3  # probe, evidence, measurement


def test_tsm_snp_round_trip_with_cert_table(vectors: Path, tmp_path: Path) -> None:
    _tsm_root(tmp_path)
    report = (vectors / "sev-snp" / "report-milan.bin").read_bytes()
    table = build_snp_cert_table({"vcek": (vectors / "sev-snp" / "vcek-milan.der").read_bytes()})
    attester = FakeTsm(
        tmp_path,
        provider="sev_guest",
        template=report,
        report_data_offset=0x50,
        auxblob=table,
        tee=TeeType.SEV_SNP,
        privlevel=0,
    )
    evidence = attester.evidence(b"\x07" * 64)
    assert evidence.tee is TeeType.SEV_SNP
    assert evidence.data[0x50:0x90] == b"\x07" * 64
    assert evidence.aux == table
    assert attester.measurement == SNP_MEASUREMENT


def test_tsm_rejects_a_concurrent_writer(vectors: Path, tmp_path: Path) -> None:
    reports = _tsm_root(tmp_path)
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    attester = FakeTsm(
        tmp_path,
        provider="tdx_guest",
        template=quote,
        report_data_offset=568,
        concurrent_writes=1,
        tee=TeeType.TDX,
    )
    with pytest.raises(AttestationError, match=r"another writer \(generation 0 -> 2\)"):
        attester.evidence(bytes(64))
    assert list(reports.iterdir()) == []


def test_tsm_rejects_unexpected_provider(vectors: Path, tmp_path: Path) -> None:
    _tsm_root(tmp_path)
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    attester = FakeTsm(tmp_path, provider="sev_guest", template=quote, report_data_offset=568, tee=TeeType.TDX)
    with pytest.raises(AttestationError, match="provider is sev-snp"):
        attester.evidence(bytes(64))
    with pytest.raises(AttestationError, match="unknown configfs-tsm provider"):
        FakeTsm(tmp_path, provider="arm_cca", template=quote, report_data_offset=568)


def test_tsm_rejects_evidence_without_our_report_data(vectors: Path, tmp_path: Path) -> None:
    _tsm_root(tmp_path)
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    # The fake "kernel" puts the report data at the wrong offset.
    attester = FakeTsm(tmp_path, provider="tdx_guest", template=quote, report_data_offset=400)
    with pytest.raises(AttestationError, match="does not carry the requested report data"):
        attester.evidence(b"\x01" * 64)


def test_tsm_errors(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="cannot create configfs-tsm report"):
        TsmAttester(tmp_path)
    with pytest.raises(AttestationError, match="not sgx"):
        TsmAttester(tmp_path, tee=TeeType.SGX)
    attester = TsmAttester(tmp_path, tee=TeeType.TDX)
    with pytest.raises(AttestationError, match="64 bytes"):
        attester.evidence(b"")


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


def test_detect_attester(tmp_path: Path) -> None:
    assert detect_attester(tmp_path) is None
    _tsm_root(tmp_path)
    assert detect_attester(tmp_path) == "tsm"
    _gramine_tree(tmp_path, b"q")
    assert detect_attester(tmp_path) == "gramine"
    assert isinstance(attester_for("gramine", tmp_path), GramineAttester)
    with pytest.raises(ConfigurationError):
        attester_for("sev", tmp_path)
