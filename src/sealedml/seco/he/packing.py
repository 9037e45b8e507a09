"""Slot layout of a matrix–vector product W·r under batched BFV, with every slot masked.

The encrypted vector r (length ``n_in``) is padded to a power-of-two ``block`` and repeated
in every block of the ciphertext's slots; row i of W is placed in block i. One
plaintext–ciphertext product leaves W_ij·r_j in slot (i, j). A ciphertext holds
``slots // block`` rows; longer matrices take several ciphertexts of the same encrypted r.

Each slot holds a product of a weight and a mask value, which whoever decrypts must not see,
so the weight holder subtracts a uniformly random mask from *every* slot
(:meth:`MatvecLayout.random_masks`). Then either

* the decryptor sums each row itself and the weight holder keeps the row sums of its mask
  as its share — no rotations at all, so rows need no power-of-two blocks and several
  layers share one ciphertext (:class:`PackedLayers`): what SECO mode does; or
* the weight holder first sums each block under encryption with log2(block) rotations
  (:attr:`MatvecLayout.rotations`), and the sums sit at slot i·block
  (:meth:`MatvecLayout.outputs`) — what SECO's code does, at the price of joint rotation keys.

Either way every decrypted slot is uniform noise to the decryptor.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from sealedml.errors import InputError

__all__ = ["MatvecLayout", "PackedLayers", "uniform_mod"]


def uniform_mod(modulus: int, n: int) -> np.ndarray:
    """``n`` uniformly random integers in [0, modulus) from the OS CSPRNG (rejection sampling)."""
    if not 1 < modulus < 1 << 62:
        raise InputError("the modulus must lie in (1, 2^62)")
    bits = modulus.bit_length()
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        need = n - len(out)
        draw = np.frombuffer(secrets.token_bytes(8 * (need + need // 2 + 8)), dtype="<u8") >> np.uint64(64 - bits)
        out = np.concatenate([out, draw[draw < modulus].astype(np.int64)])
    return out[:n]


def _slot_masks(modulus: int, ciphertexts: int, slots: int) -> list[list[int]]:
    values = uniform_mod(modulus, ciphertexts * slots).reshape(ciphertexts, slots)
    return [[int(v) for v in row] for row in values]


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class MatvecLayout:
    """Where W (``n_out`` × ``n_in``) and r go in ciphertexts of ``slots`` slots.

    ``slots`` is the ring dimension N; BFV rotations act on each half (row) of N/2 slots, so
    blocks — powers of two no longer than a half — never straddle one.

    Raises:
        InputError: (on construction) a dimension below 1, or ``n_in`` longer than half the slots.
    """

    n_in: int
    n_out: int
    slots: int

    def __post_init__(self) -> None:
        if self.n_in < 1 or self.n_out < 1:
            raise InputError("a linear layer needs at least one input and one output")
        if self.block > self.slots // 2:
            raise InputError(f"{self.n_in} inputs do not fit half of {self.slots} slots")

    @property
    def block(self) -> int:
        return _next_power_of_two(self.n_in)

    @property
    def rows_per_ciphertext(self) -> int:
        return self.slots // self.block

    @property
    def ciphertexts(self) -> int:
        return -(-self.n_out // self.rows_per_ciphertext)

    @property
    def rotations(self) -> list[int]:
        """The rotation indices whose keys the weight holders need: 1, 2, 4, …, block/2."""
        return [1 << k for k in range(self.block.bit_length() - 1)]

    def replicate(self, vector: np.ndarray) -> list[int]:
        """``vector`` (length n_in, values mod t) in every block: the plaintext to encrypt."""
        vector = np.asarray(vector, dtype=np.int64)
        if vector.shape != (self.n_in,):
            raise InputError(f"expected a vector of {self.n_in} values, got shape {vector.shape}")
        padded = np.zeros(self.block, dtype=np.int64)
        padded[: self.n_in] = vector
        return [int(v) for v in np.tile(padded, self.rows_per_ciphertext)]

    def weight_chunks(self, weights: np.ndarray) -> list[list[int]]:
        """W's rows, ``rows_per_ciphertext`` per plaintext, row i at block i."""
        weights = np.asarray(weights, dtype=np.int64)
        if weights.shape != (self.n_out, self.n_in):
            raise InputError(f"expected weights of shape {(self.n_out, self.n_in)}, got {weights.shape}")
        chunks = []
        for first in range(0, self.n_out, self.rows_per_ciphertext):
            rows = weights[first : first + self.rows_per_ciphertext]
            plane = np.zeros((self.rows_per_ciphertext, self.block), dtype=np.int64)
            plane[: len(rows), : self.n_in] = rows
            chunks.append([int(v) for v in plane.reshape(-1)])
        return chunks

    def random_masks(self, modulus: int) -> list[list[int]]:
        """One uniformly random value mod ``modulus`` for every slot of every ciphertext."""
        return _slot_masks(modulus, self.ciphertexts, self.slots)

    def outputs(self, per_ciphertext: list[list[int]]) -> np.ndarray:
        """The n_out values at the output slots (slot i·block of each ciphertext), in row order."""
        if len(per_ciphertext) != self.ciphertexts:
            raise InputError(f"expected {self.ciphertexts} slot vectors, got {len(per_ciphertext)}")
        picked = [values[j * self.block] for values in per_ciphertext for j in range(self.rows_per_ciphertext)]
        return np.array(picked[: self.n_out], dtype=np.int64)


@dataclass(frozen=True)
class PackedLayers:
    """Several layers' slot-wise products W ⊙ r side by side, in as few ciphertexts as possible.

    With rows summed after decryption nothing is rotated, so a row needs no power-of-two
    block: row i of layer k takes ``n_in`` consecutive slots, holding W_ij·r_j, and rows are
    laid one after another (a row never straddles two ciphertexts). Every layer of a small
    model then fits one ciphertext: one encryption per party, one product per weight holder
    and one decryption for the whole query.

    Raises:
        InputError: (on construction) no layers, an empty layer, or a row longer than ``slots``.
    """

    shapes: tuple[tuple[int, int], ...]  # (n_out, n_in) per layer
    slots: int

    def __post_init__(self) -> None:
        if not self.shapes or any(n_out < 1 or n_in < 1 for n_out, n_in in self.shapes):
            raise InputError("pack at least one layer with at least one input and one output")
        if max(n_in for _, n_in in self.shapes) > self.slots:
            raise InputError(f"a row of more than {self.slots} inputs does not fit a ciphertext")

    @property
    def placement(self) -> list[list[tuple[int, int]]]:
        """Per layer, per row: (ciphertext, first slot)."""
        where, ciphertext, offset = [], 0, 0
        for n_out, n_in in self.shapes:
            rows = []
            for _ in range(n_out):
                if offset + n_in > self.slots:
                    ciphertext, offset = ciphertext + 1, 0
                rows.append((ciphertext, offset))
                offset += n_in
            where.append(rows)
        return where

    @property
    def ciphertexts(self) -> int:
        return max(ct for rows in self.placement for ct, _ in rows) + 1

    def _planes(self, rows_of: list[np.ndarray]) -> list[list[int]]:
        """Lay ``rows_of[k][i]`` (length n_in of layer k) at its place; zeros elsewhere."""
        planes = np.zeros((self.ciphertexts, self.slots), dtype=np.int64)
        for (n_out, n_in), rows, values in zip(self.shapes, self.placement, rows_of, strict=True):
            values = np.asarray(values, dtype=np.int64)
            if values.shape != (n_out, n_in):
                raise InputError(f"expected an array of shape {(n_out, n_in)}, got {values.shape}")
            for (ct, start), row in zip(rows, values, strict=True):
                planes[ct, start : start + n_in] = row
        return [[int(v) for v in plane] for plane in planes]

    def replicate(self, vectors: list[np.ndarray]) -> list[list[int]]:
        """Each layer's mask vector r_k under every one of its rows: the plaintexts to encrypt."""
        tiled = []
        for (n_out, n_in), vector in zip(self.shapes, vectors, strict=True):
            vector = np.asarray(vector, dtype=np.int64)
            if vector.shape != (n_in,):
                raise InputError(f"expected a vector of {n_in} values, got shape {vector.shape}")
            tiled.append(np.tile(vector, (n_out, 1)))
        return self._planes(tiled)

    def weight_planes(self, weights: list[np.ndarray]) -> list[list[int]]:
        """Every layer's W, row by row, at its place."""
        return self._planes(list(weights))

    def random_masks(self, modulus: int) -> list[list[int]]:
        """One uniformly random value mod ``modulus`` for every slot of every ciphertext."""
        return _slot_masks(modulus, self.ciphertexts, self.slots)

    def row_sums(self, per_ciphertext: list[list[int]], modulus: int) -> list[np.ndarray]:
        """Per layer, Σ_j of each row's slots mod ``modulus``."""
        values = np.asarray(per_ciphertext, dtype=np.int64)
        if values.shape != (self.ciphertexts, self.slots):
            raise InputError(f"expected {self.ciphertexts} slot vectors of {self.slots}, got shape {values.shape}")
        return [
            np.array([int(values[ct, start : start + n_in].sum()) % modulus for ct, start in rows], dtype=np.int64)
            for (_, n_in), rows in zip(self.shapes, self.placement, strict=True)
        ]
