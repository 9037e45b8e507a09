"""Arithmetic in the prime field of blinded offload, and the bounds that keep it exact.

Every outsourced product is computed over Z_p with p = 2^31 − 1 (a Mersenne prime).
The executor receives field elements in their centred form (−p/2, p/2] as float64
and multiplies them by small integer weights; float64 is exact below 2^53, so a
layer whose heaviest output row sums to L1 (in absolute quantized weight) is
computed exactly when L1 · (p − 1)/2 < 2^53. :func:`check_layer_bounds` proves
that, and that the true product W·x fits (−p/2, p/2) so it decodes uniquely.

Masks are drawn uniformly from Z_p by rejection from 31 random bits of
``os.urandom`` (a CSPRNG), so a masked value x + r mod p is uniform and
independent of x: what the executor sees carries no information about x.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "F64_EXACT",
    "PRIME",
    "centered",
    "check_layer_bounds",
    "random_field",
    "reduce",
]

#: The field's modulus: 2^31 − 1. Field elements and masks fit uint32 in storage.
PRIME = 2**31 - 1
#: float64 represents every integer below this exactly.
F64_EXACT = 2**53
_HALF = PRIME // 2


def reduce(values: np.ndarray) -> np.ndarray:
    """``values mod p`` in [0, p), as int64, for any int64 values with |values| < 2^62.

    p is a Mersenne prime, so 2^31 ≡ 1 (mod p): folding the high bits onto the low ones
    twice reduces without a division (numpy's ``mod`` on int64 is several times slower).
    """
    v = values.astype(np.int64, copy=True)
    for _ in range(2):
        high = v >> 31  # floor division by 2^31, also for negative values
        v &= PRIME
        v += high
    # now -2 ≤ v ≤ 2^31 + 1
    v -= (v >= PRIME) * PRIME  # arithmetic on booleans: no fancy indexing, several times faster
    v += (v < 0) * PRIME
    return v


def centered(values: np.ndarray) -> np.ndarray:
    """The representative of ``values mod p`` in (−p/2, p/2], as int64 (|values| < 2^62)."""
    out = reduce(values)
    out -= (out > _HALF) * PRIME
    return out


def random_field(shape: tuple[int, ...]) -> np.ndarray:
    """Independent uniform elements of Z_p (int64 in [0, p)), from the operating system's CSPRNG."""
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        need = count - filled
        draw = np.frombuffer(os.urandom(4 * need), dtype="<u4").astype(np.int64) & 0x7FFFFFFF
        draw = draw[draw < PRIME]  # rejects only 2^31 − 1 itself: exactly uniform
        out[filled : filled + draw.size] = draw
        filled += draw.size
    return out.reshape(shape)


def check_layer_bounds(l1_max: int, input_max: int) -> str | None:
    """Why a layer cannot be offloaded exactly, or None when it can.

    Args:
        l1_max: the largest sum of absolute quantized weights feeding one output.
        input_max: the largest absolute quantized input.
    """
    if l1_max * input_max >= _HALF:
        return (
            f"its products reach {l1_max * input_max} ≥ (p−1)/2 = {_HALF}: they would not decode uniquely "
            "(use fewer --weight-bits or --input-bits)"
        )
    if l1_max * _HALF >= F64_EXACT:
        return f"its masked products reach {l1_max * _HALF} ≥ 2^53: float64 would round them (use fewer --weight-bits)"
    return None
