"""How RA-TLS certificates carry evidence: the X.509 extensions and their DER.

Evidence encodings (all as non-critical X.509 extensions):

- ``1.2.840.113741.1337.6`` — an Intel SGX/TDX quote, the raw quote bytes as
  the extension value (what Gramine emits, and what
  :func:`~sealedml.attestation.ratls.make_ratls_certificate` emits for Intel
  quotes). A value that is itself one DER OCTET STRING wrapping the quote (an
  older variant) is accepted too (:func:`unwrap_octet_string`).
- ``2.23.133.5.4.9`` — TCG DICE tagged evidence (TCG DICE Attestation
  Architecture): ``TaggedEvidence ::= SEQUENCE { type OBJECT IDENTIFIER |
  INTEGER, value OCTET STRING }`` (or a SEQUENCE OF them). Known types:
  OID ``1.2.840.113741.1337.6`` and tag ``0x1a7501`` (Intel TEE quote), tag
  ``0x1a7504`` (SEV-SNP report; the tag numbers of the RATS-TLS project), and
  :data:`SEALEDML_EVIDENCE_OID`, whose value is SealedML's own envelope
  ``SEQUENCE { tee UTF8String, data OCTET STRING, aux OCTET STRING }`` — used
  for evidence that has no standard tag (simulated evidence, SEV-SNP with its
  certificate table).

The DER handled here is the small subset these structures need; every length
and tag is checked and every failure is an :class:`~sealedml.errors.EvidenceError`.
"""

from __future__ import annotations

from cryptography import x509

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.dcap import parse_quote_layout
from sealedml.errors import EvidenceError

__all__ = [
    "DICE_TAGGED_EVIDENCE_OID",
    "INTEL_QUOTE_OID",
    "SEALEDML_EVIDENCE_OID",
    "decode_tagged_evidence",
    "encode_tagged_evidence",
    "intel_quote_evidence",
    "unwrap_octet_string",
]

#: Intel's RA-TLS quote extension (Gramine, Intel SGX RA-TLS white paper).
INTEL_QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
#: TCG DICE ``tcg-dice-TaggedEvidence`` extension.
DICE_TAGGED_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
#: SealedML's evidence envelope type, a UUID-based OID (ITU-T X.667, arc 2.25).
SEALEDML_EVIDENCE_OID = x509.ObjectIdentifier("2.25.109655821611794003088819032462751165417")

_TAG_INTEL_QUOTE = 0x1A7501  # RATS-TLS "OCBR_TAG_EVIDENCE_INTEL_TEE_QUOTE"
_TAG_SEV_SNP = 0x1A7504  # RATS-TLS "OCBR_TAG_EVIDENCE_SEV_SNP"

# ---------------------------------------------------------------------------
# Minimal DER (ITU-T X.690): definite lengths, single-byte tags
# ---------------------------------------------------------------------------

_SEQUENCE = 0x30
_INTEGER = 0x02
_OCTET_STRING = 0x04
_OID = 0x06
_UTF8STRING = 0x0C


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def _read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """Read one TLV at ``pos``; return ``(tag, value_start, value_end)``."""
    if pos + 2 > len(data):
        raise EvidenceError("DER: truncated header")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise EvidenceError("DER: multi-byte tags are not supported")
    first = data[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise EvidenceError("DER: indefinite length not allowed")
    else:
        count = first & 0x7F
        if count > 4 or start + count > len(data):
            raise EvidenceError("DER: bad length")
        length = int.from_bytes(data[start : start + count], "big")
        if length < 0x80 or data[start] == 0:
            raise EvidenceError("DER: non-minimal length")
        start += count
    end = start + length
    if end > len(data):
        raise EvidenceError("DER: value runs past the end")
    return tag, start, end


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    items = []
    pos = start
    while pos < end:
        tag, vstart, vend = _read_tlv(data[:end], pos)
        items.append((tag, vstart, vend))
        pos = vend
    return items


def _encode_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(_OID, bytes(body))


def _decode_oid(body: bytes) -> str:
    if not body or len(body) > 64:
        raise EvidenceError("DER: bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    fresh = True
    for byte in body:
        if fresh and byte == 0x80:
            raise EvidenceError("DER: non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    if not fresh:
        raise EvidenceError("DER: truncated OBJECT IDENTIFIER")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _decode_int(body: bytes) -> int:
    if not body or len(body) > 8:
        raise EvidenceError("DER: bad INTEGER")
    if len(body) > 1 and ((body[0] == 0 and not body[1] & 0x80) or (body[0] == 0xFF and body[1] & 0x80)):
        raise EvidenceError("DER: non-minimal INTEGER")
    return int.from_bytes(body, "big", signed=True)


# ---------------------------------------------------------------------------
# Tagged evidence
# ---------------------------------------------------------------------------


def intel_quote_evidence(quote: bytes) -> Evidence:
    """Evidence for an Intel SGX / TDX quote, its TEE type read from the quote's header.

    Args:
        quote: the raw quote.

    Returns:
        ``Evidence(SGX or TDX, quote)``.

    Raises:
        EvidenceError: the quote's layout is malformed.
    """
    layout = parse_quote_layout(quote)
    return Evidence(layout.tee, bytes(quote))


def encode_tagged_evidence(evidence: Evidence) -> bytes:
    """DER ``TaggedEvidence`` for ``evidence`` (the value of the DICE extension).

    SGX / TDX quotes are tagged with :data:`INTEL_QUOTE_OID`; everything else
    uses :data:`SEALEDML_EVIDENCE_OID` with SealedML's envelope (TEE type,
    data, auxiliary data).

    Args:
        evidence: the evidence to encode.

    Returns:
        The DER bytes.
    """
    if evidence.tee in (TeeType.SGX, TeeType.TDX) and not evidence.aux:
        body = _encode_oid(INTEL_QUOTE_OID) + _tlv(_OCTET_STRING, bytes(evidence.data))
    else:
        envelope = _tlv(
            _SEQUENCE,
            _tlv(_UTF8STRING, evidence.tee.value.encode())
            + _tlv(_OCTET_STRING, bytes(evidence.data))
            + _tlv(_OCTET_STRING, bytes(evidence.aux)),
        )
        body = _encode_oid(SEALEDML_EVIDENCE_OID) + _tlv(_OCTET_STRING, envelope)
    return _tlv(_SEQUENCE, body)


def _decode_envelope(value: bytes) -> Evidence:
    tag, start, end = _read_tlv(value, 0)
    if tag != _SEQUENCE or end != len(value):
        raise EvidenceError("SealedML evidence envelope is not one SEQUENCE")
    items = _items(value, start, end)
    if len(items) != 3 or [t for t, _, _ in items] != [_UTF8STRING, _OCTET_STRING, _OCTET_STRING]:
        raise EvidenceError("SealedML evidence envelope malformed")
    (_, ts, te), (_, ds, de), (_, xs, xe) = items
    try:
        tee = TeeType(value[ts:te].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EvidenceError("SealedML evidence envelope names an unknown TEE") from exc
    return Evidence(tee, value[ds:de], value[xs:xe])


def _decode_entry(data: bytes, start: int, end: int) -> Evidence | None:
    items = _items(data, start, end)
    if len(items) != 2 or items[1][0] != _OCTET_STRING:
        raise EvidenceError("TaggedEvidence entry malformed")
    (kind_tag, ks, ke), (_, vs, ve) = items
    value = data[vs:ve]
    if kind_tag == _OID:
        kind = _decode_oid(data[ks:ke])
        if kind == INTEL_QUOTE_OID.dotted_string:
            return intel_quote_evidence(value)
        if kind == SEALEDML_EVIDENCE_OID.dotted_string:
            return _decode_envelope(value)
        return None
    if kind_tag == _INTEGER:
        number = _decode_int(data[ks:ke])
        if number == _TAG_INTEL_QUOTE:
            return intel_quote_evidence(value)
        if number == _TAG_SEV_SNP:
            return Evidence(TeeType.SEV_SNP, value)
        return None
    raise EvidenceError("TaggedEvidence type is neither an OID nor an INTEGER")


def decode_tagged_evidence(value: bytes) -> Evidence:
    """Decode the value of a TCG DICE tagged-evidence extension.

    Args:
        value: DER ``TaggedEvidence`` or ``SEQUENCE OF TaggedEvidence``.

    Returns:
        The first entry of a known type.

    Raises:
        EvidenceError: malformed DER or no entry of a known type.
    """
    data = bytes(value)
    tag, start, end = _read_tlv(data, 0)
    if tag != _SEQUENCE or end != len(data):
        raise EvidenceError("TaggedEvidence is not one DER SEQUENCE")
    items = _items(data, start, end)
    if items and all(t == _SEQUENCE for t, _, _ in items):
        entries = [(s, e) for _, s, e in items]  # SEQUENCE OF TaggedEvidence
    else:
        entries = [(start, end)]
    for entry_start, entry_end in entries:
        evidence = _decode_entry(data, entry_start, entry_end)
        if evidence is not None:
            return evidence
    raise EvidenceError("TaggedEvidence carries no evidence of a known type")


def unwrap_octet_string(value: bytes) -> bytes:
    """Return the content if ``value`` is exactly one DER OCTET STRING, else ``value``.

    The quote extension holds the raw quote; an older variant wraps it in an
    OCTET STRING, which is accepted too.
    """
    try:
        tag, start, end = _read_tlv(value, 0)
    except EvidenceError:
        return value
    if tag == _OCTET_STRING and end == len(value) and end > start:
        return value[start:end]
    return value
