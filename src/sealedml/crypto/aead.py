"""AES-256-GCM with derived nonces.

Nonces are never fixed (a published SeSeMI weakness was an all-zero GCM nonce):
callers either use a fresh key per message with a random nonce, or a random
96-bit base nonce XOR-ed with a chunk counter (TLS 1.3 style, RFC 8446 §5.3)
under a key used for one object only.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealedml.errors import CryptoError

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "aead_decrypt",
    "aead_decrypt_into",
    "aead_encrypt",
    "aead_encrypt_parts",
    "derive_nonce",
]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


def _check(key: bytes, nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise CryptoError("nonce must be 12 bytes")
    if len(key) != KEY_SIZE:
        raise CryptoError("AES-256-GCM needs a 32-byte key")


def _cipher(key: bytes, nonce: bytes) -> AESGCM:
    _check(key, nonce)
    return AESGCM(key)


def derive_nonce(base_nonce: bytes, index: int) -> bytes:
    """The nonce of chunk ``index``: ``base_nonce XOR big-endian(index)``.

    Raises:
        CryptoError: wrong base size or an index that does not fit 64 bits.
    """
    if len(base_nonce) != NONCE_SIZE:
        raise CryptoError("base nonce must be 12 bytes")
    if not 0 <= index < 2**64:
        raise CryptoError("chunk index out of range")
    counter = index.to_bytes(NONCE_SIZE, "big")
    return bytes(a ^ b for a, b in zip(base_nonce, counter, strict=True))


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate; returns ciphertext ‖ 16-byte tag."""
    return _cipher(key, nonce).encrypt(nonce, plaintext, aad)


def aead_encrypt_parts(
    key: bytes, nonce: bytes, parts: Sequence[bytes | memoryview], aad: bytes, out: memoryview
) -> None:
    """Encrypt the concatenation of ``parts`` into ``out`` as ciphertext ‖ 16-byte tag.

    The same bytes as :func:`aead_encrypt` of the joined parts, without joining them: each
    part (e.g. a tensor's own memory) is encrypted where it lies, straight into the
    caller's buffer (AES-GCM is a stream mode: OpenSSL's incremental interface).

    Raises:
        CryptoError: a wrong key or nonce size, or ``out`` not exactly the parts' length plus the tag.
    """
    _check(key, nonce)
    target = memoryview(out).cast("B")
    size = sum(memoryview(p).nbytes for p in parts)
    if target.nbytes != size + TAG_SIZE:
        raise CryptoError("output buffer must be the plaintext length plus the tag")
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    written = 0
    for part in parts:
        # update_into wants room for one block more than it writes: the tag's place gives it.
        written += encryptor.update_into(memoryview(part).cast("B"), target[written:])
    encryptor.finalize()
    target[written:] = encryptor.tag


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Authenticate and decrypt.

    Raises:
        CryptoError: the ciphertext, nonce, AAD or key is wrong (no detail, by design).
    """
    cipher = _cipher(key, nonce)
    try:
        return cipher.decrypt(nonce, ciphertext, aad)
    except InvalidTag as exc:
        raise CryptoError("authentication failed") from exc


def aead_decrypt_into(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes, out: memoryview) -> int:
    """Authenticate and decrypt ``ciphertext`` (ciphertext ‖ 16-byte tag) straight into ``out``.

    No intermediate plaintext object: the caller's buffer (e.g. a slice of a NumPy
    weight array) receives the plaintext. ``cryptography``'s ``decrypt_into`` writes
    the plaintext *before* the tag check completes, so on failure ``out`` is zeroed
    here: no unauthenticated plaintext is left behind.

    Args:
        key: the 32-byte key.
        nonce: the 12-byte nonce.
        ciphertext: ciphertext followed by its tag (any bytes-like object).
        aad: associated data.
        out: a writable buffer of exactly ``len(ciphertext) - TAG_SIZE`` bytes.

    Returns:
        The number of plaintext bytes written.

    Raises:
        CryptoError: a wrong nonce or buffer size, or the ciphertext, nonce, AAD or key is
            wrong (no detail, by design).
    """
    cipher = _cipher(key, nonce)
    target = memoryview(out)
    size = memoryview(ciphertext).nbytes - TAG_SIZE
    if size < 0 or target.nbytes != size:
        raise CryptoError("output buffer must be the ciphertext length minus the tag")
    try:
        written: int = cipher.decrypt_into(nonce, ciphertext, aad, target)
    except InvalidTag as exc:
        target.cast("B")[:] = bytes(size)
        raise CryptoError("authentication failed") from exc
    return written
