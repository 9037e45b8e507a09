"""A whole SECO query across U, A, B and C (one process, real OpenFHE engines, every message
sealed on its link): exact fixed-point results, what each party receives, and failures."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from sealedml.errors import ServiceUnavailable
from sealedml.seco.gc.errors import GcProtocolError
from sealedml.seco.he import HeSidecar, ThresholdSession
from sealedml.seco.link import LinkError, LinkReplayError
from sealedml.seco.model import SecoModel, compile_model
from sealedml.seco.protocol import SecoParties
from sealedml.zoo.digits_mlp import digits_mlp

from ..test_model import _small_cnn


@pytest.fixture(scope="module")
def mlp() -> SecoModel:
    return compile_model(digits_mlp().model)


@pytest.fixture
def parties(he_interpreter: str, mlp: SecoModel) -> Iterator[SecoParties]:
    engines = [HeSidecar.start() for _ in range(3)]
    try:
        yield SecoParties(mlp, ThresholdSession(engines))
    finally:
        for engine in engines:
            engine.close()


def test_digits_queries_equal_the_fixed_point_model_exactly(parties: SecoParties, mlp: SecoModel) -> None:
    trained = digits_mlp()
    for x, label in zip(trained.x_test[:6], trained.y_test[:6], strict=True):
        result = parties.query(x)
        assert np.array_equal(result.output_field, mlp.reference(x)[0])
        assert result.logits.argmax() == label
        assert result.online_ms > 0 and result.offline_s > 0 and result.user_cpu_ms >= 0
        assert set(result.link_bytes) == {"U-A", "A-B", "A-C", "B-C"} and min(result.link_bytes.values()) > 0


def test_a_small_cnn_query_equals_the_fixed_point_model(he_interpreter: str) -> None:
    model = compile_model(_small_cnn())
    engines = [HeSidecar.start() for _ in range(3)]
    try:
        parties = SecoParties(model, ThresholdSession(engines))
        x = np.random.default_rng(3).standard_normal((1, 8, 8)).astype(np.float32)
        assert np.array_equal(parties.query(x).output_field, model.reference(x)[0])
    finally:
        for engine in engines:
            engine.close()


def test_no_server_receives_the_input_or_another_servers_weight_share(
    parties: SecoParties, mlp: SecoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record every payload each party's links deliver; look for the secrets in them."""
    delivered: dict[str, list[bytes]] = {party: [] for party in "UABC"}
    send = parties.send

    def recording(sender: str, receiver: str, kind: str, payload: bytes) -> bytes:
        opened = send(sender, receiver, kind, payload)
        delivered[receiver].append(opened)
        return opened

    monkeypatch.setattr(parties, "send", recording)
    x = digits_mlp().x_test[7]
    parties.query(x)
    secret_input = mlp.encode_input(x).astype("<i8").tobytes()
    for party in "ABC":
        received = b"".join(delivered[party])
        assert secret_input not in received
        assert all(secret_input[i : i + 64] not in received for i in range(0, len(secret_input), 64))
        for owner, shares in parties.weights.items():
            if owner != party:
                for layer in shares:
                    rows = [row.astype("<i8").tobytes() for row in layer]
                    assert not any(row in received for row in rows), (party, owner)
    # The servers exchange only masked or garbled data: A never receives a label table.
    assert "relu-tables" not in parties.received["A"] and "relu-tables" in parties.received["C"]


@pytest.mark.parametrize("kind", ["relu-tables", "relu-labels", "masked-input", "ot-response"])
def test_a_tampered_message_between_servers_fails_the_query(
    parties: SecoParties, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    original = parties.links

    def tamper_once(sender: str, receiver: str, k: str, payload: bytes) -> bytes:
        name = f"{sender}-{receiver}" if f"{sender}-{receiver}" in original else f"{receiver}-{sender}"
        first, second = original[name]
        out, into = (first, second) if name.startswith(sender) else (second, first)
        message = bytearray(out.seal(k, payload))
        if k == kind and sender in "ABC" and receiver in "ABC":
            message[-1] ^= 1
        return into.open(bytes(message), k)

    monkeypatch.setattr(parties, "send", tamper_once)
    with pytest.raises(LinkError, match="failed authentication"):
        parties.query(digits_mlp().x_test[0])


def test_a_replayed_message_between_servers_is_refused(parties: SecoParties) -> None:
    at_b, at_c = parties.links["B-C"]
    message = at_b.seal("relu-labels", b"labels")
    assert at_c.open(message, "relu-labels") == b"labels"
    with pytest.raises(LinkReplayError):
        at_c.open(message, "relu-labels")


def test_a_server_going_away_fails_the_query_with_a_clear_error(he_interpreter: str, mlp: SecoModel) -> None:
    engines = [HeSidecar.start() for _ in range(3)]
    try:
        parties = SecoParties(mlp, ThresholdSession(engines))
        parties.query(digits_mlp().x_test[0])
        engines[2].kill()  # C's HE engine (and so C) is gone
        with pytest.raises(ServiceUnavailable, match="gone"):
            parties.query(digits_mlp().x_test[1])
    finally:
        for engine in engines:
            engine.close()


def test_a_garbled_table_corrupted_before_sealing_is_detected(
    parties: SecoParties, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a semi-honest mistake (not an attacker on the link) never yields a wrong answer."""
    send = parties.send

    def corrupt_tables(sender: str, receiver: str, kind: str, payload: bytes) -> bytes:
        if kind == "relu-tables":  # every table row of the first half of the gates
            half = len(payload) // 2
            payload = (np.frombuffer(payload[:half], np.uint8) ^ 0xFF).tobytes() + payload[half:]
        return send(sender, receiver, kind, payload)

    monkeypatch.setattr(parties, "send", corrupt_tables)
    with pytest.raises(GcProtocolError):
        parties.query(digits_mlp().x_test[0])


def test_gateway_and_one_remote_together_still_miss_the_hidden_activations(
    parties: SecoParties, mlp: SecoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """{A, B} know r'ᴬ, r'ᴮ and the masked activations B receives; C's r'ᶜ still hides them."""
    x = digits_mlp().x_test[3]
    state = parties.offline()
    assert state.r0 is not None
    seen_by_b: list[bytes] = []
    send = parties.send

    def recording(sender: str, receiver: str, kind: str, payload: bytes) -> bytes:
        opened = send(sender, receiver, kind, payload)
        if (sender, receiver, kind) == ("C", "B", "masked-input"):
            seen_by_b.append(opened)
        return opened

    monkeypatch.setattr(parties, "send", recording)
    parties.online((mlp.encode_input(x) - sum(state.r0)) % mlp.prime, state)
    (message,) = seen_by_b
    masked = np.frombuffer(message, "<i8")
    relu = state.relus[0]
    coalition_guess = (masked - relu.r_a - relu.r_b) % mlp.prime  # what A and B can compute together
    (w, b), _ = mlp.fixed_point()
    pre_activation = (w.astype(object) @ mlp.signed(mlp.encode_input(x)).astype(object) + mlp.signed(b)) % mlp.prime
    hidden = (np.maximum(0, mlp.signed(pre_activation.astype(np.int64))) >> mlp.frac_bits) % mlp.prime  # truncated
    assert np.array_equal((coalition_guess - relu.r_c) % mlp.prime, hidden)  # with C's share: the activations
    assert np.mean(coalition_guess == hidden) < 0.1  # without it: noise


def test_a_five_layer_model_runs_with_truncating_relus(he_interpreter: str) -> None:
    from ..test_model import _deep_mlp

    model = compile_model(_deep_mlp([64, 32, 32, 32, 32, 10]))
    engines = [HeSidecar.start() for _ in range(3)]
    try:
        parties = SecoParties(model, ThresholdSession(engines))
        assert parties.circuit.and_count == 564  # relu_3 with the 8 low bits dropped
        x = digits_mlp().x_test[4]
        assert np.array_equal(parties.query(x).output_field, model.reference(x)[0])
    finally:
        for engine in engines:
            engine.close()
