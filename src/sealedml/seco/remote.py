"""A remote server of SECO mode (B or C): its weight shares, its HE engine, its own randomness.

The gateway A drives a query one *step* at a time: it calls ``step(name, query, messages)``
on B or C — the first message A's sealed token naming the step and the query, so that no one
else can drive a server, then the sealed messages addressed to it — and relays what comes back — to the other
remote server, to the user, or to itself — by the (unauthenticated) routing header. Every
message a remote server opens is authenticated on its link with the named sender, so A
relays B–C and U–B/U–C traffic it cannot read or alter unnoticed. Everything a server
draws (its share of every next-layer mask, its product masks, the garbler's keys) is drawn
here and never leaves except as the protocol sends it.

Steps (``docs/seco.md`` has the whole flow):

===================  =====  ====================================================================
step                 who    what
===================  =====  ====================================================================
``link-start``       B      B's handshake hello for C (A carries it), ``link-finish`` its answer
``he-keygen``        B, C   load A's context, add a key share to the chain; C's key is the joint one
``he-joint-key``     B      take the joint public key from C
``ot-base``          B      answer a chooser's (A's or C's) base OTs: ``ot-base-start/-finish`` at C
``offline-encrypt``  B, C   U's share of the input mask arrives; draw the ReLU masks; encrypt all
``offline-products`` B, C   Enc(W_X ⊙ r − S_X) for the lead; keep the row sums of S_X
``offline-decrypt``  B, C   partial decryptions; B also garbles every ReLU and sends C the tables
``ot-respond-a``     B      A's input labels (its product share and its ReLU mask) by OT
``offline-labels``   C      store B's tables and A's labels
``online-layer``     B, C   y_X = W_X·m + s_X + b_X; B sends C its labels, C asks B for its own by
                            OT — or, after the last layer, each seals its output share to U
``ot-respond-c``     B      C's input labels by OT
``evaluate``         C      evaluate the garbled ReLUs, add r'ᶜ, send B the next masked input
===================  =====  ====================================================================
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sealedml.crypto import SigningKey
from sealedml.errors import ConfigurationError, ProtocolError
from sealedml.seco.gc.circuit import bits_to_words, words_to_bits
from sealedml.seco.gc.garble import GarbledCircuit, GarblerKeys, evaluate, garble
from sealedml.seco.gc.ot import OtExtensionReceiver, OtExtensionSender
from sealedml.seco.gc.relu import relu3_circuit
from sealedml.seco.he.client import HeSidecar
from sealedml.seco.he.packing import PackedLayers, uniform_mod
from sealedml.seco.he.threshold import HeParty
from sealedml.seco.link import Link, LinkError, LinkInitiator, LinkResponder, PartyIdentity, peek
from sealedml.seco.model import SecoArchitecture
from sealedml.seco.wire import pack, unpack, unvec, vec

__all__ = ["FIELD_BITS", "MAX_USER_SESSIONS", "Recorder", "RemoteServer", "SecoStepError", "step_token"]

#: Bits of a field element in the garbled circuit (p < 2^41).
FIELD_BITS = 41
#: User sessions a server keeps links for; the oldest is dropped first.
MAX_USER_SESSIONS = 64
_LABEL = np.dtype("<u8")

#: Called with (sender, kind, payload) for every message a party opens: an audit of what it learns.
Recorder = Callable[[str, str, bytes], None]


class SecoStepError(ProtocolError):
    """A protocol step that does not exist for this server, or not now."""

    code = "seco_step"


def step_token(name: str, query: str) -> bytes:
    """What A seals to a remote server to run step ``name`` of ``query``."""
    return f"{name}\n{query}".encode()


def labels_to_bytes(labels: np.ndarray) -> bytes:
    return np.ascontiguousarray(labels, dtype=_LABEL).tobytes()


def labels_from_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Raises: LinkError — not ``shape`` labels."""
    if len(data) != 8 * int(np.prod(shape)):
        raise LinkError("a label message of the wrong size")
    return np.frombuffer(data, dtype=_LABEL).reshape(shape)


@dataclass
class _Query:
    """One query's state at this server, from its offline steps to its output share."""

    relu_masks: list[np.ndarray]  # r'_X per ReLU layer (this server's share of −r_{k+1})
    s: list[np.ndarray] = field(default_factory=list)  # row sums of this server's product masks
    keys: list[GarblerKeys] = field(default_factory=list)  # B
    garbled: list[GarbledCircuit] = field(default_factory=list)  # C
    a_labels: list[np.ndarray] = field(default_factory=list)  # C: A's input labels per ReLU
    layer: int = 0
    m: np.ndarray | None = None  # the masked input of the current layer


class RemoteServer:
    """B or C: holds one additive share of every layer's weights and biases.

    Args:
        name: ``"B"`` (garbler) or ``"C"`` (evaluator).
        architecture: the model's public shapes and number format.
        weights, biases: this server's shares mod p, per layer.
        key: this server's long-term signing key.
        peers: the public keys of the parties that may open links to it (A, U, and for C, B)
            and, for B, C's (B opens the B–C link).
        engine: this server's HE side process.
        recorder: called with every message this server opens (an audit of what it learns).
    """

    def __init__(
        self,
        name: str,
        architecture: SecoArchitecture,
        weights: Sequence[np.ndarray],
        biases: Sequence[np.ndarray],
        key: SigningKey,
        peers: Mapping[str, bytes],
        engine: HeSidecar,
        *,
        recorder: Recorder | None = None,
    ) -> None:
        if name not in ("B", "C"):
            raise ConfigurationError(f"a remote server is B or C, not {name!r}")
        shapes = tuple(np.asarray(w).shape for w in weights)
        if shapes != architecture.layer_shapes or [len(b) for b in biases] != [o for o, _ in shapes]:
            raise ConfigurationError("the weight shares do not match the model's architecture")
        p = architecture.prime
        if any(np.asarray(a).min() < 0 or np.asarray(a).max() >= p for a in (*weights, *biases)):
            raise ConfigurationError("the weight shares are not field elements mod p")
        self.name, self.architecture, self.p = name, architecture, architecture.prime
        self.weights, self.biases = [np.asarray(w) for w in weights], [np.asarray(b) for b in biases]
        # Python integers for W·m mod p (41-bit × 41-bit products overflow int64), made once.
        self._exact_weights = [w.astype(object) for w in self.weights]
        self._key, self._peers = key, dict(peers)
        self._responder = LinkResponder(key, name, {k: v for k, v in peers.items() if k != "C"})
        self._links: dict[str, Link] = {}
        self._user_links: OrderedDict[str, Link] = OrderedDict()
        self._initiator: LinkInitiator | None = None
        self.he = HeParty(engine, modulus=self.p)
        self.packing: PackedLayers | None = None
        self.circuit = relu3_circuit(architecture.frac_bits if architecture.truncate else 0)
        self._ot_senders: dict[str, OtExtensionSender] = {}  # B, per chooser (A, C)
        self._ot_receiver: OtExtensionReceiver | None = None  # C
        self._queries: dict[str, _Query] = {}
        self._lock = threading.Lock()
        self._recorder = recorder
        self.received: list[tuple[str, str]] = []  # (sender, kind) of every message opened

    # --- links --------------------------------------------------------------------------------

    def accept(self, hello: bytes) -> bytes:
        """Answer a link handshake from A, U or (at C) B.

        Raises:
            LinkError: an unknown or unauthentic peer.
        """
        with self._lock:
            reply, link = self._responder.accept(hello)
            if link.peer == "U":
                self._user_links[link.session] = link
                while len(self._user_links) > MAX_USER_SESSIONS:
                    self._user_links.popitem(last=False)
            else:
                self._links[link.peer] = link
            return reply

    def _link(self, peer: str, query: str) -> Link:
        link = self._user_links.get(query) if peer == "U" else self._links.get(peer)
        if link is None:
            raise LinkError(f"{self.name} has no link with {peer}" + (" for this session" if peer == "U" else ""))
        return link

    def _open(self, message: bytes, sender: str | tuple[str, ...], kind: str, query: str) -> tuple[str, bytes]:
        """(sender, payload) of a message from ``sender`` (or one of several) of ``kind``."""
        claimed, to, _, _ = peek(message)
        allowed = (sender,) if isinstance(sender, str) else sender
        if claimed not in allowed or to != self.name:
            raise LinkError(f"expected a {kind!r} message from {' or '.join(allowed)} to {self.name}")
        payload = self._link(claimed, query).open(message, kind)
        self.received.append((claimed, kind))
        if self._recorder is not None:
            self._recorder(claimed, kind, payload)
        return claimed, payload

    def _seal(self, peer: str, kind: str, payload: bytes, query: str = "") -> bytes:
        return self._link(peer, query).seal(kind, payload)

    # --- the step dispatcher ------------------------------------------------------------------

    def step(self, name: str, query: str, messages: Sequence[bytes]) -> list[bytes]:
        """Run protocol step ``name`` for user session ``query`` on ``messages``; the messages out.

        Raises:
            SecoStepError: no such step for this server, or one out of order.
            LinkError: a message not authentic, replayed, or not the one expected.
        """
        handler = _STEPS.get((self.name, name))
        if handler is None:
            raise SecoStepError(f"server {self.name} has no step {name!r}")
        with self._lock:
            if not messages:
                raise SecoStepError("a step starts with the gateway's step token")
            # Only A drives a server: the token, sealed on the A link (so in order and never
            # replayed), names this step and this query.
            _, token = self._open(messages[0], "A", "step", query)
            if token != step_token(name, query):
                raise SecoStepError("the gateway's step token names another step or query")
            return handler(self, query, list(messages[1:]))

    def _expect(self, messages: list[bytes], count: int) -> None:
        if len(messages) != count:
            raise SecoStepError(f"expected {count} messages, got {len(messages)}")

    def _query(self, query: str) -> _Query:
        state = self._queries.get(query)
        if state is None:
            raise SecoStepError("no offline state for this query: run the offline phase first")
        return state

    def _port(self, name: str) -> tuple[int, ...]:
        return next(port.wires for port in self.circuit.inputs if port.name == name)

    # --- set-up -------------------------------------------------------------------------------

    def _link_start(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 0)
        session = secrets.token_hex(16)
        self._initiator = LinkInitiator(self._key, "B", PartyIdentity("C", self._peers["C"]), session)
        return [self._initiator.hello()]

    def _link_finish(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        if self._initiator is None:
            raise SecoStepError("link-start first")
        self._links["C"] = self._initiator.finish(messages[0])
        self._initiator = None
        return []

    def _he_keygen(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 2)
        _, context = self._open(messages[0], "A", "he-context", query)
        previous_party = "A" if self.name == "B" else "B"
        _, previous = self._open(messages[1], previous_party, "he-public-key", query)
        self.he.load_context(context)
        self.packing = PackedLayers(self.architecture.layer_shapes, self.he.slots)
        public = self.he.keygen(previous)
        if self.name == "B":
            return [self._seal("C", "he-public-key", public)]
        self.he.set_public_key(public)  # C's is the joint key
        return [self._seal("A", "he-joint-key", public), self._seal("B", "he-joint-key", public)]

    def _he_joint_key(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        self.he.set_public_key(self._open(messages[0], "C", "he-joint-key", query)[1])
        return []

    def _ot_base(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        chooser, first = self._open(messages[0], ("A", "C"), "ot-base", query)
        sender = OtExtensionSender(f"seco/{chooser}-B".encode())
        reply = sender.base_reply(first)
        self._ot_senders[chooser] = sender
        return [self._seal(chooser, "ot-base-reply", reply)]

    def _ot_base_start(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 0)
        self._ot_receiver = OtExtensionReceiver(b"seco/C-B")
        return [self._seal("B", "ot-base", self._ot_receiver.base_message())]

    def _ot_base_finish(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        if self._ot_receiver is None:
            raise SecoStepError("ot-base-start first")
        self._ot_receiver.finish_base(self._open(messages[0], "B", "ot-base-reply", query)[1])
        return []

    # --- offline ------------------------------------------------------------------------------

    def _packing(self) -> PackedLayers:
        if self.packing is None:
            raise SecoStepError("no HE keys yet: the gateway sets them up first")
        return self.packing

    def _offline_encrypt(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        packing = self._packing()
        r0 = unvec(self._open(messages[0], "U", "mask-share", query)[1], self.architecture.n_inputs, self.p)
        relu_masks = [uniform_mod(self.p, n) for n in self.architecture.relu_widths]
        self._queries[query] = _Query(relu_masks)
        while len(self._queries) > MAX_USER_SESSIONS:  # abandoned queries (a failed one, a user gone)
            del self._queries[next(iter(self._queries))]
        # This server's share of every layer's mask: r0's for the first, −r'_X for the others.
        vectors = [r0] + [(-r) % self.p for r in relu_masks]
        return [self._seal("A", "he-mask-ct", pack(self.he.encrypt_masks(packing, vectors)))]

    def _offline_products(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        packing, state = self._packing(), self._query(query)
        enc_r = unpack(self._open(messages[0], "A", "he-enc-r", query)[1], expect=packing.ciphertexts)
        products, state.s = self.he.masked_products(packing, self.weights, enc_r)
        return [self._seal("A", "he-product", pack(products))]

    def _offline_decrypt(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        packing, state = self._packing(), self._query(query)
        totals = unpack(self._open(messages[0], "A", "he-total", query)[1], expect=packing.ciphertexts)
        out = [self._seal("A", "he-partial", pack(self.he.partial_decrypt(totals)))]
        if self.name == "B":  # the garbler: one relu_3 circuit per value of every ReLU layer
            for n in self.architecture.relu_widths:
                garbled, keys = garble(self.circuit, n)
                state.keys.append(keys)
                out.append(self._seal("C", "relu-tables", garbled.to_bytes()))
        return out

    def _ot_respond(self, chooser: str, request: bytes, zero: np.ndarray, one: np.ndarray) -> bytes:
        sender = self._ot_senders.get(chooser)
        if sender is None:
            raise SecoStepError(f"no base OTs with {chooser} yet")
        return sender.respond(request, zero.reshape(-1, 2), one.reshape(-1, 2))

    def _ot_respond_a(self, query: str, messages: list[bytes]) -> list[bytes]:
        """A's labels of every ReLU layer in one OT batch, layer after layer."""
        self._expect(messages, 1)
        state = self._query(query)
        if len(state.keys) != len(self.architecture.relu_widths):
            raise SecoStepError("garble first (offline-decrypt)")
        wires = self._port("y_A") + self._port("r_A")
        pairs = [keys.label_pairs(wires) for keys in state.keys]
        zero = np.concatenate([z.reshape(-1, 2) for z, _ in pairs])
        one = np.concatenate([o.reshape(-1, 2) for _, o in pairs])
        request = self._open(messages[0], "A", "ot-request", query)[1]
        return [self._seal("A", "ot-response", self._ot_respond("A", request, zero, one))]

    def _offline_labels(self, query: str, messages: list[bytes]) -> list[bytes]:
        widths = self.architecture.relu_widths
        self._expect(messages, 2 * len(widths))
        state = self._query(query)
        a_wires = len(self._port("y_A") + self._port("r_A"))
        for n, tables in zip(widths, messages[: len(widths)], strict=True):
            state.garbled.append(
                GarbledCircuit.from_bytes(self.circuit, n, self._open(tables, "B", "relu-tables", query)[1])
            )
        for n, labels in zip(widths, messages[len(widths) :], strict=True):
            state.a_labels.append(labels_from_bytes(self._open(labels, "A", "relu-labels", query)[1], (a_wires, n, 2)))
        return []

    # --- online -------------------------------------------------------------------------------

    def _online_layer(self, query: str, messages: list[bytes]) -> list[bytes]:
        state = self._query(query)
        k, shapes = state.layer, self.architecture.layer_shapes
        n_in = shapes[k][1]
        if k == 0:
            self._expect(messages, 1)
            state.m = unvec(self._open(messages[0], "A", "masked-input", query)[1], n_in, self.p)
        elif self.name == "B":
            self._expect(messages, 1)
            state.m = unvec(self._open(messages[0], "C", "masked-input", query)[1], n_in, self.p)
        else:
            self._expect(messages, 0)  # C computed this layer's masked input itself
        if state.m is None or len(state.s) != len(shapes):
            raise SecoStepError("the offline phase of this query is incomplete")
        w = self._exact_weights[k]
        y = np.array((w @ state.m.astype(object) + state.s[k] + self.biases[k]) % self.p, dtype=np.int64)
        if k == len(shapes) - 1:
            del self._queries[query]  # one query, one use of its masks
            return [self._seal("U", "output-share", vec(y), query)]
        if self.name == "B":
            bits = np.concatenate([words_to_bits(y, FIELD_BITS), words_to_bits(state.relu_masks[k], FIELD_BITS)])
            labels = state.keys[k].active_labels(self._port("y_B") + self._port("r_B"), bits)
            state.layer += 1
            return [self._seal("C", "relu-labels", labels_to_bytes(labels))]
        if self._ot_receiver is None:
            raise SecoStepError("no base OTs with B yet")
        state.m = None  # the next one comes out of the garbled ReLU
        return [self._seal("B", "ot-request", self._ot_receiver.request(words_to_bits(y, FIELD_BITS).ravel()))]

    def _ot_respond_c(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 1)
        state = self._query(query)
        if not 0 < state.layer <= len(state.keys):
            raise SecoStepError("no ReLU layer waits for C's labels")
        keys = state.keys[state.layer - 1]  # online-layer has moved B on to the next layer
        request = self._open(messages[0], "C", "ot-request", query)[1]
        zero, one = keys.label_pairs(self._port("y_C"))
        return [self._seal("C", "ot-response", self._ot_respond("C", request, zero, one))]

    def _evaluate(self, query: str, messages: list[bytes]) -> list[bytes]:
        self._expect(messages, 2)
        state = self._query(query)
        k = state.layer
        if k >= len(state.garbled) or self._ot_receiver is None:
            raise SecoStepError("nothing to evaluate")
        n = self.architecture.relu_widths[k]
        b_wires = self._port("y_B") + self._port("r_B")
        b_labels = labels_from_bytes(self._open(messages[0], "B", "relu-labels", query)[1], (len(b_wires), n, 2))
        response = self._open(messages[1], "B", "ot-response", query)[1]
        c_wires = self._port("y_C")
        c_labels = self._ot_receiver.receive(response).reshape(len(c_wires), n, 2)
        labels = np.empty((self.circuit.n_inputs, n, 2), dtype=_LABEL)
        labels[list(self._port("y_A") + self._port("r_A"))] = state.a_labels[k]
        labels[list(b_wires)] = b_labels
        labels[list(c_wires)] = c_labels
        out = bits_to_words(evaluate(self.circuit, state.garbled[k], labels)).astype(np.int64)
        state.m = (out + state.relu_masks[k]) % self.p  # ReLU(y) + r'ᴬ + r'ᴮ + r'ᶜ
        state.layer += 1
        return [self._seal("B", "masked-input", vec(state.m))]


_Step = Callable[[RemoteServer, str, list[bytes]], list[bytes]]
_STEPS: dict[tuple[str, str], _Step] = {
    ("B", "link-start"): RemoteServer._link_start,
    ("B", "link-finish"): RemoteServer._link_finish,
    ("B", "he-keygen"): RemoteServer._he_keygen,
    ("C", "he-keygen"): RemoteServer._he_keygen,
    ("B", "he-joint-key"): RemoteServer._he_joint_key,
    ("B", "ot-base"): RemoteServer._ot_base,
    ("C", "ot-base-start"): RemoteServer._ot_base_start,
    ("C", "ot-base-finish"): RemoteServer._ot_base_finish,
    ("B", "offline-encrypt"): RemoteServer._offline_encrypt,
    ("C", "offline-encrypt"): RemoteServer._offline_encrypt,
    ("B", "offline-products"): RemoteServer._offline_products,
    ("C", "offline-products"): RemoteServer._offline_products,
    ("B", "offline-decrypt"): RemoteServer._offline_decrypt,
    ("C", "offline-decrypt"): RemoteServer._offline_decrypt,
    ("B", "ot-respond-a"): RemoteServer._ot_respond_a,
    ("C", "offline-labels"): RemoteServer._offline_labels,
    ("B", "online-layer"): RemoteServer._online_layer,
    ("C", "online-layer"): RemoteServer._online_layer,
    ("B", "ot-respond-c"): RemoteServer._ot_respond_c,
    ("C", "evaluate"): RemoteServer._evaluate,
}
