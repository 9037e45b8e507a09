"""HPKE key transport (:mod:`sealedml.crypto.hpke`), both KEMs."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, MLKEM768X25519PrivateKey, Suite

from sealedml.crypto import HpkeKem, HpkePrivateKey, HpkePublicKey, hpke_open, hpke_seal
from sealedml.crypto import hpke as hpke_module
from sealedml.errors import CryptoError

KEMS = [pytest.param(HpkeKem.X25519, id="x25519"), pytest.param(HpkeKem.MLKEM768_X25519, id="mlkem768x25519")]
INFO = b"sealedml/test/release:challenge-1"

# RFC 7748 §6.1: Alice's X25519 key pair.
RFC7748_ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")

X25519_PUBLIC_LEN = 32
MLKEM768_PUBLIC_LEN = 1184


@pytest.fixture(scope="module")
def keys() -> dict[HpkeKem, HpkePrivateKey]:
    return {kem: HpkePrivateKey(kem) for kem in HpkeKem}


@pytest.mark.parametrize("kem", KEMS)
@pytest.mark.parametrize("plaintext", [b"", b"a 32-byte model key............."[:32], bytes(range(256)) * 64])
def test_hpke_roundtrip(keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem, plaintext: bytes) -> None:
    recipient = keys[kem]
    ciphertext = hpke_seal(recipient.public_key, plaintext, INFO)
    assert hpke_open(recipient, ciphertext, INFO) == plaintext
    assert recipient.open(ciphertext, INFO) == plaintext
    if plaintext:
        assert plaintext not in ciphertext


@pytest.mark.parametrize("kem", KEMS)
def test_hpke_seal_is_randomized(keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem) -> None:
    public = keys[kem].public_key
    assert hpke_seal(public, b"same", INFO) != hpke_seal(public, b"same", INFO)


@pytest.mark.parametrize("kem", KEMS)
@pytest.mark.parametrize("info", [b"", b"sealedml/test/release:challenge-2", INFO + b"\x00"])
def test_hpke_open_with_wrong_info_raises_crypto_error(
    keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem, info: bytes
) -> None:
    ciphertext = hpke_seal(keys[kem].public_key, b"secret", INFO)
    with pytest.raises(CryptoError, match="HPKE decryption failed"):
        hpke_open(keys[kem], ciphertext, info)


@pytest.mark.parametrize("kem", KEMS)
def test_hpke_open_by_wrong_recipient_raises_crypto_error(keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem) -> None:
    ciphertext = hpke_seal(keys[kem].public_key, b"secret", INFO)
    with pytest.raises(CryptoError, match="HPKE decryption failed"):
        HpkePrivateKey(kem).open(ciphertext, INFO)


@pytest.mark.parametrize(
    ("sealed_for", "opened_by"),
    [
        (HpkeKem.X25519, HpkeKem.MLKEM768_X25519),
        (HpkeKem.MLKEM768_X25519, HpkeKem.X25519),
    ],
)
def test_hpke_open_with_other_kem_raises_crypto_error(
    keys: dict[HpkeKem, HpkePrivateKey], sealed_for: HpkeKem, opened_by: HpkeKem
) -> None:
    ciphertext = hpke_seal(keys[sealed_for].public_key, b"secret", INFO)
    with pytest.raises(CryptoError):
        keys[opened_by].open(ciphertext, INFO)


@pytest.mark.parametrize("kem", KEMS)
def test_hpke_open_of_truncated_ciphertext_raises_crypto_error(
    keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem
) -> None:
    ciphertext = hpke_seal(keys[kem].public_key, b"secret", INFO)
    enc_len = 32 if kem is HpkeKem.X25519 else 1088 + 32
    for keep in (0, 1, enc_len - 1, enc_len, enc_len + 1, len(ciphertext) - 1):
        with pytest.raises(CryptoError):
            keys[kem].open(ciphertext[:keep], INFO)


@pytest.mark.parametrize("kem", KEMS)
def test_hpke_open_of_tampered_ciphertext_raises_crypto_error(
    keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem
) -> None:
    ciphertext = hpke_seal(keys[kem].public_key, b"secret", INFO)
    for position in (0, len(ciphertext) // 2, len(ciphertext) - 1):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 0x80
        with pytest.raises(CryptoError):
            keys[kem].open(bytes(tampered), INFO)


# -- public key encoding (kem id ‖ key bytes) --------------------------------------


@pytest.mark.parametrize(
    ("kem", "prefix", "length"),
    [
        (HpkeKem.X25519, b"\x00\x20", 2 + X25519_PUBLIC_LEN),
        (HpkeKem.MLKEM768_X25519, b"\x64\x7a", 2 + MLKEM768_PUBLIC_LEN + X25519_PUBLIC_LEN),
    ],
)
def test_hpke_public_key_encoding_is_kem_id_then_key_bytes(
    keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem, prefix: bytes, length: int
) -> None:
    encoded = keys[kem].public_key.to_bytes()
    assert encoded[:2] == prefix
    assert len(encoded) == length
    parsed = HpkePublicKey.from_bytes(encoded)
    assert parsed.kem is kem
    assert parsed == keys[kem].public_key
    assert hash(parsed) == hash(keys[kem].public_key)
    assert parsed.to_bytes() == encoded


def test_hpke_public_key_known_answer_rfc7748() -> None:
    """The wire form of RFC 7748's Alice key is ``0020 ‖ 8520f009…``, and it works for sealing."""
    encoded = bytes.fromhex("0020" + RFC7748_ALICE_PUBLIC.hex())
    public = HpkePublicKey.from_bytes(encoded)
    assert public.kem is HpkeKem.X25519
    assert public.to_bytes() == encoded
    # Interoperability with plain RFC 9180 (pyca/cryptography's Suite): seal
    # with SealedML, open with the library and Alice's private key.
    alice = x25519.X25519PrivateKey.from_private_bytes(RFC7748_ALICE_PRIVATE)
    assert alice.public_key().public_bytes_raw() == RFC7748_ALICE_PUBLIC
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    assert suite.decrypt(hpke_seal(public, b"key", INFO), alice, info=INFO) == b"key"


def test_hpke_hybrid_public_key_is_mlkem_then_x25519() -> None:
    """The hybrid encoding is ML-KEM-768 public key ‖ X25519 public key, as the library expects."""
    mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(range(64)))
    xk = x25519.X25519PrivateKey.from_private_bytes(RFC7748_ALICE_PRIVATE)
    encoded = b"\x64\x7a" + mk.public_key().public_bytes_raw() + RFC7748_ALICE_PUBLIC
    public = HpkePublicKey.from_bytes(encoded)
    assert public.kem is HpkeKem.MLKEM768_X25519
    suite = Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    ciphertext = hpke_seal(public, b"key", INFO)
    assert suite.decrypt(ciphertext, MLKEM768X25519PrivateKey(mk, xk), info=INFO) == b"key"


@pytest.mark.parametrize("kem", KEMS)
def test_hpke_open_accepts_ciphertext_from_plain_rfc9180_sender(
    keys: dict[HpkeKem, HpkePrivateKey], kem: HpkeKem
) -> None:
    suite_kem = KEM.X25519 if kem is HpkeKem.X25519 else KEM.MLKEM768_X25519
    suite = Suite(suite_kem, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    ciphertext = suite.encrypt(b"from a peer", keys[kem].public_key._key, info=INFO)
    assert keys[kem].open(ciphertext, INFO) == b"from a peer"


MALFORMED_PUBLIC_KEYS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="one-byte"),
    pytest.param(b"\x00\x20", id="x25519-id-only"),
    pytest.param(b"\x00\x20" + bytes(31), id="x25519-short"),
    pytest.param(b"\x00\x20" + bytes(33), id="x25519-long"),
    pytest.param(b"\x64\x7a" + bytes(32), id="hybrid-with-x25519-length"),
    pytest.param(b"\x64\x7a" + bytes(MLKEM768_PUBLIC_LEN + 31), id="hybrid-short"),
    pytest.param(b"\x64\x7a" + bytes(MLKEM768_PUBLIC_LEN + 33), id="hybrid-long"),
    # Every ML-KEM coefficient decodes to 4095 ≥ q = 3329: not a valid encapsulation key.
    pytest.param(b"\x64\x7a" + b"\xff" * (MLKEM768_PUBLIC_LEN + 32), id="hybrid-invalid-mlkem-encoding"),
]


@pytest.mark.parametrize("data", MALFORMED_PUBLIC_KEYS)
def test_hpke_public_key_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(CryptoError):
        HpkePublicKey.from_bytes(data)


@pytest.mark.parametrize("kem_id", [0x0000, 0x0010, 0x0011, 0x0021, 0x0041, 0x647B, 0xFFFF])
def test_hpke_public_key_rejects_unknown_kem_id(kem_id: int) -> None:
    with pytest.raises(CryptoError, match="unknown HPKE KEM"):
        HpkePublicKey.from_bytes(kem_id.to_bytes(2, "big") + bytes(32))


def test_hpke_seal_to_low_order_public_key_raises_crypto_error() -> None:
    with pytest.raises(CryptoError):
        public = HpkePublicKey.from_bytes(b"\x00\x20" + bytes(32))
        hpke_seal(public, b"model key", INFO)


# -- secrets stay out of reprs ---------------------------------------------------


def _renderings(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret),
    ]


@pytest.mark.parametrize("kem", KEMS)
def test_hpke_private_key_repr_does_not_contain_private_key(monkeypatch: pytest.MonkeyPatch, kem: HpkeKem) -> None:
    x_seed = bytes(range(1, 33))
    m_seed = bytes(range(64, 128))
    monkeypatch.setattr(
        hpke_module.x25519.X25519PrivateKey,
        "generate",
        staticmethod(lambda: x25519.X25519PrivateKey.from_private_bytes(x_seed)),
    )
    monkeypatch.setattr(
        hpke_module.mlkem.MLKEM768PrivateKey,
        "generate",
        staticmethod(lambda: mlkem.MLKEM768PrivateKey.from_seed_bytes(m_seed)),
    )
    key = HpkePrivateKey(kem)
    # The patched generators were really used (the public key is the expected one).
    x_public = x25519.X25519PrivateKey.from_private_bytes(x_seed).public_key().public_bytes_raw()
    assert key.public_key.to_bytes().endswith(x_public)
    secrets = [x_seed, x_seed[:8], m_seed, m_seed[:8]]
    if kem is HpkeKem.MLKEM768_X25519:
        secrets.append(mlkem.MLKEM768PrivateKey.from_seed_bytes(m_seed).private_bytes_raw()[:16])
    for text in (repr(key), str(key), f"{key!r:>200}"):
        for secret in secrets:
            for rendering in _renderings(secret):
                assert rendering not in text
    assert "HpkePrivateKey" in repr(key)


def test_keys_from_the_same_seed_are_the_same_and_open_each_others_ciphertexts() -> None:
    from sealedml.crypto import HpkeKem, HpkePrivateKey, hpke_seal

    seed = bytes(range(96))
    one, two = HpkePrivateKey.from_seed(seed), HpkePrivateKey.from_seed(seed)
    assert one.public_key.to_bytes() == two.public_key.to_bytes() and one.kem is HpkeKem.MLKEM768_X25519
    assert two.open(hpke_seal(one.public_key, b"share", b"info"), b"info") == b"share"
    other = HpkePrivateKey.from_seed(bytes(96))
    assert other.public_key.to_bytes() != one.public_key.to_bytes()
    classic = HpkePrivateKey.from_seed(seed[-32:], HpkeKem.X25519)
    assert classic.open(hpke_seal(classic.public_key, b"x", b"i"), b"i") == b"x"


def test_a_hybrid_seed_of_the_wrong_length_is_refused() -> None:
    from sealedml.crypto import HpkePrivateKey
    from sealedml.errors import CryptoError

    with pytest.raises(CryptoError, match="96 bytes"):
        HpkePrivateKey.from_seed(bytes(32))
