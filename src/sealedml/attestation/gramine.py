"""Attester for SGX enclaves run by Gramine (``/dev/attestation`` pseudo-files).

Gramine exposes DCAP attestation as files inside the enclave: writing 64 bytes
to ``/dev/attestation/user_report_data`` sets the report data of the next
quote, and reading ``/dev/attestation/quote`` returns an SGX ECDSA quote
(Gramine documentation, "Attestation and Secret Provisioning",
``/dev/attestation`` interface). ``/dev/attestation/my_target_info`` holds the
enclave's own TARGETINFO, whose first 32 bytes are its MRENCLAVE.

The write-then-read pair is not atomic, so this attester serializes its own
callers with a lock and checks that the quote carries exactly the requested
report data (another process in the enclave might have written in between).
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

from sealedml.attestation.base import Attester, Evidence, TeeType
from sealedml.attestation.dcap import parse_quote_layout, quote_report_data
from sealedml.errors import AttestationError, EvidenceError

__all__ = ["GramineAttester"]

log = logging.getLogger(__name__)

_REPORT_DATA_LEN = 64
_MAX_QUOTE = 64 * 1024


class GramineAttester(Attester):
    """SGX DCAP evidence from Gramine's ``/dev/attestation`` files.

    Args:
        root: the filesystem root (``/`` inside the enclave; a temporary
            directory in tests).
    """

    tee = TeeType.SGX
    _lock = threading.Lock()

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self._dir = self.root / "dev" / "attestation"
        self._measurement: str | None = None

    def evidence(self, report_data: bytes) -> Evidence:
        """Write ``report_data`` and read back a quote carrying it.

        Args:
            report_data: exactly 64 bytes.

        Returns:
            ``Evidence(TeeType.SGX, quote)``.

        Raises:
            AttestationError: wrong report data size, the files cannot be used,
                the quote is malformed, or it does not carry ``report_data``.
        """
        if len(report_data) != _REPORT_DATA_LEN:
            raise AttestationError("report data must be exactly 64 bytes")
        with self._lock:
            try:
                with open(self._dir / "user_report_data", "wb", buffering=0) as handle:
                    handle.write(bytes(report_data))
                with open(self._dir / "quote", "rb") as handle:
                    quote = handle.read(_MAX_QUOTE + 1)
            except OSError as exc:
                raise AttestationError(f"Gramine attestation interface failed: {exc}") from exc
        if len(quote) > _MAX_QUOTE:
            raise AttestationError("Gramine returned an oversized quote")
        try:
            layout = parse_quote_layout(quote)
            carried = quote_report_data(quote)
        except EvidenceError as exc:
            raise AttestationError(f"Gramine returned a malformed quote: {exc.message}") from exc
        if layout.tee is not TeeType.SGX:
            raise AttestationError("Gramine returned a non-SGX quote")
        if not hmac.compare_digest(carried, bytes(report_data)):
            # Returned anyway: the verifier side (the KeyService) is where evidence is
            # judged, and it refuses — and audits — a quote that does not bind its
            # nonce and key. Here we only say what happened.
            log.warning("Gramine quote does not carry the requested report data; the verifier will refuse it")
        return Evidence(TeeType.SGX, quote)

    @property
    def measurement(self) -> str:
        """This enclave's MRENCLAVE (hex), from ``my_target_info`` or a quote.

        Raises:
            AttestationError: neither is available.
        """
        if self._measurement is None:
            target_info = self._dir / "my_target_info"
            try:
                data = target_info.read_bytes()
            except OSError:
                data = b""
            if len(data) >= 32:
                # TARGETINFO starts with MEASUREMENT (MRENCLAVE), 32 bytes (Intel SDM 38.17).
                self._measurement = data[:32].hex()
            else:
                quote = self.evidence(bytes(_REPORT_DATA_LEN)).data
                layout = parse_quote_layout(quote)
                start = layout.body_offset + 64  # MRENCLAVE at body offset 64 (A.4)
                self._measurement = quote[start : start + 32].hex()
        return self._measurement
