"""AMD's pinned SEV-SNP roots: the ARK, ASK and ASVK of each product line.

AMD's key distribution service (*Versioned Chip Endorsement Key (VCEK)
Certificate and KDS Interface Specification*, AMD publication 57230) certifies
endorsement keys through one chain per product (Milan, Genoa, Turin): the
self-signed ARK (AMD root key) signs the ASK, which signs chip-unique VCEKs,
and the ASVK, which signs the Versioned Loaded Endorsement Keys (VLEKs) that
cloud providers load instead. Every link is RSASSA-PSS with SHA-384,
MGF1-SHA-384 and a 48-byte salt.

The ASK, ARK and ASVK ship in ``sealedml/attestation/roots/ask_ark_asvk_<product>.pem``
and are checked at load against the ARK's SPKI fingerprint below, the ARK
self-signed and the ASK and ASVK signed by the ARK (:func:`load_pinned_roots`).
Other bundles can be pinned instead (:meth:`ProductRoots.from_pem`); they are
checked the same way but not against the fingerprints.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sealedml.attestation.collateral import load_certificate
from sealedml.errors import CollateralError, ConfigurationError

__all__ = [
    "PINNED_ARK_SPKI_SHA256",
    "PRODUCTS",
    "ProductRoots",
    "common_name",
    "load_pinned_roots",
    "pss_signed_by",
    "roots_bundle_product",
]

#: Products whose roots are pinned, in the order they are tried.
PRODUCTS: tuple[str, ...] = ("Milan", "Genoa", "Turin")

#: SHA-256 of the DER SubjectPublicKeyInfo of each product's ARK (AMD root key).
PINNED_ARK_SPKI_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
        "Genoa": "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
        "Turin": "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
    }
)

# AMD KDS certificates: RSASSA-PSS, SHA-384, MGF1-SHA-384, salt length 48.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def common_name(name: x509.Name) -> str:
    """The first common name (CN) of ``name``, or ``""`` if it has none.

    Args:
        name: a certificate's subject or issuer (untrusted: odd attribute lengths are tolerated).

    Returns:
        The common name.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # odd attribute lengths in untrusted certs
        values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def pss_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s RSA key signed ``cert`` with AMD's RSASSA-PSS parameters.

    Args:
        cert: the certificate whose signature is checked.
        issuer: the certificate whose key must have signed it (its subject must be ``cert``'s issuer).

    Returns:
        Whether the signature verifies; ``False`` for a non-RSA issuer key or another issuer name.
    """
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or cert.issuer != issuer.subject:
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class ProductRoots:
    """The pinned ASK, ARK and (optionally) ASVK of one AMD product line.

    Attributes:
        product: ``"Milan"``, ``"Genoa"`` or ``"Turin"``.
        ask: the AMD SEV signing key certificate, ``SEV-<product>`` (signs VCEKs).
        ark: the AMD root key certificate, ``ARK-<product>`` (self-signed).
        asvk: the AMD SEV VLEK signing key certificate, ``SEV-VLEK-<product>``
            (signs VLEKs), or ``None`` if not pinned.
    """

    product: str
    ask: x509.Certificate
    ark: x509.Certificate
    asvk: x509.Certificate | None = None

    @classmethod
    def from_pem(cls, product: str, pem: bytes, *, fingerprint: str | None = None) -> ProductRoots:
        """Load and check a roots bundle: ASK, then ARK, then optionally ASVK.

        This is the order of ``ask_ark_asvk_<product>.pem`` (AMD KDS
        ``cert_chain`` followed by the ASVK); an ``ask_ark_<product>.pem`` of
        ASK and ARK only pins no ASVK.

        Args:
            product: the product the bundle is for.
            pem: the two or three certificates.
            fingerprint: if given, the ARK's SPKI SHA-256 must equal it.

        Returns:
            The roots.

        Raises:
            ConfigurationError: not two or three certificates, names not of
                ``product``, ARK not self-signed, ASK or ASVK not signed by the
                ARK (RSASSA-PSS, SHA-384, salt 48), or fingerprint mismatch.
        """
        try:
            certs = [load_certificate(block) for block in _pem_blocks(pem)]
        except CollateralError as exc:
            raise ConfigurationError(f"{product} roots: {exc.message}") from exc
        if len(certs) not in (2, 3):
            raise ConfigurationError(f"{product} roots: expected ASK, ARK and optionally ASVK certificates")
        ask, ark = certs[0], certs[1]
        asvk = certs[2] if len(certs) == 3 else None
        if common_name(ark.subject) != f"ARK-{product}":
            raise ConfigurationError(f"{product} roots: ARK is {common_name(ark.subject)!r}")
        if common_name(ask.subject) != f"SEV-{product}":
            raise ConfigurationError(f"{product} roots: ASK is {common_name(ask.subject)!r}")
        if asvk is not None and common_name(asvk.subject) != f"SEV-VLEK-{product}":
            raise ConfigurationError(f"{product} roots: ASVK is {common_name(asvk.subject)!r}")
        if fingerprint is not None and _spki_sha256(ark) != fingerprint:
            raise ConfigurationError(f"{product} roots: ARK key does not match the pinned key")
        if not pss_signed_by(ark, ark):
            raise ConfigurationError(f"{product} roots: ARK is not self-signed")
        if not pss_signed_by(ask, ark):
            raise ConfigurationError(f"{product} roots: ASK is not signed by the ARK")
        if asvk is not None and not pss_signed_by(asvk, ark):
            raise ConfigurationError(f"{product} roots: ASVK is not signed by the ARK")
        return cls(product=product, ask=ask, ark=ark, asvk=asvk)


def roots_bundle_product(pem: bytes) -> str:
    """The product of an AMD roots bundle, read from its ARK's name ``ARK-<product>``.

    Used to pin bundles whose product is not given separately (``sealedml
    attest verify --amd-roots FILE``). The bundle itself is checked by
    :meth:`ProductRoots.from_pem` when a verifier pins it.

    Args:
        pem: a bundle of ASK, ARK and optionally ASVK (PEM).

    Returns:
        One of :data:`PRODUCTS`.

    Raises:
        ConfigurationError: unreadable certificates, no single ``ARK-<product>``
            certificate, or a product other than Milan, Genoa and Turin.
    """
    try:
        certs = [load_certificate(block) for block in _pem_blocks(pem)]
    except CollateralError as exc:
        raise ConfigurationError(f"AMD roots: {exc.message}") from exc
    arks = {common_name(cert.subject) for cert in certs if common_name(cert.subject).startswith("ARK-")}
    if len(arks) != 1:
        raise ConfigurationError("AMD roots: expected one ARK certificate named ARK-<product>")
    product = arks.pop().removeprefix("ARK-")
    if product not in PRODUCTS:
        raise ConfigurationError(f"AMD roots: unknown product {product!r}; expected one of {', '.join(PRODUCTS)}")
    return product


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks: list[bytes] = []
    for part in pem.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in part:
            blocks.append(part[part.index(b"-----BEGIN") :] + marker + b"\n")
    return blocks


_PINNED_LOCK = threading.Lock()
_PINNED: dict[str, ProductRoots] = {}


def load_pinned_roots() -> Mapping[str, ProductRoots]:
    """The AMD roots shipped with the package, checked against their pinned fingerprints.

    Each product's ``roots/ask_ark_asvk_<product>.pem`` holds its ASK, ARK and
    ASVK, as AMD's key distribution service serves them.

    Returns:
        ``{product: ProductRoots}`` for Milan, Genoa and Turin, each with its ASVK.

    Raises:
        ConfigurationError: a root file is missing, lacks the ASVK or does not
            match its pin.
    """
    with _PINNED_LOCK:
        if not _PINNED:
            package = importlib.resources.files("sealedml.attestation") / "roots"
            loaded: dict[str, ProductRoots] = {}  # all or nothing: a failure leaves none pinned
            for product in PRODUCTS:
                try:
                    pem = (package / f"ask_ark_asvk_{product.lower()}.pem").read_bytes()
                except OSError as exc:
                    raise ConfigurationError(f"AMD {product} roots missing: {exc}") from exc
                roots = ProductRoots.from_pem(product, pem, fingerprint=PINNED_ARK_SPKI_SHA256[product])
                if roots.asvk is None:
                    raise ConfigurationError(f"AMD {product} roots lack the ASVK")
                loaded[product] = roots
            _PINNED.update(loaded)
        return MappingProxyType(dict(_PINNED))
