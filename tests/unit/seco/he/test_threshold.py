"""3-party threshold BFV on real OpenFHE side processes: the masked product is exact, every
decrypted slot is masked, and every malformed request or lost party is a typed error."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml.errors import ServiceUnavailable
from sealedml.seco.he import SECO_MODULUS, HeEngineError, HeSidecar, ThresholdSession

P = SECO_MODULUS


def _matmul_mod(w: np.ndarray, r: np.ndarray) -> list[int]:
    return [sum(int(a) * int(b) for a, b in zip(row, r, strict=True)) % P for row in w]


def test_the_session_uses_noise_flooding_parameters(session: ThresholdSession) -> None:
    assert session.slots == 16384  # NOISE_FLOODING_MULTIPARTY forces N = 16384 for this modulus


@pytest.mark.parametrize("rotate", [False, True], ids=["sums-after-decryption", "rotations"])
@pytest.mark.parametrize(("n_in", "n_out"), [(64, 32), (100, 200)], ids=["digits-layer", "two-ciphertexts"])
def test_the_three_shares_add_up_to_w_times_r(session: ThresholdSession, n_in: int, n_out: int, rotate: bool) -> None:
    rng = np.random.default_rng(n_out)
    w = rng.integers(0, P, (n_out, n_in))
    w_b = rng.integers(0, P, (n_out, n_in))
    w_c = (w - w_b) % P  # the owner's additive split
    shares = session.offline_linear(w_b, w_c, rotate=rotate)
    r = sum(shares.r_shares) % P
    total = (shares.a.astype(object) + shares.b + shares.c) % P
    assert [int(v) for v in total] == _matmul_mod(w, r)
    # B's and C's shares are their own masks: nothing of W or r in them.
    assert not np.array_equal(shares.b, shares.c)


def test_unmasked_slots_would_leak_partial_sums_and_masked_ones_do_not(session: ThresholdSession) -> None:
    """Why every slot is masked: decrypt a product without a mask and the slots between the
    outputs are partial sums of the weights (with rotations) or the weights times r (without);
    with the mask they are not."""
    n_in, n_out = 8, 2
    layout = session.layout(n_in, n_out)
    session.ensure_rotations(layout.rotations)
    w = np.arange(1, n_in * n_out + 1, dtype=np.int64).reshape(n_out, n_in)
    r = np.ones(n_in, dtype=np.int64)
    _, (enc_r,) = session.a.call("encrypt", {"values": layout.replicate(r)})
    (chunk,) = layout.weight_chunks(w)

    def decrypted(mask: list[int]) -> list[int]:
        _, (ct,) = session.b.call("matvec", {"block": layout.block, "weights": chunk, "mask": mask}, [enc_r])
        partials = [
            session.a.call("partial_decrypt", {"lead": True}, [ct])[1][0],
            session.b.call("partial_decrypt", {"lead": False}, [ct])[1][0],
            session.c.call("partial_decrypt", {"lead": False}, [ct])[1][0],
        ]
        return [int(v) for v in session.a.call("fuse", {"length": session.slots}, partials)[0]["values"]]

    plain = decrypted([0] * session.slots)
    assert plain[0] == sum(range(1, 9))  # the output: row 0 · r
    assert plain[1] == sum(range(2, 10))  # w[0][1:] + w[1][0]: sums of weights nobody may decrypt
    (mask,) = layout.random_masks(P)
    masked = decrypted(mask)
    assert [(m + s) % P for m, s in zip(masked, mask, strict=True)] == plain
    assert all(m != p for m, p in zip(masked[: layout.block], plain[: layout.block], strict=True))


@pytest.mark.parametrize(
    ("op", "args", "blobs", "kind"),
    [
        ("no_such_op", {}, [], "malformed"),
        ("encrypt", {"values": [P]}, [], "malformed"),
        ("encrypt", {"values": [-1]}, [], "malformed"),
        ("encrypt", {"values": "1,2"}, [], "malformed"),
        ("add", {}, [b"not a ciphertext"], "malformed"),
        ("add", {}, [], "malformed"),
        ("add", {}, [b"\x00" * 64], "malformed"),  # OpenFHE reads this as "nothing", not an error
        ("matvec", {"block": 3, "weights": [1], "mask": [0]}, [b""], "malformed"),
        ("matvec", {"block": 4, "weights": [1], "mask": [0, 1]}, [b""], "malformed"),
        ("fuse", {"length": 4}, [b"x"], "malformed"),
        ("keygen", {}, [], "state"),  # this party already holds a key share
        ("set_public_key", {}, [b"\x00" * 64], "malformed"),
        ("insert_rotation_keys", {}, [b"garbage"], "malformed"),
    ],
)
def test_malformed_requests_are_typed_errors_and_the_engine_goes_on(
    session: ThresholdSession, op: str, args: dict[str, object], blobs: list[bytes], kind: str
) -> None:
    with pytest.raises(HeEngineError) as caught:
        session.b.call(op, args, blobs)
    assert caught.value.kind == kind
    _, (ct,) = session.b.call("encrypt", {"values": [1, 2, 3]})  # still serving
    assert len(ct) > 1000


def test_operations_out_of_order_are_refused(he_interpreter: str) -> None:
    with HeSidecar.start() as engine:
        for op in ("keygen", "encrypt", "partial_decrypt"):
            with pytest.raises(HeEngineError) as caught:
                engine.call(op, {"values": [1], "lead": True}, [b"x"] if op == "partial_decrypt" else [])
            assert caught.value.kind == "state"


def test_a_desynchronized_pipe_ends_the_engine(he_interpreter: str) -> None:
    engine = HeSidecar.start()
    stdin = engine._process.stdin
    assert stdin is not None
    stdin.write((10**9).to_bytes(4, "big"))  # a header length over the limit
    stdin.flush()
    assert engine._process.wait(timeout=30) == 0  # it answered "framing" and stopped
    with pytest.raises(ServiceUnavailable, match="gone"):
        engine.call("encrypt", {"values": [1]})


def test_a_party_that_goes_away_fails_the_step_with_a_clear_error(he_interpreter: str) -> None:
    engines = [HeSidecar.start() for _ in range(3)]
    try:
        session = ThresholdSession(engines)
        engines[2].kill()
        with pytest.raises(ServiceUnavailable, match="HE side process is gone"):
            session.offline_linear(np.ones((2, 4), dtype=np.int64), np.ones((2, 4), dtype=np.int64))
    finally:
        for engine in engines:
            engine.close()


def test_without_rotations_an_unmasked_slot_would_be_a_weight_times_r(session: ThresholdSession) -> None:
    layout = session.layout(4, 2)
    w = np.array([[3, 5, 7, 11], [13, 17, 19, 23]], dtype=np.int64)
    _, (enc_r,) = session.a.call("encrypt", {"values": layout.replicate(np.ones(4, dtype=np.int64))})
    (chunk,) = layout.weight_chunks(w)
    _, (ct,) = session.b.call("matvec", {"block": 1, "weights": chunk, "mask": [0] * session.slots}, [enc_r])
    partials = [
        session.a.call("partial_decrypt", {"lead": True}, [ct])[1][0],
        session.b.call("partial_decrypt", {"lead": False}, [ct])[1][0],
        session.c.call("partial_decrypt", {"lead": False}, [ct])[1][0],
    ]
    values = session.a.call("fuse", {"length": 8}, partials)[0]["values"]
    assert values == [3, 5, 7, 11, 13, 17, 19, 23]  # r = 1: the weights themselves, hence the masks
