"""A whole SECO query across U, A, B and C (the party classes in one process, real OpenFHE
engines, every message sealed on its link): exact fixed-point results, what each party
receives, and failures. ``tests/integration/test_seco_processes.py`` runs the same classes as
four processes over HTTP."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from sealedml.errors import ServiceUnavailable
from sealedml.seco.gateway import LocalRemote, Own
from sealedml.seco.gc.errors import GcProtocolError
from sealedml.seco.gc.relu import relu3_circuit
from sealedml.seco.he import HeSidecar
from sealedml.seco.link import LinkError, LinkReplayError, peek
from sealedml.seco.model import SecoModel, compile_model
from sealedml.seco.protocol import SecoParties
from sealedml.seco.remote import SecoStepError
from sealedml.zoo.digits_mlp import digits_mlp

from ..test_model import _small_cnn


@pytest.fixture(scope="module")
def mlp() -> SecoModel:
    return compile_model(digits_mlp().model)


@pytest.fixture
def engines(he_interpreter: str) -> Iterator[list[HeSidecar]]:
    started = [HeSidecar.start() for _ in range(3)]
    try:
        yield started
    finally:
        for engine in started:
            engine.close()


@pytest.fixture
def parties(engines: list[HeSidecar], mlp: SecoModel) -> Iterator[SecoParties]:
    built = SecoParties(mlp, engines)
    try:
        yield built
    finally:
        built.close()


class _Intercepting(LocalRemote):
    """A's handle of B or C with a hook on every message delivered (an on-path attacker)."""

    def __init__(self, inner: LocalRemote, hook: object = None) -> None:
        super().__init__(inner.server)
        self.hook = hook or (lambda message: message)
        self.calls: list[tuple[str, str, list[bytes]]] = []

    def step(self, name: str, query: str, messages: Sequence[bytes]) -> list[bytes]:
        delivered = [self.hook(m) if _is_link_message(m) else m for m in messages]  # type: ignore[operator]
        self.calls.append((name, query, delivered))
        return super().step(name, query, delivered)


def _is_link_message(message: bytes) -> bool:
    """Link messages, not the handshake answers that also pass through a step."""
    try:
        peek(message)
    except LinkError:
        return False
    return True


def test_digits_queries_equal_the_fixed_point_model_exactly(parties: SecoParties, mlp: SecoModel) -> None:
    trained = digits_mlp()
    for x, label in zip(trained.x_test[:6], trained.y_test[:6], strict=True):
        result = parties.query(x)
        assert np.array_equal(result.output_field, mlp.reference(x)[0])
        assert result.logits.argmax() == label
        assert result.online_ms > 0 and result.offline_s > 0 and result.user_cpu_ms >= 0
        assert set(result.link_bytes) == {"U-A", "A-B", "A-C", "B-C"} and min(result.link_bytes.values()) > 0


def test_a_small_cnn_query_equals_the_fixed_point_model(engines: list[HeSidecar]) -> None:
    model = compile_model(_small_cnn())
    parties = SecoParties(model, engines)
    x = np.random.default_rng(3).standard_normal((1, 8, 8)).astype(np.float32)
    assert np.array_equal(parties.query(x).output_field, model.reference(x)[0])
    parties.close()


def test_no_server_receives_the_input_or_another_servers_weight_share(engines: list[HeSidecar], mlp: SecoModel) -> None:
    """Record every payload each server's links deliver; look for the secrets in them."""
    delivered: dict[str, list[bytes]] = {party: [] for party in "ABC"}
    recorders = {party: (lambda _s, _k, payload, p=party: delivered[p].append(payload)) for party in "ABC"}
    parties = SecoParties(mlp, engines, recorders=recorders)
    x = digits_mlp().x_test[7]
    parties.query(x)
    secret_input = mlp.encode_input(x).astype("<i8").tobytes()
    for party in "ABC":
        received = b"".join(delivered[party])
        assert received  # the recorders saw the traffic
        assert secret_input not in received
        assert all(secret_input[i : i + 64] not in received for i in range(0, len(secret_input), 64))
        for owner, shares in parties.weights.items():
            if owner != party:
                for layer in shares:
                    rows = [row.astype("<i8").tobytes() for row in layer]
                    assert not any(row in received for row in rows), (party, owner)
    # The servers exchange only masked or garbled data: A never opens a label table, C does.
    assert ("B", "relu-tables") not in parties.gateway.received
    assert ("B", "relu-tables") in parties.remotes["C"].received
    parties.close()


@pytest.mark.parametrize(
    ("target", "kind"), [("C", "relu-tables"), ("C", "relu-labels"), ("B", "masked-input"), ("C", "ot-response")]
)
def test_a_tampered_message_between_servers_fails_the_query_and_the_next_one_works(
    parties: SecoParties, target: str, kind: str
) -> None:
    flipped = []

    def tamper_once(message: bytes) -> bytes:
        if peek(message)[3] == kind and peek(message)[0] in "BC" and not flipped:
            flipped.append(kind)
            return message[:-1] + bytes([message[-1] ^ 1])
        return message

    handle = parties.gateway.remotes[target]
    assert isinstance(handle, LocalRemote)
    parties.gateway.remotes[target] = _Intercepting(handle, tamper_once)
    with pytest.raises(LinkError, match="failed authentication"):
        parties.query(digits_mlp().x_test[0])
    assert flipped == [kind]
    # The gateway sets up afresh and the user opens a new session: the deployment recovers.
    x = digits_mlp().x_test[1]
    assert np.array_equal(parties.query(x).output_field, parties.model.reference(x)[0])


def test_a_replayed_message_between_servers_is_refused(parties: SecoParties) -> None:
    handle = parties.gateway.remotes["B"]
    assert isinstance(handle, LocalRemote)
    recording = _Intercepting(handle)
    parties.gateway.remotes["B"] = recording
    parties.query(digits_mlp().x_test[0])
    parties.query(digits_mlp().x_test[1])
    name, query, messages = next(call for call in recording.calls if call[0] == "he-joint-key")
    with pytest.raises(LinkReplayError):  # A's token and C's joint key again, after many later messages
        parties.remotes["B"].step(name, query, messages)
    name, query, messages = next(call for call in recording.calls if call[0] == "online-layer")
    with pytest.raises(LinkReplayError):  # the first query's masked input, in the same way
        parties.remotes["B"].step(name, query, messages)


def test_only_the_gateway_drives_a_remote_server(parties: SecoParties) -> None:
    """A step without A's token, or with a token for another step, changes nothing at the server."""
    parties.query(digits_mlp().x_test[0])
    with pytest.raises(SecoStepError, match="token"):
        parties.remotes["C"].step("ot-base-start", "", [])
    with pytest.raises(LinkError):  # a message of another kind where the token belongs
        parties.remotes["B"].step("link-start", "", [b"\x00\x00\x00\x02{}"])
    x = digits_mlp().x_test[1]
    assert np.array_equal(parties.query(x).output_field, parties.model.reference(x)[0])  # undisturbed


def test_steps_out_of_order_or_unknown_are_typed_errors(parties: SecoParties) -> None:
    parties.query(digits_mlp().x_test[0])
    with pytest.raises(SecoStepError, match="no step"):
        parties.remotes["C"].step("ot-respond-a", parties.user.session, [])
    gateway = parties.gateway
    with pytest.raises(SecoStepError, match="offline"):  # A's token is fine, the query has no state
        gateway._call("B", "online-layer", "f00d", [Own("masked-input", b"")])
    with pytest.raises(SecoStepError, match=r"no offline phase"):
        parties.gateway.online("f00d", [b""])


def test_a_server_going_away_fails_the_query_with_a_clear_error(engines: list[HeSidecar], mlp: SecoModel) -> None:
    parties = SecoParties(mlp, engines)
    parties.query(digits_mlp().x_test[0])
    engines[2].kill()  # C's HE engine (and so C) is gone
    with pytest.raises(ServiceUnavailable, match="gone"):
        parties.query(digits_mlp().x_test[1])
    parties.close()


def test_a_garbled_table_corrupted_before_sealing_is_detected(
    parties: SecoParties, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a semi-honest mistake (not an attacker on the link) never yields a wrong answer."""
    import sealedml.seco.remote as remote

    real_garble = remote.garble

    def corrupt(circuit: object, n: int) -> object:
        garbled, keys = real_garble(circuit, n)  # type: ignore[arg-type]
        garbled.tables[: len(garbled.tables) // 2] ^= np.uint64(0xFF)
        return garbled, keys

    monkeypatch.setattr(remote, "garble", corrupt)
    with pytest.raises(GcProtocolError):
        parties.query(digits_mlp().x_test[0])


def test_gateway_and_one_remote_together_still_miss_the_hidden_activations(
    engines: list[HeSidecar], mlp: SecoModel
) -> None:
    """{A, B} know r'ᴬ, r'ᴮ and the masked activations B receives; C's r'ᶜ still hides them."""
    seen_by_b: list[bytes] = []

    def record_b(sender: str, kind: str, payload: bytes) -> None:
        if (sender, kind) == ("C", "masked-input"):
            seen_by_b.append(payload)

    parties = SecoParties(mlp, engines, recorders={"B": record_b})
    masks: dict[str, np.ndarray] = {}
    offline = parties.gateway.offline

    def offline_and_look(query: str, messages: Sequence[bytes]) -> list[bytes]:
        out = offline(query, messages)
        masks["A"] = parties.gateway._queries[query].relu_masks[0]
        for name in "BC":
            masks[name] = parties.remotes[name]._queries[query].relu_masks[0]
        return out

    parties.gateway.offline = offline_and_look  # type: ignore[method-assign]
    x = digits_mlp().x_test[3]
    parties.query(x)
    (message,) = seen_by_b
    masked = np.frombuffer(message, "<i8")
    coalition_guess = (masked - masks["A"] - masks["B"]) % mlp.prime  # what A and B can compute together
    (w, b), _ = mlp.fixed_point()
    pre_activation = (w.astype(object) @ mlp.signed(mlp.encode_input(x)).astype(object) + mlp.signed(b)) % mlp.prime
    hidden = (np.maximum(0, mlp.signed(pre_activation.astype(np.int64))) >> mlp.frac_bits) % mlp.prime  # truncated
    assert np.array_equal((coalition_guess - masks["C"]) % mlp.prime, hidden)  # with C's share: the activations
    assert np.mean(coalition_guess == hidden) < 0.1  # without it: noise
    parties.close()


def test_a_five_layer_model_runs_with_truncating_relus(engines: list[HeSidecar]) -> None:
    from ..test_model import _deep_mlp

    model = compile_model(_deep_mlp([64, 32, 32, 32, 32, 10]))
    parties = SecoParties(model, engines)
    # relu_3 with the low fractional bits dropped: fewer ANDs than the 572 of the plain circuit
    assert parties.gateway.circuit.and_count == relu3_circuit(model.frac_bits).and_count < 572
    x = digits_mlp().x_test[4]
    assert np.array_equal(parties.query(x).output_field, model.reference(x)[0])
    parties.close()


def test_a_user_with_an_unknown_key_is_refused(parties: SecoParties, mlp: SecoModel) -> None:
    from sealedml.crypto import SigningKey
    from sealedml.seco.user import LocalGateway, SecoUser

    servers = dict(parties.user._servers)  # the real servers' keys, but a key they do not know
    stranger = SecoUser(mlp.architecture, SigningKey.generate(), servers, LocalGateway(parties.gateway))
    with pytest.raises(LinkError, match=r"not signed|unknown"):
        stranger.connect()
