"""Freivalds checks of outsourced products, and the sanity checks before them.

For a layer with quantized weight W (output channels c) the TEE draws a secret
s ∈ Z_p^M and precomputes w_s = Σ_c s_c·W_c mod p (one output channel per
convolution group, or the vector W·s for a matrix). For an input x_q and a
claimed product z, it checks Σ_c s_c·z_c ≡ w_s · x_q (mod p) at every output
position. A correct z always passes; for a z that differs from W·x_q in any
element mod p, the check passes with probability at most 1/p ≈ 4.7·10⁻¹⁰
(Schwartz–Zippel: a nonzero linear form in s vanishes on at most a 1/p share of
Z_p^M). The check costs one output channel per group instead of M.

All arithmetic is exact: products of residues are taken in int64 (< 2^62) and
reduced; the convolution with w_s runs in float64 on its two 16-bit halves.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sealedml.partition.blind.field import F64_EXACT, random_field, reduce
from sealedml.partition.blind.linear import LinearLayer, apply_linear
from sealedml.partition.graph import PartitionError

__all__ = ["Freivalds", "valid_product"]

_LOW_BITS = 16


def _fan_in(layer: LinearLayer) -> int:
    w = layer.weight
    return int(np.prod(w.shape[1:])) if layer.op == "conv" else int(w.shape[0])


class Freivalds:
    """One layer's secret check vector and its precomputed reduction of the weights.

    Raises:
        PartitionError: a layer too wide for the exact float64 check.
    """

    def __init__(self, layer: LinearLayer) -> None:
        if _fan_in(layer) * layer.input_max * 2**_LOW_BITS >= F64_EXACT:
            raise PartitionError(f"layer {layer.index} is too wide for an exact check")
        self.layer = layer
        self.secret = random_field((layer.out_channels,))
        w = reduce(layer.weight)
        if layer.op == "conv":
            m = w.shape[0]
            g = layer.group
            grouped = w.reshape(g, m // g, *w.shape[1:])
            s = self.secret.reshape(g, m // g, *([1] * (w.ndim - 1)))
            folded = reduce(reduce(grouped * s).sum(axis=1))  # [g, c/g, kh, kw]
        else:
            folded = reduce(reduce(w * self.secret[None, :]).sum(axis=1))  # [k]
        self._high = dataclasses.replace(layer, weight=(folded >> _LOW_BITS).astype(np.float64))
        self._low = dataclasses.replace(layer, weight=(folded & (2**_LOW_BITS - 1)).astype(np.float64))

    def _folded_product(self, x_q: np.ndarray) -> np.ndarray:
        high = reduce(np.rint(apply_linear(self._high, x_q, self._high.weight)).astype(np.int64))
        low = np.rint(apply_linear(self._low, x_q, self._low.weight)).astype(np.int64)
        both = reduce(high * 2**_LOW_BITS + low)
        if self.layer.op == "conv":
            both = reduce(both.sum(axis=1))  # the groups' partial sums
        result: np.ndarray = both
        return result

    def check(self, x_q: np.ndarray, product: np.ndarray) -> bool:
        """Whether ``product`` (int64, any representatives) passes as ``W · x_q`` mod p."""
        axis = self.layer.channel_axis
        shape = [1] * product.ndim
        shape[axis] = -1
        claimed = reduce(reduce(reduce(product) * self.secret.reshape(shape)).sum(axis=axis))
        return bool(np.array_equal(claimed, self._folded_product(x_q)))


def valid_product(values: np.ndarray, shape: tuple[int, ...], bound: int) -> bool:
    """Whether an executor's answer can be an honest product: the shape, finite integers, |value| ≤ ``bound``."""
    if values.shape != shape or values.dtype != np.float64:
        return False
    return bool(np.all(np.isfinite(values)) and np.all(values == np.rint(values)) and np.all(np.abs(values) <= bound))
