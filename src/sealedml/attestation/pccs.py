"""Intel DCAP collateral fetched from a PCCS (or Intel's PCS), with an on-disk cache.

The bundle is assembled in the ``QuoteCollateralV3`` format that
:mod:`sealedml.attestation.collateral` describes and the DCAP verifier reads.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealedml.attestation.collateral import (
    MAX_DOCUMENT_BYTES,
    IntelCollateralSource,
    collateral_window,
    load_pem_chain,
    quote_collateral_key,
)
from sealedml.errors import CollateralError, ConfigurationError

__all__ = ["PccsCollateral"]

log = logging.getLogger(__name__)


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
        certs = load_pem_chain(chain_pem, "issuer chain")
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
