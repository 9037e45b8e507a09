"""The slot layout of W·r: pure arithmetic, checked against numpy without any HE."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml.errors import InputError
from sealedml.seco.he.packing import MatvecLayout, PackedLayers

P = 2061584302081


def _rotate_sum(plane: np.ndarray, block: int, half: int) -> np.ndarray:
    """What the engine does: rotate-and-add within each half of the slots, in exact integers."""
    out = plane.astype(object)
    shift = 1
    while shift < block:
        rows = out.reshape(2, half)
        out = (rows + np.roll(rows, -shift, axis=1)).reshape(-1)
        shift <<= 1
    return out


@pytest.mark.parametrize(("n_in", "n_out", "slots"), [(64, 32, 16384), (100, 200, 16384), (1, 1, 16), (8, 5, 16)])
def test_the_layout_computes_w_times_r(n_in: int, n_out: int, slots: int) -> None:
    rng = np.random.default_rng(n_in)
    layout = MatvecLayout(n_in, n_out, slots)
    w = rng.integers(0, P, (n_out, n_in))
    r = rng.integers(0, P, n_in)
    replicated = np.array(layout.replicate(r), dtype=object)
    per_ct = [
        list(_rotate_sum(np.array(chunk, dtype=object) * replicated, layout.block, slots // 2) % P)
        for chunk in layout.weight_chunks(w)
    ]
    expected = [sum(int(a) * int(b) for a, b in zip(row, r, strict=True)) % P for row in w]
    assert [int(v) for v in layout.outputs(per_ct)] == expected
    assert layout.ciphertexts == -(-n_out // (slots // layout.block))
    assert layout.rotations == [1 << k for k in range(int(np.log2(layout.block)))]


def test_blocks_never_straddle_a_rotation_row() -> None:
    layout = MatvecLayout(100, 300, 16384)
    assert layout.block == 128 and (16384 // 2) % layout.block == 0
    assert layout.ciphertexts == 3


def test_masks_cover_every_slot_with_values_below_the_modulus() -> None:
    masks = MatvecLayout(10, 3, 64).random_masks(P)
    assert [len(m) for m in masks] == [64]
    assert all(0 <= v < P for v in masks[0]) and len(set(masks[0])) > 60


@pytest.mark.parametrize(
    ("n_in", "n_out", "slots", "message"),
    [(0, 3, 64, "at least one"), (3, 0, 64, "at least one"), (33, 1, 64, "do not fit")],
)
def test_impossible_layouts_are_refused(n_in: int, n_out: int, slots: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        MatvecLayout(n_in, n_out, slots)


def test_shapes_are_checked() -> None:
    layout = MatvecLayout(4, 2, 16)
    with pytest.raises(InputError, match="vector of 4"):
        layout.replicate(np.zeros(5))
    with pytest.raises(InputError, match="weights of shape"):
        layout.weight_chunks(np.zeros((3, 4)))
    with pytest.raises(InputError, match="expected 1 slot vectors"):
        layout.outputs([[0] * 16, [0] * 16])


def test_packed_layers_compute_every_layers_w_times_r() -> None:
    rng = np.random.default_rng(7)
    shapes = ((32, 64), (10, 32), (300, 50))
    packing = PackedLayers(shapes, 4096)
    weights = [rng.integers(0, P, shape) for shape in shapes]
    vectors = [rng.integers(0, P, shape[1]) for shape in shapes]
    products = [
        [(int(w) * int(r)) % P for w, r in zip(wp, rp, strict=True)]
        for wp, rp in zip(packing.weight_planes(weights), packing.replicate(vectors), strict=True)
    ]
    sums = packing.row_sums(products, P)
    for w, r, got in zip(weights, vectors, sums, strict=True):
        assert [int(v) for v in got] == [sum(int(a) * int(b) for a, b in zip(row, r, strict=True)) % P for row in w]
    assert packing.ciphertexts == 5  # 2048 + 320 + 34 rows of 50 in the first, then 81 rows per ciphertext
    assert all(
        start + n_in <= 4096 for (_, n_in), rows in zip(shapes, packing.placement, strict=True) for _, start in rows
    )


def test_packed_layers_refuse_what_does_not_fit() -> None:
    with pytest.raises(InputError, match="at least one"):
        PackedLayers((), 16)
    with pytest.raises(InputError, match="does not fit"):
        PackedLayers(((1, 17),), 16)
    packing = PackedLayers(((2, 3),), 16)
    with pytest.raises(InputError, match="shape"):
        packing.weight_planes([np.zeros((3, 3))])
    with pytest.raises(InputError, match="vector of 3"):
        packing.replicate([np.zeros(4)])
