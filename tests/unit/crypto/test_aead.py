"""AES-256-GCM recipes (:mod:`sealedml.crypto.aead`) and randomness."""

from __future__ import annotations

import pytest

from sealedml.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    aead_decrypt,
    aead_encrypt,
    derive_nonce,
    random_bytes,
)
from sealedml.crypto.aead import aead_encrypt_parts
from sealedml.errors import CryptoError

KEY = bytes(range(32))
NONCE = bytes(range(100, 112))

# -- known-answer vectors ------------------------------------------------------
# McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 13,
# 14 and 16 (AES-256). Each: key, nonce, plaintext, aad, ciphertext, tag (hex).
GCM_VECTORS = [
    pytest.param("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b", id="tc13-empty"),
    pytest.param(
        "00" * 32,
        "00" * 12,
        "00" * 16,
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
        id="tc14-one-block",
    ),
    pytest.param(
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        "cafebabefacedbaddecaf888",
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
        id="tc16-aad",
    ),
]


@pytest.mark.parametrize(("key", "nonce", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_aead_known_answer_vectors(key: str, nonce: str, pt: str, aad: str, ct: str, tag: str) -> None:
    k, n, a = bytes.fromhex(key), bytes.fromhex(nonce), bytes.fromhex(aad)
    sealed = aead_encrypt(k, n, bytes.fromhex(pt), a)
    # Layout is ciphertext ‖ tag (the tag is last, 16 bytes).
    assert sealed == bytes.fromhex(ct + tag)
    assert aead_decrypt(k, n, sealed, a) == bytes.fromhex(pt)


@pytest.mark.parametrize("plaintext", [b"", b"x", b"hello world" * 1000])
@pytest.mark.parametrize("aad", [b"", b"header-digest"])
def test_aead_roundtrip(plaintext: bytes, aad: bytes) -> None:
    sealed = aead_encrypt(KEY, NONCE, plaintext, aad)
    assert len(sealed) == len(plaintext) + TAG_SIZE
    if plaintext:
        assert plaintext not in sealed
    assert aead_decrypt(KEY, NONCE, sealed, aad) == plaintext


def _sealed() -> bytes:
    return aead_encrypt(KEY, NONCE, b"model weights", b"aad")


def test_aead_decrypt_with_wrong_key_raises_crypto_error() -> None:
    wrong = bytes([KEY[0] ^ 1]) + KEY[1:]
    with pytest.raises(CryptoError, match="authentication failed"):
        aead_decrypt(wrong, NONCE, _sealed(), b"aad")


def test_aead_decrypt_with_wrong_nonce_raises_crypto_error() -> None:
    with pytest.raises(CryptoError, match="authentication failed"):
        aead_decrypt(KEY, derive_nonce(NONCE, 1), _sealed(), b"aad")


@pytest.mark.parametrize("aad", [b"", b"aaD", b"aad\x00", b"aa"])
def test_aead_decrypt_with_wrong_aad_raises_crypto_error(aad: bytes) -> None:
    with pytest.raises(CryptoError, match="authentication failed"):
        aead_decrypt(KEY, NONCE, _sealed(), aad)


@pytest.mark.parametrize("position", [0, 5, -TAG_SIZE - 1, -TAG_SIZE, -1])
def test_aead_decrypt_of_tampered_ciphertext_raises_crypto_error(position: int) -> None:
    sealed = bytearray(_sealed())
    sealed[position] ^= 0x01
    with pytest.raises(CryptoError, match="authentication failed"):
        aead_decrypt(KEY, NONCE, bytes(sealed), b"aad")


@pytest.mark.parametrize("keep", [0, 1, TAG_SIZE - 1, TAG_SIZE, -1])
def test_aead_decrypt_of_truncated_ciphertext_raises_crypto_error(keep: int) -> None:
    with pytest.raises(CryptoError):
        aead_decrypt(KEY, NONCE, _sealed()[:keep], b"aad")


def test_aead_decrypt_of_extended_ciphertext_raises_crypto_error() -> None:
    with pytest.raises(CryptoError):
        aead_decrypt(KEY, NONCE, _sealed() + b"\x00", b"aad")


# AESGCM itself accepts 16- and 24-byte keys: the recipe must insist on AES-256.
@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_aead_rejects_key_that_is_not_256_bits(size: int) -> None:
    key = bytes(size)
    with pytest.raises(CryptoError, match="32-byte key"):
        aead_encrypt(key, NONCE, b"x", b"")
    with pytest.raises(CryptoError, match="32-byte key"):
        aead_decrypt(key, NONCE, bytes(17), b"")


# AESGCM itself accepts 8..128-byte nonces: the recipe must insist on 96 bits.
@pytest.mark.parametrize("size", [0, 8, 11, 13, 16])
def test_aead_rejects_nonce_that_is_not_96_bits(size: int) -> None:
    with pytest.raises(CryptoError, match="nonce must be 12 bytes"):
        aead_encrypt(KEY, bytes(size), b"x", b"")
    with pytest.raises(CryptoError, match="nonce must be 12 bytes"):
        aead_decrypt(KEY, bytes(size), bytes(17), b"")


def test_aead_constants() -> None:
    assert (KEY_SIZE, NONCE_SIZE, TAG_SIZE) == (32, 12, 16)


# -- derive_nonce ----------------------------------------------------------------


def test_derive_nonce_is_distinct_for_indices_0_to_1000() -> None:
    base = random_bytes(NONCE_SIZE)
    nonces = [derive_nonce(base, i) for i in range(1001)]
    assert len(set(nonces)) == 1001
    assert all(len(n) == NONCE_SIZE for n in nonces)


@pytest.mark.parametrize("index", [0, 1, 2, 255, 256, 1000, 2**32, 2**64 - 1])
def test_derive_nonce_is_base_xor_big_endian_index(index: int) -> None:
    base = bytes.fromhex("a5" * NONCE_SIZE)
    nonce = derive_nonce(base, index)
    unmasked = bytes(a ^ b for a, b in zip(nonce, base, strict=True))
    assert unmasked == index.to_bytes(NONCE_SIZE, "big")
    assert derive_nonce(bytes(NONCE_SIZE), index) == index.to_bytes(NONCE_SIZE, "big")


def test_derive_nonce_index_zero_is_the_base_nonce() -> None:
    base = random_bytes(NONCE_SIZE)
    assert derive_nonce(base, 0) == base


def test_derive_nonce_known_answer() -> None:
    base = bytes.fromhex("000102030405060708090a0b")
    assert derive_nonce(base, 0x0102).hex() == "000102030405060708090b09"


@pytest.mark.parametrize("index", [-1, 2**64, 2**96])
def test_derive_nonce_rejects_index_out_of_range(index: int) -> None:
    with pytest.raises(CryptoError, match="out of range"):
        derive_nonce(bytes(NONCE_SIZE), index)


@pytest.mark.parametrize("size", [0, 8, 11, 13, 16])
def test_derive_nonce_rejects_base_of_wrong_size(size: int) -> None:
    with pytest.raises(CryptoError, match="base nonce must be 12 bytes"):
        derive_nonce(bytes(size), 0)


def test_chunk_sealed_under_one_index_does_not_open_under_another() -> None:
    base = random_bytes(NONCE_SIZE)
    sealed = aead_encrypt(KEY, derive_nonce(base, 7), b"chunk seven", b"")
    assert aead_decrypt(KEY, derive_nonce(base, 7), sealed, b"") == b"chunk seven"
    with pytest.raises(CryptoError):
        aead_decrypt(KEY, derive_nonce(base, 8), sealed, b"")


def test_random_bytes_are_fresh() -> None:
    draws = {random_bytes(16) for _ in range(64)}
    assert len(draws) == 64
    assert all(len(d) == 16 for d in draws)


@pytest.mark.parametrize(("key", "nonce", "pt", "aad", "ct", "tag"), GCM_VECTORS)
@pytest.mark.parametrize("cut", [0, 1, 7, 16, 33])
def test_aead_encrypt_parts_known_answer_vectors(
    key: str, nonce: str, pt: str, aad: str, ct: str, tag: str, cut: int
) -> None:
    """Encrypting the plaintext in pieces into one buffer gives the vector's ciphertext ‖ tag."""
    plaintext = bytes.fromhex(pt)
    parts = [plaintext[:cut], memoryview(plaintext[cut:]), b""]
    out = bytearray(len(plaintext) + TAG_SIZE)
    aead_encrypt_parts(bytes.fromhex(key), bytes.fromhex(nonce), parts, bytes.fromhex(aad), memoryview(out))
    assert bytes(out) == bytes.fromhex(ct + tag)


def test_aead_encrypt_parts_refuses_a_wrong_buffer_key_or_nonce() -> None:
    with pytest.raises(CryptoError, match="output buffer"):
        aead_encrypt_parts(KEY, NONCE, [b"abc"], b"", memoryview(bytearray(3)))  # no room for the tag
    with pytest.raises(CryptoError, match="output buffer"):
        aead_encrypt_parts(KEY, NONCE, [b"abc"], b"", memoryview(bytearray(3 + TAG_SIZE + 1)))
    with pytest.raises(CryptoError, match="nonce"):
        aead_encrypt_parts(KEY, NONCE[:8], [b"abc"], b"", memoryview(bytearray(3 + TAG_SIZE)))
    with pytest.raises(CryptoError, match="32-byte key"):
        aead_encrypt_parts(KEY[:16], NONCE, [b"abc"], b"", memoryview(bytearray(3 + TAG_SIZE)))
