"""One SECO query, party by party: masks, threshold-HE linear layers, garbled ReLUs, output shares.

Parties (``docs/seco.md``): the user U talks only to the gateway A; the remote servers B and C
hold additive shares W_B + W_C = W (and b_B + b_C = b) of every layer. Every message between
two parties is sealed on their :class:`~sealedml.seco.link.Link` (U's messages for B and C
are sealed end to end and relayed by A), so what each party receives is exactly what its
links deliver — the tests record it.

Offline, per query (independent of the input):

* U draws the input mask r₀ = r₀ᴬ + r₀ᴮ + r₀ᶜ and sends each server its share.
* Layer k: the threshold-HE step (:meth:`ThresholdSession.offline_linear`) leaves A with
  aₖ = W·rₖ − sᴮ − sᶜ, B with sᴮ and C with sᶜ.
* ReLU after layer k: B garbles one ``relu_3`` circuit per value; A fetches the labels of
  its inputs aₖ and r'ᴬ by OT from B and forwards them to C; C finishes its base OTs with B.
  The next mask is rₖ₊₁ = −(r'ᴬ + r'ᴮ): A's share −r'ᴬ, B's −r'ᴮ, C's 0.

Online:

* U sends x − r₀ to A, which forwards it to B and C.
* Layer k: B computes yᴮ = W_B·mₖ + sᴮ + b_B, C computes yᶜ = W_C·mₖ + sᶜ + b_C, A has
  yᴬ = aₖ; the three add up to W·xₖ + b. Then the ReLU: B sends C the labels of yᴮ and r'ᴮ,
  C fetches those of yᶜ by OT, evaluates, learns ReLU(y) + r'ᴬ + r'ᴮ, adds r'ᶜ to get
  mₖ₊₁ = xₖ₊₁ − rₖ₊₁ and sends it to B.
* After the last layer B and C seal their output shares to U; A sends its own; U adds them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sealedml.crypto import SigningKey
from sealedml.seco.gc.circuit import bits_to_words, words_to_bits
from sealedml.seco.gc.garble import GarbledCircuit, GarblerKeys, evaluate, garble
from sealedml.seco.gc.ot import OtExtensionReceiver, OtExtensionSender
from sealedml.seco.gc.relu import relu3_circuit
from sealedml.seco.he.threshold import ThresholdSession
from sealedml.seco.link import Link, LinkError, LinkInitiator, LinkResponder, PartyIdentity
from sealedml.seco.model import SecoModel

__all__ = ["LINKS", "QueryResult", "SecoParties"]

#: The links, named by their two ends. U–B and U–C are end-to-end sealed through A.
LINKS = ("U-A", "U-B", "U-C", "A-B", "A-C", "B-C")
_LABEL = np.dtype("<u8")


def _vec(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def _unvec(data: bytes, n: int) -> np.ndarray:
    array = np.frombuffer(data, dtype="<i8")
    if array.shape != (n,):
        raise LinkError(f"expected {n} values, got {array.size}")
    return array.astype(np.int64)


def _pair(first: str, second: str, session: str) -> tuple[Link, Link]:
    keys = {first: SigningKey.generate(), second: SigningKey.generate()}
    initiator = LinkInitiator(keys[first], first, PartyIdentity(second, keys[second].public_bytes), session)
    reply, at_second = LinkResponder(keys[second], second, {first: keys[first].public_bytes}).accept(initiator.hello())
    return initiator.finish(reply), at_second


@dataclass
class _Relu:
    """One ReLU layer's offline state, kept by the party named in each field."""

    garbled: GarbledCircuit  # C (received from B)
    keys: GarblerKeys  # B
    r_a: np.ndarray  # A: its output mask r'ᴬ (its labels went to C)
    r_b: np.ndarray  # B: its output mask r'ᴮ
    r_c: np.ndarray  # C: its output mask r'ᶜ, added after evaluation
    a_labels: np.ndarray  # C (forwarded by A)


@dataclass
class _Offline:
    a: list[np.ndarray] = field(default_factory=list)  # A: aₖ per layer
    s_b: list[np.ndarray] = field(default_factory=list)  # B
    s_c: list[np.ndarray] = field(default_factory=list)  # C
    relus: list[_Relu] = field(default_factory=list)
    r0: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # U's; each server holds one share


@dataclass(frozen=True)
class QueryResult:
    """Logits of one query and what it cost."""

    logits: np.ndarray
    output_field: np.ndarray
    offline_s: float
    online_ms: float
    user_cpu_ms: float
    link_bytes: dict[str, int]


class SecoParties:
    """A, B and C holding a deployed model, with their HE engines and links (one process, for now).

    Args:
        model: the compiled model; the owner's additive split happens here (B and C each get
            uniformly random-looking shares, A gets no weights).
        he: the three parties' threshold-HE session (A, B, C engines).
    """

    def __init__(self, model: SecoModel, he: ThresholdSession, session: str = "seco") -> None:
        self.model, self.he, self.p = model, he, model.prime
        shares_b, shares_c = model.split()
        biases = [b for _, b in model.fixed_point()]
        bias_b = [self.he.random_vector(len(b)) for b in biases]
        self.weights = {"B": shares_b, "C": shares_c}
        self.biases = {"B": bias_b, "C": [(b - s) % self.p for b, s in zip(biases, bias_b, strict=True)]}
        self.links: dict[str, tuple[Link, Link]] = {name: _pair(name[0], name[2], session) for name in LINKS}
        self.received: dict[str, list[str]] = {party: [] for party in "UABC"}
        self.circuit = relu3_circuit(model.frac_bits if model.truncate else 0)
        self._ot: dict[str, tuple[OtExtensionReceiver, OtExtensionSender]] = {}

    # --- message passing ----------------------------------------------------------------

    def send(self, sender: str, receiver: str, kind: str, payload: bytes) -> bytes:
        """Seal ``payload`` on the sender→receiver link and open it at the receiver."""
        name = f"{sender}-{receiver}" if f"{sender}-{receiver}" in self.links else f"{receiver}-{sender}"
        first, second = self.links[name]
        out, into = (first, second) if name.startswith(sender) else (second, first)
        self.received[receiver].append(kind)
        return into.open(out.seal(kind, payload), kind)

    def link_bytes(self) -> dict[str, int]:
        """Bytes carried per link (both directions); U–B and U–C also cross U–A, relayed."""
        carried = {name: ends[0].bytes_sent + ends[1].bytes_sent for name, ends in self.links.items()}
        carried["U-A"] += carried.pop("U-B") + carried.pop("U-C")
        for name, count in self.he.traffic.items():  # the HE engines' ciphertexts and key shares
            carried[name] += count
        return carried

    def _ot_pair(self, chooser: str) -> tuple[OtExtensionReceiver, OtExtensionSender]:
        """IKNP between ``chooser`` (A or C) and the garbler B; base OTs once per session."""
        if chooser not in self._ot:
            receiver, sender = (
                OtExtensionReceiver(f"seco/{chooser}-B".encode()),
                OtExtensionSender(f"seco/{chooser}-B".encode()),
            )
            first = self.send(chooser, "B", "ot-base", receiver.base_message())
            receiver.finish_base(self.send("B", chooser, "ot-base-reply", sender.base_reply(first)))
            self._ot[chooser] = (receiver, sender)
        return self._ot[chooser]

    def _port(self, name: str) -> tuple[int, ...]:
        return next(port.wires for port in self.circuit.inputs if port.name == name)

    def _transfer(self, chooser: str, wires: tuple[int, ...], bits: np.ndarray, keys: GarblerKeys) -> np.ndarray:
        receiver, sender = self._ot_pair(chooser)
        request = self.send(chooser, "B", "ot-request", receiver.request(bits.ravel()))
        zero, one = keys.label_pairs(wires)
        response = self.send(
            "B", chooser, "ot-response", sender.respond(request, zero.reshape(-1, 2), one.reshape(-1, 2))
        )
        return receiver.receive(response).reshape(len(wires), bits.shape[1], 2)

    # --- offline ------------------------------------------------------------------------

    def offline(self) -> _Offline:
        """Everything that does not depend on the input, for one query."""
        state = _Offline()
        n_in = self.model.n_inputs
        r0 = (self.he.random_vector(n_in), self.he.random_vector(n_in), self.he.random_vector(n_in))
        state.r0 = r0
        r = (
            _unvec(self.send("U", "A", "mask-share", _vec(r0[0])), n_in),
            _unvec(self.send("U", "B", "mask-share", _vec(r0[1])), n_in),
            _unvec(self.send("U", "C", "mask-share", _vec(r0[2])), n_in),
        )
        layers = len(self.model.layers)
        widths = [layer.weight.shape[0] for layer in self.model.layers]
        # The next layers' masks are drawn, not computed: every layer's HE step runs at once.
        relu_masks = [
            (self.he.random_vector(n), self.he.random_vector(n), self.he.random_vector(n)) for n in widths[:-1]
        ]
        masks = [r] + [((-r_a) % self.p, (-r_b) % self.p, (-r_c) % self.p) for r_a, r_b, r_c in relu_masks]
        linear = self.he.offline_layers(self.weights["B"], self.weights["C"], masks)
        for k in range(layers):
            state.a.append(linear[k].a)
            state.s_b.append(linear[k].b)
            state.s_c.append(linear[k].c)
        for k, (r_a, r_b, r_c) in enumerate(relu_masks):
            n = widths[k]
            garbled, keys = garble(self.circuit, n)  # B
            tables = self.send("B", "C", "relu-tables", garbled.to_bytes())
            bits_a = np.concatenate([words_to_bits(state.a[k], 41), words_to_bits(r_a, 41)])
            a_labels = self._transfer("A", self._port("y_A") + self._port("r_A"), bits_a, keys)
            forwarded = self.send("A", "C", "relu-labels", a_labels.astype(_LABEL).tobytes())
            self._ot_pair("C")  # C's base OTs with B, once per session, before any input exists
            state.relus.append(
                _Relu(
                    GarbledCircuit.from_bytes(self.circuit, n, tables),
                    keys,
                    r_a,
                    r_b,
                    r_c,
                    np.frombuffer(forwarded, dtype=_LABEL).reshape(a_labels.shape),
                )
            )
        return state

    # --- online -------------------------------------------------------------------------

    def online(self, masked_input: np.ndarray, state: _Offline) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From U's x − r₀ to the three output shares (A's, B's, C's)."""
        n_in = self.model.n_inputs
        at_a = _unvec(self.send("U", "A", "masked-input", _vec(masked_input)), n_in)
        m = {
            "B": _unvec(self.send("A", "B", "masked-input", _vec(at_a)), n_in),
            "C": _unvec(self.send("A", "C", "masked-input", _vec(at_a)), n_in),
        }
        last = len(self.model.layers) - 1
        for k in range(last + 1):
            y = {
                party: (self._matvec(self.weights[party][k], m[party]) + s + self.biases[party][k]) % self.p
                for party, s in (("B", state.s_b[k]), ("C", state.s_c[k]))
            }
            if k == last:
                return state.a[k], y["B"], y["C"]
            relu = state.relus[k]
            n = len(y["B"])
            b_bits = np.concatenate([words_to_bits(y["B"], 41), words_to_bits(relu.r_b, 41)])
            b_labels = relu.keys.active_labels(self._port("y_B") + self._port("r_B"), b_bits)
            b_labels = np.frombuffer(
                self.send("B", "C", "relu-labels", b_labels.astype(_LABEL).tobytes()), dtype=_LABEL
            ).reshape(b_labels.shape)
            c_labels = self._transfer("C", self._port("y_C"), words_to_bits(y["C"], 41), relu.keys)
            labels = np.empty((self.circuit.n_inputs, n, 2), dtype=_LABEL)
            labels[list(self._port("y_A") + self._port("r_A"))] = relu.a_labels
            labels[list(self._port("y_B") + self._port("r_B"))] = b_labels
            labels[list(self._port("y_C"))] = c_labels
            out = bits_to_words(evaluate(self.circuit, relu.garbled, labels)).astype(np.int64)  # C
            masked = (out + relu.r_c) % self.p  # C: its own share of the next mask
            m = {"C": masked, "B": _unvec(self.send("C", "B", "masked-input", _vec(masked)), n)}
        raise AssertionError("unreachable")

    def _matvec(self, weights: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """W·v mod p in exact integers (41-bit × 41-bit products overflow int64)."""
        return np.array((weights.astype(object) @ vector.astype(object)) % self.p, dtype=np.int64)

    # --- a whole query, with U ------------------------------------------------------------

    def query(self, x: np.ndarray) -> QueryResult:
        """Run one query for input ``x``: offline, then online; U's own work is timed apart."""
        before = self.link_bytes()
        t0 = time.perf_counter()
        state = self.offline()
        t1 = time.perf_counter()
        assert state.r0 is not None
        c0 = time.process_time()  # U: encode and mask
        masked = (self.model.encode_input(x) - sum(state.r0)) % self.p
        user = time.process_time() - c0
        t2 = time.perf_counter()
        y_a, y_b, y_c = self.online(masked, state)
        parts = (
            _unvec(self.send("A", "U", "output-share", _vec(y_a)), len(y_a)),
            _unvec(self.send("B", "U", "output-share", _vec(y_b)), len(y_b)),
            _unvec(self.send("C", "U", "output-share", _vec(y_c)), len(y_c)),
        )
        t3 = time.perf_counter()
        c0 = time.process_time()  # U: add the shares, decode
        output = (parts[0] + parts[1] + parts[2]) % self.p
        logits = self.model.decode_output(output)
        user += time.process_time() - c0
        after = self.link_bytes()
        return QueryResult(
            logits=logits,
            output_field=output,
            offline_s=t1 - t0,
            online_ms=(t3 - t2) * 1000,
            user_cpu_ms=user * 1000,
            link_bytes={name: after[name] - before.get(name, 0) for name in after},
        )
