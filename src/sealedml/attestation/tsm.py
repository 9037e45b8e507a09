"""Attester for Linux confidential guests through configfs-tsm (TDX and SEV-SNP).

Linux (6.7+) exposes guest attestation as a configfs directory
(``Documentation/ABI/testing/configfs-tsm``): ``mkdir
/sys/kernel/config/tsm/report/<name>`` creates a report request; writing up to
64 bytes to ``inblob`` sets the report data; reading ``outblob`` returns the
evidence (a TDX quote or an SEV-SNP attestation report) and ``auxblob`` the
auxiliary data (the SEV-SNP certificate table, when the host provides one);
``provider`` names the backend (``tdx_guest`` or ``sev_guest``).

``generation`` counts writes to the request's attributes. The ABI asks
userspace to compare it before and after: one write (ours, to ``inblob``)
means ``outblob`` is coherent with our report data; more means another process
wrote to the same request concurrently, and the result is discarded.
"""

from __future__ import annotations

import hmac
import os
import uuid
from pathlib import Path

from sealedml.attestation.base import Attester, Evidence, TeeType
from sealedml.attestation.dcap import parse_quote_layout, quote_report_data
from sealedml.errors import AttestationError, EvidenceError

__all__ = ["PROVIDERS", "TsmAttester"]

#: ``provider`` values and the TEE type of their evidence.
PROVIDERS: dict[str, TeeType] = {"tdx_guest": TeeType.TDX, "sev_guest": TeeType.SEV_SNP}

_REPORT_DATA_LEN = 64
_MAX_BLOB = 1 << 20
_SNP_REPORT_DATA = slice(0x50, 0x90)  # ATTESTATION_REPORT.REPORT_DATA
_SNP_MEASUREMENT = slice(0x90, 0xC0)  # ATTESTATION_REPORT.MEASUREMENT


class TsmAttester(Attester):
    """TDX or SEV-SNP evidence from ``/sys/kernel/config/tsm/report``.

    The filesystem operations are small methods (``_mkdir``, ``_rmdir``,
    ``_read``, ``_write``) so tests can emulate the kernel's side on a plain
    directory tree.

    Args:
        root: the filesystem root (``/`` in a guest; a temporary directory in tests).
        tee: the expected TEE type; if ``None`` it is taken from ``provider``
            (one probe request is created and removed).
        privlevel: for SEV-SNP, the VMPL to request the report at (written to
            ``privlevel`` before the report data); ``None`` leaves the default.

    Raises:
        AttestationError: the TEE type cannot be determined.
    """

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        tee: TeeType | None = None,
        privlevel: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.reports = self.root / "sys" / "kernel" / "config" / "tsm" / "report"
        self.privlevel = privlevel
        self._measurement: str | None = None
        if tee is None:
            tee = self._probe_provider()
        if tee not in (TeeType.TDX, TeeType.SEV_SNP):
            raise AttestationError(f"configfs-tsm provides TDX or SEV-SNP evidence, not {tee.value}")
        self.tee = tee

    # -- filesystem operations (overridden by tests) --------------------------

    def _mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def _rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def _read(self, path: Path) -> bytes:
        with open(path, "rb") as handle:
            return handle.read(_MAX_BLOB + 1)

    def _write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as handle:
            handle.write(data)

    # -- helpers ---------------------------------------------------------------

    def _new_entry(self) -> Path:
        entry = self.reports / f"sealedml-{uuid.uuid4().hex}"
        try:
            self._mkdir(entry)
        except OSError as exc:
            raise AttestationError(f"cannot create configfs-tsm report {entry}: {exc}") from exc
        return entry

    def _remove(self, entry: Path) -> None:
        try:
            self._rmdir(entry)
        except OSError:
            pass  # best effort: a leftover request holds no secret

    def _generation(self, entry: Path) -> int:
        try:
            return int(self._read(entry / "generation").strip() or b"-1")
        except (OSError, ValueError) as exc:
            raise AttestationError(f"cannot read configfs-tsm generation: {exc}") from exc

    def _provider(self, entry: Path) -> TeeType:
        try:
            name = self._read(entry / "provider").strip().decode("ascii", "replace")
        except OSError as exc:
            raise AttestationError(f"cannot read configfs-tsm provider: {exc}") from exc
        if name not in PROVIDERS:
            raise AttestationError(f"unknown configfs-tsm provider {name!r}")
        return PROVIDERS[name]

    def _probe_provider(self) -> TeeType:
        entry = self._new_entry()
        try:
            return self._provider(entry)
        finally:
            self._remove(entry)

    # -- Attester ----------------------------------------------------------------

    def evidence(self, report_data: bytes) -> Evidence:
        """Request a report carrying ``report_data``.

        Args:
            report_data: exactly 64 bytes.

        Returns:
            ``Evidence(TDX, quote)`` or ``Evidence(SEV_SNP, report, aux=certificate table)``.

        Raises:
            AttestationError: the interface failed, the provider is not the
                expected one, another writer touched the request, or the
                evidence does not carry ``report_data``.
        """
        if len(report_data) != _REPORT_DATA_LEN:
            raise AttestationError("report data must be exactly 64 bytes")
        entry = self._new_entry()
        try:
            if self.privlevel is not None:
                self._write_attr(entry / "privlevel", str(self.privlevel).encode())
            before = self._generation(entry)
            self._write_attr(entry / "inblob", bytes(report_data))
            try:
                outblob = self._read(entry / "outblob")
            except OSError as exc:
                raise AttestationError(f"configfs-tsm outblob failed: {exc}") from exc
            try:
                auxblob = self._read(entry / "auxblob")
            except OSError:
                auxblob = b""  # optional: no certificate table from this host
            provider = self._provider(entry)
            after = self._generation(entry)
        finally:
            self._remove(entry)
        if after != before + 1:
            raise AttestationError(f"configfs-tsm report changed by another writer (generation {before} -> {after})")
        if provider is not self.tee:
            raise AttestationError(f"configfs-tsm provider is {provider.value}, expected {self.tee.value}")
        if len(outblob) > _MAX_BLOB or len(auxblob) > _MAX_BLOB:
            raise AttestationError("configfs-tsm returned an oversized blob")
        carried = self._carried_report_data(outblob)
        if not hmac.compare_digest(carried, bytes(report_data)):
            raise AttestationError("evidence does not carry the requested report data")
        return Evidence(self.tee, outblob, auxblob)

    def _write_attr(self, path: Path, data: bytes) -> None:
        try:
            self._write(path, data)
        except OSError as exc:
            raise AttestationError(f"cannot write configfs-tsm {path.name}: {exc}") from exc

    def _carried_report_data(self, outblob: bytes) -> bytes:
        if self.tee is TeeType.TDX:
            try:
                layout = parse_quote_layout(outblob)
                data = quote_report_data(outblob)
            except EvidenceError as exc:
                raise AttestationError(f"malformed TDX quote: {exc.message}") from exc
            if layout.tee is not TeeType.TDX:
                raise AttestationError("tdx_guest returned a non-TDX quote")
            return data
        if len(outblob) < _SNP_MEASUREMENT.stop:
            raise AttestationError("malformed SEV-SNP report: too short")
        return outblob[_SNP_REPORT_DATA]

    @property
    def measurement(self) -> str:
        """MRTD (TDX) or the launch MEASUREMENT (SEV-SNP) of this guest, hex.

        Obtained from a report with all-zero report data, then cached.

        Raises:
            AttestationError: the interface failed.
        """
        if self._measurement is None:
            blob = self.evidence(bytes(_REPORT_DATA_LEN)).data
            if self.tee is TeeType.TDX:
                layout = parse_quote_layout(blob)
                start = layout.body_offset + 136  # MRTD at TD quote body offset 136
                self._measurement = blob[start : start + 48].hex()
            else:
                self._measurement = blob[_SNP_MEASUREMENT].hex()
        return self._measurement
