"""SECO's ``relu_3``: exact results on random shares and edge values, and MPyC as an oracle.

The circuit must return ``(ReLU(y) + r'_A + r'_B) mod p`` exactly for every
split of ``y`` into three shares — around 0, around the sign boundary
``±(p − 1)/2`` and at ``p − 1``, with shares and masks at their extremes. The
end-to-end run goes through every message as bytes (garbled tables, B's labels,
two IKNP links, A's forwarded labels). MPyC's secure fixed-point type
(honest-majority secret sharing, here in one process) computes the same ReLU on
the same fixed-point reals, independently of all of this code.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealedml.seco.gc.errors import GcInputError
from sealedml.seco.gc.relu import (
    FRACTIONAL_BITS,
    MODULUS,
    WORD_BITS,
    decode_fixed,
    encode_fixed,
    relu3_circuit,
    run_relu3,
)

P = MODULUS
HALF = (P - 1) // 2
EDGE_Y = [0, 1, 2, HALF - 1, HALF, HALF + 1, HALF + 2, P - 2, P - 1, 1 << 37, 256, P - 256]


def reference(y: list[int], r_a: list[int], r_b: list[int]) -> list[int]:
    return [((v if v <= HALF else 0) + a + b) % P for v, a, b in zip(y, r_a, r_b, strict=True)]


def split(y: list[int], rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    y_a = [rng.randrange(P) for _ in y]
    y_b = [rng.randrange(P) for _ in y]
    y_c = [(v - a - b) % P for v, a, b in zip(y, y_a, y_b, strict=True)]
    return y_a, y_b, y_c


def test_and_count_is_pinned() -> None:
    """The decision record quotes this number; a builder change that moves it must update both."""
    circuit = relu3_circuit()
    assert circuit.and_count == 572
    assert [p.name for p in circuit.inputs] == ["y_B", "r_B", "y_A", "r_A", "y_C"]
    assert circuit.n_inputs == 5 * 41


def test_plain_circuit_on_edge_shares_and_masks() -> None:
    """Shares and masks at 0 and p − 1 exercise every carry and both reductions."""
    extremes = [0, 1, P - 1]
    rows = [
        (y_a, y_b, y_c, r_a, r_b)
        for y_a in extremes
        for y_b in extremes
        for y_c in extremes
        for r_a in (0, P - 1)
        for r_b in (0, P - 1)
    ]
    cols = list(zip(*rows, strict=True))
    got = relu3_circuit().evaluate(dict(zip(["y_A", "y_B", "y_C", "r_A", "r_B"], cols, strict=True)))["out"]
    y = [(a + b + c) % P for a, b, c in zip(cols[0], cols[1], cols[2], strict=True)]
    assert got.tolist() == reference(y, list(cols[3]), list(cols[4]))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(0, P - 1), st.integers(HALF - 300, HALF + 300), st.integers(0, 300)),
        min_size=1,
        max_size=16,
    ),
    st.randoms(use_true_random=False),
)
def test_plain_circuit_on_random_splits(y: list[int], rng: random.Random) -> None:
    y_a, y_b, y_c = split(y, rng)
    r_a, r_b = [rng.randrange(P) for _ in y], [rng.randrange(P) for _ in y]
    got = relu3_circuit().evaluate({"y_A": y_a, "y_B": y_b, "y_C": y_c, "r_A": r_a, "r_B": r_b})["out"]
    assert got.tolist() == reference(y, r_a, r_b)


def test_garbled_relu_on_random_shares_and_edge_values() -> None:
    rng = random.Random(15)
    y = EDGE_Y + [rng.randrange(P) for _ in range(100)] + [HALF + d for d in range(-20, 20)]
    y_a, y_b, y_c = split(y, rng)
    r_a = [0, P - 1] + [rng.randrange(P) for _ in y[2:]]
    r_b = [P - 1, P - 1] + [rng.randrange(P) for _ in y[2:]]
    result = run_relu3(y_a, y_b, y_c, r_a, r_b)
    assert result.values.tolist() == reference(y, r_a, r_b)
    assert result.and_gates == 572


def test_traffic_accounts_for_every_message() -> None:
    n = 4
    zeros = [0] * n
    result = run_relu3(zeros, zeros, zeros, zeros, zeros)
    t = result.traffic
    assert t["B→C tables"] == n * (572 * 32 + 41 * 16) + (41 * n + 7) // 8
    assert t["B→C labels"] == t["A→C labels"] == 82 * n * 16
    assert t["A→B OT"] == 32 + 8 + 128 * ((82 * n + 7) // 8)
    assert t["B→A OT"] == 128 * 32 + 82 * n * 32
    assert t["C→B OT"] == 32 + 8 + 128 * ((41 * n + 7) // 8)


def test_run_rejects_out_of_range_or_mismatched_shares() -> None:
    ok = [1, 2]
    with pytest.raises(GcInputError):
        run_relu3([P, 0], ok, ok, ok, ok)
    with pytest.raises(GcInputError):
        run_relu3(ok, ok, [-1, 0], ok, ok)
    with pytest.raises(GcInputError):
        run_relu3(ok, ok, ok, ok, [1, 2, 3])
    with pytest.raises(GcInputError):
        run_relu3([], [], [], [], [])


def test_fixed_point_encoding_round_trips_and_checks_range() -> None:
    values = np.array([-3.5, 0.0, 1 / 256, 2.25, -HALF / 256, HALF / 256])
    encoded = encode_fixed(values)
    assert encoded[0] == P - int(3.5 * 256)
    assert np.array_equal(decode_fixed(encoded), values)
    with pytest.raises(GcInputError):
        encode_fixed([(HALF + 1) / 256])


# --- MPyC oracle ---------------------------------------------------------------------------


def mpyc_relu(values: list[float]) -> list[float]:
    """ReLU of each real in MPyC's secure fixed point (f = 8, as SECO), opened at the end."""
    mpyc_runtime = pytest.importorskip("mpyc.runtime")
    mpc = mpyc_runtime.mpc
    secfxp = mpc.SecFxp(l=48, f=FRACTIONAL_BITS)

    async def main() -> list[float]:
        await mpc.start()
        shared = [secfxp(v) for v in values]
        opened: list[float] = await mpc.output([mpc.max(x, secfxp(0)) for x in shared])
        await mpc.shutdown()
        return opened

    result: list[float] = mpc.run(main())
    return result


def test_garbled_relu_agrees_with_mpyc_secure_fixed_point() -> None:
    rng = random.Random(42)
    limit = HALF / (1 << FRACTIONAL_BITS)
    reals = [0.0, -0.00390625, 0.00390625, -3.5, 2.25, limit, -limit, limit - 1, -(limit - 1)]
    reals += [rng.randrange(-HALF, HALF + 1) / (1 << FRACTIONAL_BITS) for _ in range(23)]
    y = [int(v) for v in encode_fixed(reals)]
    y_a, y_b, y_c = split(y, rng)
    r_a = [rng.randrange(P) for _ in y]
    r_b = [rng.randrange(P) for _ in y]
    masked = run_relu3(y_a, y_b, y_c, r_a, r_b).values
    unmasked = [(int(v) - a - b) % P for v, a, b in zip(masked, r_a, r_b, strict=True)]
    assert decode_fixed(unmasked).tolist() == mpyc_relu(reals)


@pytest.mark.parametrize("shift", [1, 8, 20])
def test_truncating_circuit_drops_the_low_bits_of_the_relu(shift: int) -> None:
    """⌊ReLU(y) / 2^shift⌋ + r'_A + r'_B: fixed point back from scale 2^2f to 2^f, for free."""
    rng = random.Random(shift)
    half = (MODULUS - 1) // 2
    ys = [0, 1, (1 << shift) - 1, 1 << shift, half, half + 1, MODULUS - 1] + [rng.randrange(MODULUS) for _ in range(40)]
    shares = [(rng.randrange(MODULUS), rng.randrange(MODULUS)) for _ in ys]
    y_a = [a for a, _ in shares]
    y_b = [b for _, b in shares]
    y_c = [(y - a - b) % MODULUS for y, (a, b) in zip(ys, shares, strict=True)]
    r_a = [rng.randrange(MODULUS) for _ in ys]
    r_b = [rng.randrange(MODULUS) for _ in ys]
    circuit = relu3_circuit(shift)
    got = circuit.evaluate({"y_A": y_a, "y_B": y_b, "y_C": y_c, "r_A": r_a, "r_B": r_b})["out"]
    expected = [((y if y <= half else 0) >> shift) + a + b for y, a, b in zip(ys, r_a, r_b, strict=True)]
    assert [int(v) for v in got] == [e % MODULUS for e in expected]
    assert circuit.and_count == relu3_circuit().and_count - shift


def test_a_shift_that_leaves_nothing_is_refused() -> None:
    with pytest.raises(GcInputError, match="shift"):
        relu3_circuit(WORD_BITS - 1)
