"""Ed25519 identities (:mod:`sealedml.crypto.signing`)."""

from __future__ import annotations

import base64

import pytest

from sealedml.crypto import SigningKey, verify_signature
from sealedml.crypto.signing import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from sealedml.errors import CryptoError, SignatureError

# RFC 8032 §7.1, TEST 1 (empty message) and TEST 3 (two-byte message).
RFC8032 = [
    pytest.param(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        id="rfc8032-test1",
    ),
    pytest.param(
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        id="rfc8032-test3",
    ),
]


@pytest.mark.parametrize(("seed", "public", "message", "signature"), RFC8032)
def test_ed25519_known_answer_vectors(seed: str, public: str, message: str, signature: str) -> None:
    key = SigningKey.from_bytes(bytes.fromhex(seed))
    assert key.public_bytes == bytes.fromhex(public)
    assert key.sign(bytes.fromhex(message)) == bytes.fromhex(signature)
    verify_signature(bytes.fromhex(public), bytes.fromhex(signature), bytes.fromhex(message))


def test_sign_verify_roundtrip() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"POST /v1/models\n1700000000\nnonce")
    assert len(signature) == SIGNATURE_SIZE
    assert len(key.public_bytes) == PUBLIC_KEY_SIZE
    verify_signature(key.public_bytes, signature, b"POST /v1/models\n1700000000\nnonce")


def test_private_bytes_roundtrip() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_bytes(key.private_bytes())
    assert again.public_bytes == key.public_bytes
    assert len(key.private_bytes()) == 32


def test_generated_keys_differ() -> None:
    assert SigningKey.generate().public_bytes != SigningKey.generate().public_bytes


def test_verify_rejects_signature_over_another_message() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"grant alice")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(key.public_bytes, signature, b"grant mallory")


def test_verify_rejects_signature_by_another_key() -> None:
    signature = SigningKey.generate().sign(b"grant alice")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(SigningKey.generate().public_bytes, signature, b"grant alice")


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_verify_rejects_tampered_signature(position: int) -> None:
    key = SigningKey.generate()
    signature = bytearray(key.sign(b"message"))
    signature[position] ^= 0x01
    with pytest.raises(SignatureError):
        verify_signature(key.public_bytes, bytes(signature), b"message")


@pytest.mark.parametrize(
    ("key_len", "sig_len"),
    [
        (0, 64),
        (31, 64),
        (33, 64),
        (64, 64),
        (32, 0),
        (32, 63),
        (32, 65),
        (32, 128),
    ],
)
def test_verify_rejects_malformed_lengths(key_len: int, sig_len: int) -> None:
    key = SigningKey.generate()
    public = (key.public_bytes * 2)[:key_len]
    signature = (key.sign(b"m") * 2)[:sig_len]
    with pytest.raises(SignatureError, match="malformed"):
        verify_signature(public, signature, b"m")


def test_verify_rejects_signature_with_trailing_byte() -> None:
    key = SigningKey.generate()
    with pytest.raises(SignatureError):
        verify_signature(key.public_bytes, key.sign(b"m") + b"\x00", b"m")


@pytest.mark.parametrize("public", [bytes(32), b"\xff" * 32, bytes([1]) + bytes(31)])
def test_verify_rejects_degenerate_public_keys(public: bytes) -> None:
    signature = SigningKey.generate().sign(b"m")
    with pytest.raises(SignatureError):
        verify_signature(public, signature, b"m")


def test_signature_error_is_a_crypto_error() -> None:
    assert issubclass(SignatureError, CryptoError)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_signing_key_from_bytes_rejects_wrong_size(size: int) -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        SigningKey.from_bytes(bytes(size))


def _renderings(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        # Any 8-byte window of the seed, in hex, would also be a leak.
        *(secret[i : i + 8].hex() for i in range(0, 25, 8)),
    ]


def test_signing_key_repr_does_not_contain_private_key() -> None:
    for _ in range(8):
        key = SigningKey.generate()
        seed = key.private_bytes()
        for text in (repr(key), str(key), f"{key}", f"{[key]}"):
            for rendering in _renderings(seed):
                assert rendering not in text
        assert "SigningKey" in repr(key)
