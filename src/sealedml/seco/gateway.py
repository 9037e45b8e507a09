"""The gateway A of SECO mode: the user's only contact, the lead of the threshold HE, the driver.

A holds no weights. It runs each query's steps on the remote servers B and C
(:class:`RemoteHandle`: in this process or over HTTP), relays the sealed messages they
address to each other or to the user, and adds its own part: its share of every mask, the
sums and the fusion of the threshold decryption (which give it W·r − s_B − s_C, uniformly
masked), and, by OT, the garbled-circuit labels of its inputs.

Set-up happens once, before the first user session (and again after any failure, since a
failed step can leave a link or an OT batch half used): the A–B, A–C and B–C links, the
3-party key generation, and the base OTs of A–B and C–B. Queries run one at a time.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

from sealedml.crypto import SigningKey
from sealedml.errors import ConfigurationError
from sealedml.seco.gc.circuit import words_to_bits
from sealedml.seco.gc.ot import OtExtensionReceiver
from sealedml.seco.gc.relu import relu3_circuit
from sealedml.seco.he.client import HeSidecar
from sealedml.seco.he.packing import PackedLayers, uniform_mod
from sealedml.seco.he.threshold import HeParty
from sealedml.seco.link import Link, LinkError, LinkInitiator, LinkResponder, PartyIdentity, peek
from sealedml.seco.model import SecoArchitecture
from sealedml.seco.remote import (
    FIELD_BITS,
    MAX_USER_SESSIONS,
    Recorder,
    RemoteServer,
    SecoStepError,
    labels_to_bytes,
    step_token,
)
from sealedml.seco.wire import pack, unpack, unvec, vec

__all__ = ["LINKS", "Gateway", "LocalRemote", "Own", "RemoteHandle", "link_name"]

#: The links, named by their two ends.
LINKS = ("U-A", "U-B", "U-C", "A-B", "A-C", "B-C")
_ORDER = "UABC"
T = TypeVar("T")


def link_name(one: str, other: str) -> str:
    """The link between two parties, named in U, A, B, C order."""
    first, second = sorted((one, other), key=_ORDER.index)
    return f"{first}-{second}"


class RemoteHandle(Protocol):
    """How A reaches B or C: a link handshake, and protocol steps."""

    def hello(self, message: bytes) -> bytes: ...

    def step(self, name: str, query: str, messages: Sequence[bytes]) -> list[bytes]: ...


class LocalRemote:
    """A remote server in this process (tests, benchmarks)."""

    def __init__(self, server: RemoteServer) -> None:
        self.server = server

    def hello(self, message: bytes) -> bytes:
        return self.server.accept(message)

    def step(self, name: str, query: str, messages: Sequence[bytes]) -> list[bytes]:
        return self.server.step(name, query, messages)


@dataclass(frozen=True)
class Own:
    """A message of A's own for the server being called, sealed when the step is sent."""

    kind: str
    payload: bytes


@dataclass
class _Query:
    a: list[np.ndarray]  # A's share W·r − s_B − s_C of every layer's product
    relu_masks: list[np.ndarray]  # r'ᴬ per ReLU layer


class Gateway:
    """A, holding its HE engine, its links and the handles of B and C.

    Args:
        architecture: the model's public shapes and number format (A holds no weights).
        key: A's long-term signing key.
        peers: the public keys of B, C and U (the user A accepts sessions from).
        engine: A's HE side process.
        remotes: handles of B and C.
        recorder: called with every message A opens.
        noise_flooding: flood partial decryptions with noise (see :class:`~sealedml.seco.he.ThresholdSession`).
    """

    def __init__(
        self,
        architecture: SecoArchitecture,
        key: SigningKey,
        peers: Mapping[str, bytes],
        engine: HeSidecar,
        remotes: Mapping[str, RemoteHandle],
        *,
        recorder: Recorder | None = None,
        noise_flooding: bool = True,
    ) -> None:
        if set(remotes) != {"B", "C"} or not {"B", "C", "U"} <= set(peers):
            raise ConfigurationError("the gateway needs B's and C's handles and B's, C's and U's public keys")
        self.architecture, self.p = architecture, architecture.prime
        self._key, self._peers, self.remotes = key, dict(peers), dict(remotes)
        self._responder = LinkResponder(key, "A", {"U": peers["U"]})
        self.he = HeParty(engine, modulus=self.p, lead=True)
        self.circuit = relu3_circuit(architecture.frac_bits if architecture.truncate else 0)
        self._noise_flooding = noise_flooding
        self._links: dict[str, Link] = {}
        self._user_links: OrderedDict[str, Link] = OrderedDict()
        self._ot: OtExtensionReceiver | None = None
        self._packing: PackedLayers | None = None
        self._queries: dict[str, _Query] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(3, thread_name_prefix="seco-gateway")
        self._recorder = recorder
        self.received: list[tuple[str, str]] = []
        #: Bytes delivered on each link (handshakes included) since start.
        self.traffic: Counter[str] = Counter({name: 0 for name in LINKS})
        self._traffic_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- messages -----------------------------------------------------------------------------

    def _count(self, messages: Sequence[bytes]) -> None:
        for message in messages:
            try:
                sender, receiver, _, _ = peek(message)
            except LinkError:  # a handshake message: counted where the handshake runs
                continue
            with self._traffic_lock:  # B's and C's parts of a step run in two threads
                self.traffic[link_name(sender, receiver)] += len(message)

    def _call(self, party: str, step: str, query: str, messages: Sequence[bytes | Own]) -> list[bytes]:
        """Run ``step`` at B or C with ``messages`` (each delivered there: counted here).

        The first message is A's step token, sealed on the A link: only A drives a server.
        A's own messages (:class:`Own`) are sealed after it, in order, so the server opens
        them in the order they were sealed; relayed ones arrive sealed by their senders.
        """
        sent = [self._seal(party, "step", step_token(step, query))]  # sealed first: opened first
        sent += [self._seal(party, m.kind, m.payload) if isinstance(m, Own) else m for m in messages]
        self._count(sent)
        return self.remotes[party].step(step, query, sent)

    def _link(self, peer: str, query: str) -> Link:
        link = self._user_links.get(query) if peer == "U" else self._links.get(peer)
        if link is None:
            raise LinkError(f"A has no link with {peer}" + (" for this session" if peer == "U" else ""))
        return link

    def _open(self, message: bytes, sender: str, kind: str, query: str = "") -> bytes:
        claimed, receiver, _, _ = peek(message)
        if (claimed, receiver) != (sender, "A"):
            raise LinkError(f"expected a {kind!r} message from {sender} to A")
        payload = self._link(sender, query).open(message, kind)
        with self._traffic_lock:
            self.traffic[link_name(sender, "A")] += len(message)
        self.received.append((sender, kind))
        if self._recorder is not None:
            self._recorder(sender, kind, payload)
        return payload

    def _seal(self, peer: str, kind: str, payload: bytes, query: str = "") -> bytes:
        return self._link(peer, query).seal(kind, payload)

    def _both(self, b: Callable[[], T], c: Callable[[], T], own: Callable[[], object] | None = None) -> tuple[T, T]:
        """Run B's and C's parts (and A's own) at once, as on three hosts."""
        futures: list[Future[object]] = [self._pool.submit(b), self._pool.submit(c)]
        if own is not None:
            futures.append(self._pool.submit(own))
        results = [f.result() for f in futures]  # every part finishes (or fails) before we go on
        return results[0], results[1]  # type: ignore[return-value]

    # --- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Links, joint HE key and base OTs (once; again after a failure)."""
        with self._lock:
            if self._ot is not None:
                return
            try:
                self._setup()
            except BaseException:
                self._ot = None
                raise

    def _setup(self) -> None:
        session = secrets.token_hex(16)
        for party in ("B", "C"):
            initiator = LinkInitiator(self._key, "A", PartyIdentity(party, self._peers[party]), session)
            hello = initiator.hello()
            reply = self.remotes[party].hello(hello)
            self._links[party] = initiator.finish(reply)
            self.traffic[f"A-{party}"] += len(hello) + len(reply)
        (hello,) = self._call("B", "link-start", "", [])
        reply = self.remotes["C"].hello(hello)
        self._call("B", "link-finish", "", [reply])
        self.traffic["B-C"] += len(hello) + len(reply)
        # 3-party key generation along A → B → C; C's public key is the joint one.
        context = self.he.new_context(self._noise_flooding)
        self.he.load_context(context)
        self._packing = PackedLayers(self.architecture.layer_shapes, self.he.slots)
        pk_a = self.he.keygen()
        (to_c,) = self._call("B", "he-keygen", "", [Own("he-context", context), Own("he-public-key", pk_a)])
        to_a, to_b = self._call("C", "he-keygen", "", [Own("he-context", context), to_c])
        self.he.set_public_key(self._open(to_a, "C", "he-joint-key"))
        self._call("B", "he-joint-key", "", [to_b])
        # Base OTs of A–B and C–B (IKNP extension serves every later batch).
        ot = OtExtensionReceiver(b"seco/A-B")
        (reply,) = self._call("B", "ot-base", "", [Own("ot-base", ot.base_message())])
        ot.finish_base(self._open(reply, "B", "ot-base-reply"))
        (to_b,) = self._call("C", "ot-base-start", "", [])
        (to_c,) = self._call("B", "ot-base", "", [to_b])
        self._call("C", "ot-base-finish", "", [to_c])
        self._ot = ot

    def _guarded(self, run: Callable[[], T]) -> T:
        """Run a phase under the lock; after any failure, set up afresh next time."""
        with self._lock:
            try:
                return run()
            except BaseException:
                self._ot = None  # a half-done step may have desynchronized a link or an OT batch
                raise

    # --- the user's calls ---------------------------------------------------------------------

    def open_session(self, hellos: Sequence[bytes]) -> list[bytes]:
        """Handshake U's links with A, B and C (hellos in that order); the three answers.

        Raises:
            LinkError: a hello not from the known user, or not for its party.
        """
        if len(hellos) != 3:
            raise SecoStepError("a session opens with three hellos: for A, B and C")

        def run() -> list[bytes]:
            self.setup()
            reply, link = self._responder.accept(hellos[0])
            self._user_links[link.session] = link
            while len(self._user_links) > MAX_USER_SESSIONS:
                self._user_links.popitem(last=False)
            replies = [reply, self.remotes["B"].hello(hellos[1]), self.remotes["C"].hello(hellos[2])]
            for party, hello, answer in zip("ABC", hellos, replies, strict=True):
                self.traffic[f"U-{party}"] += len(hello) + len(answer)
            return replies

        return self._guarded(run)

    def offline(self, query: str, messages: Sequence[bytes]) -> list[bytes]:
        """The input-independent phase of one query; ``messages``: U's mask shares for A, B, C."""
        return self._guarded(lambda: self._offline(query, messages))

    def _offline(self, query: str, messages: Sequence[bytes]) -> list[bytes]:
        self.setup()
        if len(messages) != 3:
            raise SecoStepError("the offline phase takes U's three mask shares")
        packing, ot = self._packing, self._ot
        assert packing is not None and ot is not None
        n_in, widths = self.architecture.n_inputs, self.architecture.relu_widths
        r0 = unvec(self._open(messages[0], "U", "mask-share", query), n_in, self.p)
        relu_masks = [uniform_mod(self.p, n) for n in widths]
        vectors = [r0] + [(-r) % self.p for r in relu_masks]
        own: list[list[bytes]] = []
        from_b, from_c = self._both(
            lambda: self._call("B", "offline-encrypt", query, [messages[1]]),
            lambda: self._call("C", "offline-encrypt", query, [messages[2]]),
            lambda: own.append(self.he.encrypt_masks(packing, vectors)),
        )
        n_ct = packing.ciphertexts
        enc_r = self.he.add_each(
            own[0],
            unpack(self._open(from_b[0], "B", "he-mask-ct"), expect=n_ct),
            unpack(self._open(from_c[0], "C", "he-mask-ct"), expect=n_ct),
        )
        enc_r_blob = pack(enc_r)
        from_b, from_c = self._both(
            lambda: self._call("B", "offline-products", query, [Own("he-enc-r", enc_r_blob)]),
            lambda: self._call("C", "offline-products", query, [Own("he-enc-r", enc_r_blob)]),
        )
        totals = self.he.add_each(
            unpack(self._open(from_b[0], "B", "he-product"), expect=n_ct),
            unpack(self._open(from_c[0], "C", "he-product"), expect=n_ct),
        )
        totals_blob = pack(totals)
        mine: list[list[bytes]] = []
        from_b, from_c = self._both(
            lambda: self._call("B", "offline-decrypt", query, [Own("he-total", totals_blob)]),
            lambda: self._call("C", "offline-decrypt", query, [Own("he-total", totals_blob)]),
            lambda: mine.append(self.he.partial_decrypt(totals)),
        )
        partials = [
            mine[0],
            unpack(self._open(from_b[0], "B", "he-partial"), expect=n_ct),
            unpack(self._open(from_c[0], "C", "he-partial"), expect=n_ct),
        ]
        a = self.he.fuse_rows(packing, partials)
        tables = from_b[1:]  # B's garbled ReLUs, sealed for C
        # A's input labels (its product share and its ReLU mask) of every ReLU layer, one OT batch.
        bits = [
            np.concatenate([words_to_bits(a[k], FIELD_BITS), words_to_bits(relu_masks[k], FIELD_BITS)]).ravel()
            for k in range(len(widths))
        ]
        if widths:
            request = Own("ot-request", ot.request(np.concatenate(bits)))
            (response,) = self._call("B", "ot-respond-a", query, [request])
            labels = ot.receive(self._open(response, "B", "ot-response"))
            wires, start, forwarded = 2 * FIELD_BITS, 0, []
            for n in widths:
                chunk = labels[start : start + wires * n].reshape(wires, n, 2)
                start += wires * n
                forwarded.append(Own("relu-labels", labels_to_bytes(chunk)))
            self._call("C", "offline-labels", query, [*tables, *forwarded])
        self._queries[query] = _Query(a, relu_masks)
        while len(self._queries) > MAX_USER_SESSIONS:
            del self._queries[next(iter(self._queries))]
        return []

    def online(self, query: str, messages: Sequence[bytes]) -> list[bytes]:
        """From U's masked input to the three output shares, sealed for U (A's, B's, C's)."""
        return self._guarded(lambda: self._online(query, messages))

    def _online(self, query: str, messages: Sequence[bytes]) -> list[bytes]:
        if len(messages) != 1:
            raise SecoStepError("the online phase takes U's masked input")
        state = self._queries.pop(query, None)
        if state is None:
            raise SecoStepError("no offline phase for this query: run it first (each is used once)")
        masked = unvec(self._open(messages[0], "U", "masked-input", query), self.architecture.n_inputs, self.p)
        inbox_b: Sequence[bytes | Own] = [Own("masked-input", vec(masked))]
        inbox_c: Sequence[bytes | Own] = [Own("masked-input", vec(masked))]
        last = len(self.architecture.layer_shapes) - 1
        for k in range(last + 1):
            out_b, out_c = self._both(
                partial(self._call, "B", "online-layer", query, inbox_b),
                partial(self._call, "C", "online-layer", query, inbox_c),
            )
            if k == last:
                shares = [self._seal("U", "output-share", vec(state.a[k]), query), *out_b, *out_c]
                self._count(shares)
                return shares
            response = self._call("B", "ot-respond-c", query, out_c)  # C's labels by OT
            inbox_b, inbox_c = self._call("C", "evaluate", query, [*out_b, *response]), []
        raise AssertionError("unreachable")
