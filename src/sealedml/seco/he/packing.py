"""Slot layout of a matrix–vector product W·r under batched BFV, with every slot masked.

The encrypted vector r (length ``n_in``) is padded to a power-of-two ``block`` and repeated
in every block of the ciphertext's slots; row i of W is placed in block i. One
plaintext–ciphertext product and log2(block) rotate-and-add steps leave row i's dot product
with r in slot i·block. A ciphertext holds ``slots // block`` rows; longer matrices take
several ciphertexts of the same encrypted r.

The other slots then hold partial sums of weights times r. Whoever decrypts must see none
of them, so the weight holder subtracts a uniformly random mask from *every* slot
(:meth:`MatvecLayout.random_masks`), keeps the mask's values at the output slots as its
share of W·r, and the decryptor gets uniform noise everywhere else.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from sealedml.errors import InputError

__all__ = ["MatvecLayout"]


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
        return [[secrets.randbelow(modulus) for _ in range(self.slots)] for _ in range(self.ciphertexts)]

    def outputs(self, per_ciphertext: list[list[int]]) -> np.ndarray:
        """The n_out values at the output slots (slot i·block of each ciphertext), in row order."""
        if len(per_ciphertext) != self.ciphertexts:
            raise InputError(f"expected {self.ciphertexts} slot vectors, got {len(per_ciphertext)}")
        picked = [values[j * self.block] for values in per_ciphertext for j in range(self.rows_per_ciphertext)]
        return np.array(picked[: self.n_out], dtype=np.int64)
