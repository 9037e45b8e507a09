"""SEV-SNP collateral: the SNP certificate table and where a report's VCEK / VLEK comes from.

The certificate that signed a report is looked up, in the verifier's order, in
the SNP certificate table that comes with the report
(:class:`CertTableVcekSource`), a file (:class:`FileVcekSource`) or a cache
directory keyed by chip id and TCB (:class:`CacheDirVcekSource`). None of it is
trusted: :class:`~sealedml.attestation.sev_snp.SevSnpVerifier` checks every
certificate against the pinned AMD roots.
"""

from __future__ import annotations

import abc
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from sealedml.attestation.collateral import MAX_DOCUMENT_BYTES
from sealedml.errors import CollateralError, ConfigurationError

__all__ = [
    "SNP_CERT_GUIDS",
    "CacheDirVcekSource",
    "CertTableVcekSource",
    "FileVcekSource",
    "VcekSource",
    "build_snp_cert_table",
    "parse_snp_cert_table",
]

log = logging.getLogger(__name__)

#: GUIDs of the SNP extended-report certificate table (AMD GHCB specification,
#: "SNP Extended Guest Request", certificate table; Linux SNP_GET_EXT_REPORT).
SNP_CERT_GUIDS: Mapping[uuid.UUID, str] = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}
_GUID_BY_NAME = {name: guid for guid, name in SNP_CERT_GUIDS.items()}
_ENTRY_SIZE = 24  # GUID (16) + offset (u32) + length (u32)
_MAX_ENTRIES = 64


def _guid_name(raw: bytes) -> str:
    # The table stores GUIDs in RFC 4122 byte order; the mixed-endian (Microsoft
    # GUID) order some tools emit is accepted too — the certificates are
    # verified anyway, so accepting both cannot weaken anything.
    for candidate in (uuid.UUID(bytes=raw), uuid.UUID(bytes_le=raw)):
        if candidate in SNP_CERT_GUIDS:
            return SNP_CERT_GUIDS[candidate]
    return str(uuid.UUID(bytes=raw))


def parse_snp_cert_table(aux: bytes) -> dict[str, bytes]:
    """Split an SNP certificate table into ``{name: certificate bytes}``.

    Format (GHCB specification, SNP extended guest request): entries of a
    16-byte GUID, a little-endian u32 offset and a u32 length, terminated by an
    all-zero entry; offsets are relative to the start of the table. Known GUIDs
    map to ``"vcek"``, ``"vlek"``, ``"ask"``, ``"ark"``; others keep their GUID
    text. An empty ``aux`` gives an empty table.

    Args:
        aux: the table bytes (configfs-tsm ``auxblob`` or the certificate
            buffer of ``SNP_GET_EXT_REPORT``).

    Returns:
        The certificates by name.

    Raises:
        CollateralError: the table is malformed.
    """
    data = bytes(aux)
    if not data or not any(data):
        return {}
    entries: list[tuple[str, int, int]] = []
    for index in range(_MAX_ENTRIES + 1):
        start = index * _ENTRY_SIZE
        if start + _ENTRY_SIZE > len(data):
            raise CollateralError("SNP certificate table has no terminating entry")
        entry = data[start : start + _ENTRY_SIZE]
        if not any(entry):
            header_end = start + _ENTRY_SIZE
            break
        if index == _MAX_ENTRIES:
            raise CollateralError("SNP certificate table has too many entries")
        offset = int.from_bytes(entry[16:20], "little")
        length = int.from_bytes(entry[20:24], "little")
        entries.append((_guid_name(entry[:16]), offset, length))
    table: dict[str, bytes] = {}
    for name, offset, length in entries:
        if length == 0 or offset < header_end or offset + length > len(data):
            raise CollateralError(f"SNP certificate table entry {name} out of bounds")
        if name in table:
            raise CollateralError(f"SNP certificate table lists {name} twice")
        table[name] = data[offset : offset + length]
    return table


def build_snp_cert_table(certificates: Mapping[str, bytes]) -> bytes:
    """Build an SNP certificate table (the inverse of :func:`parse_snp_cert_table`).

    Args:
        certificates: ``{"vcek" | "vlek" | "ask" | "ark": DER bytes}``.

    Returns:
        The table bytes.

    Raises:
        ConfigurationError: an unknown certificate name.
    """
    names = list(certificates)
    header = _ENTRY_SIZE * (len(names) + 1)
    entries = b""
    body = b""
    for name in names:
        guid = _GUID_BY_NAME.get(name)
        if guid is None:
            raise ConfigurationError(f"unknown SNP certificate name {name!r}")
        blob = bytes(certificates[name])
        entries += guid.bytes + (header + len(body)).to_bytes(4, "little") + len(blob).to_bytes(4, "little")
        body += blob
    return entries + bytes(_ENTRY_SIZE) + body


class VcekSource(abc.ABC):
    """Finds the VCEK / VLEK certificate that signed an SEV-SNP report."""

    @abc.abstractmethod
    def find(self, *, chip_id: bytes, reported_tcb: int, aux: bytes) -> bytes | None:
        """Return the certificate (DER or PEM), or ``None`` if this source has none.

        Args:
            chip_id: the report's 64-byte CHIP_ID.
            reported_tcb: the report's REPORTED_TCB as an integer (little-endian u64).
            aux: the certificate table that came with the evidence (may be empty).

        Raises:
            CollateralError: the source is corrupt.
        """

    def find_all(self, *, chip_id: bytes, reported_tcb: int, aux: bytes, signing_key: str) -> tuple[bytes, ...]:
        """Every certificate this source offers for a report, the likeliest first.

        The SEV-SNP verifier calls this; by default it is :meth:`find`'s answer.

        Args:
            chip_id: the report's 64-byte CHIP_ID.
            reported_tcb: the report's REPORTED_TCB as an integer (little-endian u64).
            aux: the certificate table that came with the evidence (may be empty).
            signing_key: ``"vcek"`` or ``"vlek"``, the report's SIGNING_KEY.

        Returns:
            The certificates (DER or PEM), possibly none.

        Raises:
            CollateralError: the source is corrupt.
        """
        found = self.find(chip_id=chip_id, reported_tcb=reported_tcb, aux=aux)
        return (found,) if found else ()


class CertTableVcekSource(VcekSource):
    """The VCEK or VLEK from the evidence's certificate table."""

    def find(self, *, chip_id: bytes, reported_tcb: int, aux: bytes) -> bytes | None:
        """Return the table's VCEK or, failing that, its VLEK entry, if any."""
        table = parse_snp_cert_table(aux)
        return table.get("vcek") or table.get("vlek")

    def find_all(self, *, chip_id: bytes, reported_tcb: int, aux: bytes, signing_key: str) -> tuple[bytes, ...]:
        """Return the table's entry named like the report's signing key, then the other one.

        The other entry is still offered so that a report whose table carries
        only the wrong kind of key is rejected with that reason, not with
        "no certificate".
        """
        table = parse_snp_cert_table(aux)
        order = ("vlek", "vcek") if signing_key == "vlek" else ("vcek", "vlek")
        return tuple(table[name] for name in order if table.get(name))


class FileVcekSource(VcekSource):
    """A VCEK / VLEK certificate from a file (DER or PEM).

    Args:
        path: the certificate file.

    Raises:
        ConfigurationError: the file cannot be read.
    """

    def __init__(self, path: Path) -> None:
        try:
            self._data = Path(path).read_bytes()[: MAX_DOCUMENT_BYTES + 1]
        except OSError as exc:
            raise ConfigurationError(f"cannot read VCEK file {path}: {exc}") from exc

    def find(self, *, chip_id: bytes, reported_tcb: int, aux: bytes) -> bytes | None:
        """Return the file's certificate."""
        return self._data


class CacheDirVcekSource(VcekSource):
    """VCEKs cached by chip id and TCB: ``<dir>/<chip_id hex>-<tcb 16 hex>.der``.

    The SEV-SNP verifier stores every VCEK it verified here, so a certificate
    obtained once (from a certificate table, a file or AMD's KDS) serves later
    reports of the same chip at the same TCB.

    Args:
        directory: the cache directory (created on first store).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, chip_id: bytes, reported_tcb: int) -> Path:
        """The cache file for ``chip_id`` at ``reported_tcb``."""
        return self.directory / f"{bytes(chip_id).hex()}-{reported_tcb & 0xFFFFFFFFFFFFFFFF:016x}.der"

    def find(self, *, chip_id: bytes, reported_tcb: int, aux: bytes) -> bytes | None:
        """Return the cached certificate, if any."""
        try:
            return self.path_for(chip_id, reported_tcb).read_bytes()[: MAX_DOCUMENT_BYTES + 1]
        except OSError:
            return None

    def store(self, chip_id: bytes, reported_tcb: int, der: bytes) -> None:
        """Cache ``der`` for ``chip_id`` at ``reported_tcb`` (errors are logged, not raised)."""
        path = self.path_for(chip_id, reported_tcb)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".vcek-", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(der)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write VCEK cache %s: %s", path, exc)
