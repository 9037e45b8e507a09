"""The only module of :mod:`sealedml.seco.gc` that touches AES, SHA-256 or Ed25519.

* :class:`FixedKeyHash` — the tweakable hash ``H(x, t) = π(K) ⊕ K`` with
  ``K = σ(x) ⊕ t`` and ``π`` AES-128 under a fixed, public key: the
  Matyas–Meyer–Oseas construction with a linear orthomorphism ``σ``
  (Bellare–Hoang–Keelveedhi–Rogaway 2013, "Efficient garbling from a
  fixed-key blockcipher"; ``σ`` as in Guo–Katz–Wang–Yu 2020). One AES-ECB call
  hashes a whole numpy batch, which is what makes garbling thousands of ReLU
  copies at once cheap.
* :func:`prg` — AES-128-CTR keystream, the IKNP column generator.
* Ed25519 prime-order-subgroup arithmetic for the base OT, through libsodium's
  low-level bindings (PyNaCl), with every peer point checked.

Labels and hash blocks are ``(n, 2)`` arrays of little-endian ``uint64``: word 0
holds bytes 0-7 of the 16-byte block, word 1 bytes 8-15.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import nacl.bindings as sodium
import nacl.exceptions
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sealedml.seco.gc.errors import InvalidPointError

__all__ = [
    "GARBLE_HASH_KEY",
    "LABEL_BYTES",
    "LABEL_DTYPE",
    "OT_HASH_KEY",
    "POINT_BYTES",
    "Blocks",
    "FixedKeyHash",
    "RandomBytes",
    "blocks_from_bytes",
    "check_point",
    "point_add",
    "point_base_mul",
    "point_mul",
    "point_sub",
    "prg",
    "random_blocks",
    "random_scalar",
    "sigma",
    "transcript_hash",
]

LABEL_BYTES = 16
POINT_BYTES = 32
LABEL_DTYPE = np.dtype("<u8")

Blocks = npt.NDArray[np.uint64]
"""``(n, 2)`` little-endian ``uint64``: a batch of 128-bit blocks (labels, hash inputs/outputs)."""

RandomBytes = Callable[[int], bytes]
"""Where secret randomness comes from: ``os.urandom`` in production, a seeded stream only in KATs."""

# Public, fixed AES keys, one per use so a garbling hash never equals an OT hash:
# SHA-256(b"sealedml/seco/gc/garble-hash/v1")[:16] and SHA-256(b"sealedml/seco/gc/ot-hash/v1")[:16].
# Changing either changes every garbled table and OT pad: bump the label and the pinned KATs.
GARBLE_HASH_KEY = bytes.fromhex("b53abb3d1d08273e529d5f67fbf338b5")
OT_HASH_KEY = bytes.fromhex("18ff7efd3ef34343f1dd27c95c36270e")


def sigma(x: Blocks) -> Blocks:
    """The linear orthomorphism ``σ(lo, hi) = (hi, lo ⊕ hi)`` on 64-bit halves.

    Both ``σ`` and ``x ↦ σ(x) ⊕ x`` are invertible, the property the fixed-key
    hash needs to be (circular) correlation robust in the ideal-permutation model.
    """
    out = np.empty_like(x)
    out[:, 0] = x[:, 1]
    out[:, 1] = x[:, 0] ^ x[:, 1]
    return out


class FixedKeyHash:
    """``H(x, t) = π(K) ⊕ K`` with ``K = σ(x) ⊕ t``, ``π`` = AES-128 under a fixed public key.

    Not thread-safe (it keeps one AES context); make one per garbling or
    evaluation. Tweaks must never repeat for the same ``Δ``: callers encode the
    gate and the copy in them.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != LABEL_BYTES:
            raise ValueError("the fixed hash key must be 16 bytes")
        # ECB on purpose: π is a single fixed-key permutation applied block by block,
        # never used to encrypt data with this key.
        self._aes = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305

    def permute(self, blocks: Blocks) -> Blocks:
        """``π`` applied to every block of a batch."""
        data = np.ascontiguousarray(blocks, dtype=LABEL_DTYPE).tobytes()
        return np.frombuffer(self._aes.update(data), dtype=LABEL_DTYPE).reshape(-1, 2)

    def __call__(self, x: Blocks, tweak: Blocks) -> Blocks:
        """Hash every row of ``x`` under the matching row of ``tweak`` (shapes ``(n, 2)``)."""
        k = sigma(x) ^ tweak
        return self.permute(k) ^ k


def blocks_from_bytes(data: bytes) -> Blocks:
    """A writable ``(len(data) // 16, 2)`` block array from raw bytes (length a multiple of 16)."""
    return np.frombuffer(data, dtype=LABEL_DTYPE).reshape(-1, 2).copy()


def random_blocks(n: int, random_bytes: RandomBytes) -> Blocks:
    """``n`` uniformly random 128-bit blocks."""
    return blocks_from_bytes(random_bytes(LABEL_BYTES * n))


def prg(seed: bytes, nonce: int, n_bytes: int) -> bytes:
    """AES-128-CTR keystream of ``n_bytes`` under ``seed``; ``nonce`` separates uses of one seed.

    The initial counter block is ``nonce ‖ 0`` (two big-endian 64-bit halves), so the
    streams of different nonces never overlap below 2^64 blocks.
    """
    counter = struct.pack(">QQ", nonce, 0)
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor().update(bytes(n_bytes))


def transcript_hash(domain: bytes, *parts: bytes) -> bytes:
    """SHA-256 over a domain label and length-prefixed parts (no two part lists collide)."""
    h = hashlib.sha256()
    for part in (domain, *parts):
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return h.digest()


# --- Ed25519 prime-order subgroup (libsodium) -------------------------------------------


def check_point(point: bytes) -> None:
    """Accept only canonical encodings of non-identity points of the prime-order subgroup.

    Raises:
        InvalidPointError: wrong length, non-canonical, identity, small order or
            outside the subgroup (libsodium's ``crypto_core_ed25519_is_valid_point``).
    """
    if len(point) != POINT_BYTES or not sodium.crypto_core_ed25519_is_valid_point(point):
        raise InvalidPointError("not a valid point of the Ed25519 prime-order subgroup")


def random_scalar(random_bytes: RandomBytes) -> bytes:
    """A uniform non-zero scalar mod ℓ (64 random bytes reduced, so the bias is ~2^-260)."""
    while True:
        scalar = bytes(sodium.crypto_core_ed25519_scalar_reduce(random_bytes(64)))
        if any(scalar):
            return scalar


def point_base_mul(scalar: bytes) -> bytes:
    """``scalar · G`` for the subgroup generator ``G``."""
    return bytes(sodium.crypto_scalarmult_ed25519_base_noclamp(scalar))


def point_mul(scalar: bytes, point: bytes) -> bytes:
    """``scalar · point``; libsodium refuses small-order inputs and an identity result.

    Raises:
        InvalidPointError: the point or the product is not usable.
    """
    try:
        return bytes(sodium.crypto_scalarmult_ed25519_noclamp(scalar, point))
    except (nacl.exceptions.RuntimeError, nacl.exceptions.TypeError) as exc:
        raise InvalidPointError("scalar multiplication refused the point") from exc


def point_add(p: bytes, q: bytes) -> bytes:
    """``p + q`` (both already checked)."""
    return bytes(sodium.crypto_core_ed25519_add(p, q))


def point_sub(p: bytes, q: bytes) -> bytes:
    """``p − q`` (both already checked)."""
    return bytes(sodium.crypto_core_ed25519_sub(p, q))
