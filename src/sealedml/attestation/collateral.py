"""Where verifiers get their collateral from.

*Collateral* is everything a verifier needs besides the evidence itself:

- **Intel SGX / TDX (DCAP)**: the TCB info and QE identity documents signed by
  Intel, the PCK and root CA CRLs, and their issuer chains — bundled as one JSON
  object in the ``QuoteCollateralV3`` format of the ``dcap-qvl`` package (the
  same field names Intel's PCCS API returns, binary fields hex-encoded).
  Sources: a local file (:class:`LocalCollateral`) or a PCCS / Intel PCS URL
  with an on-disk cache (:class:`PccsCollateral`).
- **AMD SEV-SNP**: the VCEK (or VLEK) certificate of the chip that signed the
  report. Sources: the SNP certificate table that comes with the report
  (:class:`CertTableVcekSource`), a file (:class:`FileVcekSource`), or a cache
  directory keyed by chip id and TCB (:class:`CacheDirVcekSource`). The AMD
  roots (ARK, ASK, ASVK) are pinned in the package, never taken from collateral.

Collateral is *not* trusted: verifiers check its signatures against pinned
roots. A source only decides what to hand to the verifier, and freshness is
checked at verification time (``now``).
"""

from __future__ import annotations

import abc
import json
import logging
import os
import tempfile
import urllib.parse
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

__all__ = [
    "CERTIFICATE_PARSE_ERRORS",
    "SNP_CERT_GUIDS",
    "CacheDirVcekSource",
    "CertTableVcekSource",
    "CollateralWindow",
    "FileVcekSource",
    "IntelCollateralSource",
    "LocalCollateral",
    "PccsCollateral",
    "VcekSource",
    "build_snp_cert_table",
    "check_certificate_fields",
    "collateral_window",
    "load_certificate",
    "parse_snp_cert_table",
    "quote_collateral_key",
]

log = logging.getLogger(__name__)

#: Largest collateral / certificate document accepted from a file or a server.
MAX_DOCUMENT_BYTES = 1 << 20

# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


def load_certificate(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """Parse one X.509 certificate in DER or PEM form.

    AMD's VCEK certificates carry a zero serial number, which ``cryptography``
    still parses but warns about; the warning is silenced here because the
    certificate is authenticated by its signature chain, not by its serial.

    Args:
        data: DER or PEM bytes.
        what: name used in the error message.

    Returns:
        The certificate.

    Raises:
        CollateralError: ``data`` is not a certificate.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            check_certificate_fields(cert)
        except CERTIFICATE_PARSE_ERRORS as exc:
            raise CollateralError(f"{what} is not a valid X.509 certificate") from exc
    return cert


#: What ``cryptography`` raises on a certificate field that does not parse.
CERTIFICATE_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
)


def check_certificate_fields(cert: x509.Certificate) -> None:
    """Parse every lazily-decoded field verifiers use, so errors surface at load time.

    ``cryptography`` decodes names, extensions and keys on first access; a
    malformed field would otherwise raise ``ValueError`` deep inside a check.

    Raises:
        Exception: one of :data:`CERTIFICATE_PARSE_ERRORS` (callers translate it).
    """
    cert.version  # noqa: B018 - forces decoding
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    for _extension in cert.extensions:
        pass
    cert.public_key()
    cert.signature_hash_algorithm  # noqa: B018 - forces decoding
    cert.not_valid_before_utc  # noqa: B018
    cert.not_valid_after_utc  # noqa: B018


def _load_pem_chain(text: str, what: str) -> list[x509.Certificate]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            certs = x509.load_pem_x509_certificates(text.encode("utf-8", "strict"))
        except (ValueError, TypeError, UnicodeError) as exc:
            raise CollateralError(f"{what} is not a PEM certificate chain") from exc
    return certs


# ---------------------------------------------------------------------------
# Intel DCAP collateral
# ---------------------------------------------------------------------------

#: Fields of the ``QuoteCollateralV3`` JSON object (dcap-qvl / Intel PCCS naming).
_COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


@dataclass(frozen=True)
class CollateralWindow:
    """The time window in which a DCAP collateral bundle is usable.

    Attributes:
        issued: the latest issue date of its parts (TCB info, QE identity, CRLs,
            issuer certificates) — the collateral is not valid before this.
        expires: the earliest ``nextUpdate`` / ``notAfter`` of its parts.
    """

    issued: datetime
    expires: datetime

    def contains(self, at: datetime) -> bool:
        """True if ``at`` lies inside the window."""
        return self.issued <= at <= self.expires


def _parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise CollateralError(f"collateral {what} missing")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CollateralError(f"collateral {what} is not a date") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_collateral_object(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_DOCUMENT_BYTES:
        raise CollateralError("collateral document too large")
    try:
        obj = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CollateralError("collateral is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise CollateralError("collateral is not a JSON object")
    for name in _COLLATERAL_FIELDS:
        if not isinstance(obj.get(name), str):
            raise CollateralError(f"collateral field {name} missing or not a string")
    return obj


def _load_crl(hex_or_pem: str, what: str) -> x509.CertificateRevocationList:
    text = hex_or_pem.strip()
    try:
        if text.startswith("-----BEGIN"):
            return x509.load_pem_x509_crl(text.encode("ascii"))
        return x509.load_der_x509_crl(bytes.fromhex(text))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise CollateralError(f"collateral {what} is not a CRL") from exc


def collateral_window(text: str | bytes) -> CollateralWindow:
    """Compute the validity window of a ``QuoteCollateralV3`` JSON document.

    Covers the TCB info and QE identity (``issueDate`` / ``nextUpdate``, Intel
    PCS API v4), both CRLs (``thisUpdate`` / ``nextUpdate``, RFC 5280 §5.1.2.4-5)
    and every certificate of the three issuer chains.

    Args:
        text: the collateral JSON.

    Returns:
        The window.

    Raises:
        CollateralError: the document is malformed.
    """
    obj = _parse_collateral_object(text)
    issued: list[datetime] = []
    expires: list[datetime] = []
    for name in ("tcb_info", "qe_identity"):
        try:
            doc = json.loads(obj[name])
        except (ValueError, RecursionError) as exc:
            raise CollateralError(f"collateral {name} is not valid JSON") from exc
        if not isinstance(doc, dict):
            raise CollateralError(f"collateral {name} is not a JSON object")
        issued.append(_parse_time(doc.get("issueDate"), f"{name}.issueDate"))
        expires.append(_parse_time(doc.get("nextUpdate"), f"{name}.nextUpdate"))
    for name in ("root_ca_crl", "pck_crl"):
        crl = _load_crl(obj[name], name)
        issued.append(crl.last_update_utc)
        if crl.next_update_utc is None:
            raise CollateralError(f"collateral {name} has no nextUpdate")
        expires.append(crl.next_update_utc)
    for name in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
        for cert in _load_pem_chain(obj[name], f"collateral {name}"):
            issued.append(cert.not_valid_before_utc)
            expires.append(cert.not_valid_after_utc)
    return CollateralWindow(issued=max(issued), expires=min(expires))


class IntelCollateralSource(abc.ABC):
    """Supplies DCAP collateral (``QuoteCollateralV3`` JSON) for a quote."""

    @abc.abstractmethod
    def collateral_for(self, quote: bytes, *, now: datetime) -> str:
        """Return collateral JSON suitable for verifying ``quote`` at ``now``.

        Raises:
            CollateralError: no collateral could be obtained.
            EvidenceError: the quote does not say which collateral it needs.
        """


class LocalCollateral(IntelCollateralSource):
    """Collateral from a local JSON file (or JSON text), the same for every quote.

    Args:
        source: a ``Path``; or a ``str`` that is the JSON text itself if it
            starts with ``{`` and a file path otherwise (use :meth:`from_text`
            to pass text unambiguously).

    Raises:
        ConfigurationError: the file cannot be read.
    """

    def __init__(self, source: Path | str) -> None:
        if isinstance(source, Path) or not source.lstrip().startswith("{"):
            path = Path(source)
            try:
                if path.stat().st_size > MAX_DOCUMENT_BYTES:
                    raise ConfigurationError(f"collateral file {path} too large")
                self._text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeError) as exc:
                raise ConfigurationError(f"cannot read collateral file {path}: {exc}") from exc
        else:
            self._text = source

    @classmethod
    def from_text(cls, text: str) -> LocalCollateral:
        """Collateral from JSON text (never interpreted as a path)."""
        source = cls.__new__(cls)
        source._text = text
        return source

    def collateral_for(self, quote: bytes, *, now: datetime) -> str:
        """Return the configured collateral (``quote`` and ``now`` are not used)."""
        return self._text


def quote_collateral_key(quote: bytes) -> tuple[str, str, str]:
    """Which collateral a DCAP quote needs: ``(tee, fmspc, ca)``.

    ``tee`` is ``"sgx"`` or ``"tdx"``; ``fmspc`` is 12 upper-case hex digits
    from the PCK certificate in the quote; ``ca`` is ``"processor"`` or
    ``"platform"`` (the PCK issuer).

    Raises:
        EvidenceError: the quote is malformed or carries no PCK certificate.
    """
    import dcap_qvl  # local import: only DCAP users need the extension module

    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
        tee = "tdx" if parsed.is_tdx() else "sgx"
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca()).lower()
    except Exception as exc:  # dcap_qvl raises ValueError (and may raise others)
        raise EvidenceError(f"cannot read FMSPC / CA from quote: {exc}") from exc
    if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
        raise EvidenceError("quote FMSPC malformed")
    if ca not in ("processor", "platform"):
        raise EvidenceError(f"quote PCK issuer {ca!r} unknown")
    return tee, fmspc, ca


def _raw_json_member(text: str, key: str) -> str:
    """Return the exact source text of ``key``'s value in a top-level JSON object.

    Intel signs the bytes of ``tcbInfo`` / ``enclaveIdentity`` exactly as served,
    so the value must be cut out of the response, not re-serialized.
    """
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    i = 0
    n = len(text)
    while i < n and text[i] in ws:
        i += 1
    if i >= n or text[i] != "{":
        raise CollateralError("PCCS response is not a JSON object")
    i += 1
    while True:
        while i < n and text[i] in ws:
            i += 1
        try:
            name, i = decoder.raw_decode(text, i)
        except ValueError as exc:
            raise CollateralError("PCCS response is not valid JSON") from exc
        while i < n and text[i] in ws:
            i += 1
        if i >= n or text[i] != ":":
            raise CollateralError("PCCS response is not valid JSON")
        i += 1
        while i < n and text[i] in ws:
            i += 1
        start = i
        try:
            _, i = decoder.raw_decode(text, i)
        except ValueError as exc:
            raise CollateralError("PCCS response is not valid JSON") from exc
        if name == key:
            return text[start:i]
        while i < n and text[i] in ws:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        raise CollateralError(f"PCCS response has no {key}")


def _crl_to_hex(body: bytes, what: str) -> str:
    """Normalize a CRL served as DER, PEM or hex text to hex-encoded DER."""
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            der = x509.load_pem_x509_crl(stripped).public_bytes(serialization.Encoding.DER)
        except ValueError as exc:
            raise CollateralError(f"{what} is not a CRL") from exc
        return der.hex()
    try:
        text = stripped.decode("ascii")
        if text and all(c in "0123456789abcdefABCDEF" for c in text):
            der = bytes.fromhex(text)
        else:
            der = bytes(stripped)
    except (UnicodeDecodeError, ValueError):
        der = bytes(stripped)
    try:
        x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise CollateralError(f"{what} is not a CRL") from exc
    return der.hex()


class PccsCollateral(IntelCollateralSource):
    """Collateral fetched from a PCCS (or Intel PCS) with an on-disk cache.

    Uses the PCS API v4 endpoints (Intel SGX and TDX DCAP PCS API
    specification): ``/sgx/certification/v4/pckcrl``, ``/{sgx,tdx}/
    certification/v4/tcb``, ``/{sgx,tdx}/certification/v4/qe/identity`` and
    ``/sgx/certification/v4/rootcacrl`` (PCCS; with Intel's PCS the root CA CRL
    is fetched from the root certificate's CRL distribution point).

    Cached bundles (``<cache_dir>/<tee>-<fmspc>-<ca>.json``) are reused while
    they stay valid for at least ``refresh_margin``; if a refresh fails the
    stale bundle is returned and the verifier decides (an expired bundle is
    rejected with :class:`~sealedml.errors.CollateralError`).

    Args:
        base_url: PCCS base URL, e.g. ``https://pccs.example:8081`` (a trailing
            ``/sgx/certification/v4`` is accepted).
        cache_dir: directory for cached bundles (created if missing); ``None``
            disables caching.
        client: an ``httpx.Client`` to use (tests pass one with a mock transport).
        timeout: per-request timeout in seconds.
        refresh_margin: refresh a cached bundle this long before it expires.
    """

    def __init__(
        self,
        base_url: str,
        *,
        cache_dir: Path | None = None,
        client: httpx.Client | None = None,
        timeout: float = 30.0,
        refresh_margin: timedelta = timedelta(hours=1),
    ) -> None:
        base = base_url.strip().rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        if not base.startswith(("https://", "http://")):
            raise ConfigurationError(f"PCCS URL must be http(s): {base_url!r}")
        self._base = base
        self._cache_dir = cache_dir
        self._client = client or httpx.Client(timeout=timeout, follow_redirects=False)
        self._refresh_margin = refresh_margin

    # -- cache ---------------------------------------------------------------

    def _cache_path(self, key: tuple[str, str, str]) -> Path | None:
        if self._cache_dir is None:
            return None
        return self._cache_dir / f"{key[0]}-{key[1]}-{key[2]}.json"

    def _read_cache(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeError):
            return None

    def _write_cache(self, path: Path | None, text: str) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".collateral-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written is not fatal
            log.warning("cannot write collateral cache %s: %s", path, exc)

    # -- fetching ------------------------------------------------------------

    def _get(self, url: str) -> httpx.Response:
        try:
            response = self._client.get(url)
        except httpx.HTTPError as exc:
            raise CollateralError(f"PCCS request failed: {url}: {exc}") from exc
        if response.status_code != 200:
            raise CollateralError(f"PCCS returned HTTP {response.status_code} for {url}")
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise CollateralError(f"PCCS response too large: {url}")
        return response

    @staticmethod
    def _header(response: httpx.Response, names: Iterable[str]) -> str:
        for name in names:
            value = response.headers.get(name)
            if value:
                return urllib.parse.unquote(value)
        raise CollateralError(f"PCCS response lacks header {'/'.join(names)}")

    def _signed_document(self, url: str, member: str, headers: Iterable[str]) -> tuple[str, str, str]:
        response = self._get(url)
        chain = self._header(response, headers)
        text = response.text
        raw = _raw_json_member(text, member)
        try:
            signature = json.loads(text).get("signature")
        except (ValueError, AttributeError) as exc:
            raise CollateralError(f"PCCS {member} response is not a JSON object") from exc
        if not isinstance(signature, str):
            raise CollateralError(f"PCCS {member} response has no signature")
        try:
            bytes.fromhex(signature)
        except ValueError as exc:
            raise CollateralError(f"PCCS {member} signature is not hex") from exc
        return raw, signature.lower(), chain

    def _root_ca_crl(self, chain_pem: str) -> str:
        if "trustedservices.intel.com" not in self._base:
            try:
                response = self._get(f"{self._base}/sgx/certification/v4/rootcacrl")
                return _crl_to_hex(response.content, "root CA CRL")
            except CollateralError as exc:
                log.info("PCCS has no rootcacrl endpoint (%s); using the CRL distribution point", exc)
        certs = _load_pem_chain(chain_pem, "issuer chain")
        if not certs:
            raise CollateralError("issuer chain is empty")
        root = certs[-1]
        try:
            points = root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound as exc:
            raise CollateralError("Intel root certificate names no CRL distribution point") from exc
        for point in points:
            for name in point.full_name or ():
                if isinstance(name, x509.UniformResourceIdentifier):
                    return _crl_to_hex(self._get(name.value).content, "root CA CRL")
        raise CollateralError("Intel root certificate names no CRL URL")

    def fetch(self, quote: bytes) -> str:
        """Fetch a fresh collateral bundle for ``quote`` (no cache).

        Returns:
            The ``QuoteCollateralV3`` JSON text.

        Raises:
            CollateralError: a request failed or a response is malformed.
            EvidenceError: the quote names no FMSPC / CA.
        """
        tee, fmspc, ca = quote_collateral_key(quote)
        v4 = f"{self._base}/{{tee}}/certification/v4"
        crl_response = self._get(f"{v4.format(tee='sgx')}/pckcrl?ca={ca}&encoding=der")
        pck_crl_chain = self._header(crl_response, ("SGX-PCK-CRL-Issuer-Chain",))
        pck_crl = _crl_to_hex(crl_response.content, "PCK CRL")
        tcb_info, tcb_sig, tcb_chain = self._signed_document(
            f"{v4.format(tee=tee)}/tcb?fmspc={fmspc}",
            "tcbInfo",
            ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
        )
        qe_identity, qe_sig, qe_chain = self._signed_document(
            f"{v4.format(tee=tee)}/qe/identity?update=standard",
            "enclaveIdentity",
            ("SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"),
        )
        bundle = {
            "pck_crl_issuer_chain": pck_crl_chain,
            "root_ca_crl": self._root_ca_crl(qe_chain),
            "pck_crl": pck_crl,
            "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_sig,
            "qe_identity_issuer_chain": qe_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_sig,
        }
        return json.dumps(bundle)

    def collateral_for(self, quote: bytes, *, now: datetime) -> str:
        """Return cached collateral if still fresh, otherwise fetch (and cache) it.

        Raises:
            CollateralError: nothing cached and the PCCS could not be reached.
            EvidenceError: the quote names no FMSPC / CA.
        """
        key = quote_collateral_key(quote)
        path = self._cache_path(key)
        cached = self._read_cache(path)
        if cached is not None:
            try:
                window = collateral_window(cached)
                if window.issued <= now and now + self._refresh_margin <= window.expires:
                    return cached
            except CollateralError:
                cached = None  # a corrupt cache entry is ignored and replaced
        try:
            text = self.fetch(quote)
        except CollateralError as exc:
            if cached is not None:
                log.warning("collateral refresh failed, using cached bundle: %s", exc)
                return cached
            raise
        self._write_cache(path, text)
        return text


# ---------------------------------------------------------------------------
# AMD SEV-SNP certificate table and VCEK sources
# ---------------------------------------------------------------------------

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
