"""SECO's linear layers under 3-party threshold BFV: key generation and one masked product.

Parties: A (the gateway, lead of the key generation and the one who fuses decryptions),
B and C (the remote servers, each holding an additive share W_B, W_C of W mod t). The
offline step of a linear layer, for a fresh mask r = r_A + r_B + r_C:

1. each party encrypts its share of r, replicated into every block, under the joint key;
   A adds the three ciphertexts (Enc(r)) and hands the sum to B and C;
2. B and C each compute Enc(W_X ⊙ r − S_X): one plaintext–ciphertext product puts W_ij·r_j
   in slot (i, j) (``MatvecLayout``), minus a uniform mask S_X over *every* slot; each
   sends it to A, who adds them;
3. all three produce partial decryptions (A the lead, each with noise flooding when the
   context was made with it) and A fuses them: W_ij·r_j − S_B,ij − S_C,ij, uniform at every
   slot, and sums each row: W·r − s_B − s_C with s_X = Σ_j S_X,ij.

A keeps W·r − s, B keeps s_B, C keeps s_C. (SECO's code instead sums each row under
encryption with rotations; since A decrypts only masked slots either way, summing after
decryption gives A nothing more and saves the joint rotation keys — 76 MB per server link —
and most of the time. ``rotate=True`` keeps SECO's way.) Online, with x − r known to
B and C, the shares W_B(x−r) + s_B, W_C(x−r) + s_C and W·r − s add up to W·x mod t. No
party sees r, W or W·r, and any two together still miss the third's secret-key share, mask
or weight share.

:class:`ThresholdSession` runs all three parties' engines side by side, in one process,
for tests and benchmarks; the SECO servers call the same engine operations over their
authenticated links.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sealedml.seco.he.client import HeEngineError, HeSidecar
from sealedml.seco.he.packing import MatvecLayout, PackedLayers, uniform_mod

__all__ = ["SECO_MODULUS", "HeParty", "LinearShares", "ThresholdSession"]

#: SECO's plaintext modulus: the 41-bit prime of the authors' code.
SECO_MODULUS = 2061584302081


@dataclass(frozen=True)
class LinearShares:
    """The outcome of one offline linear step: each party's additive share of W·r.

    ``a`` = W·r − s_B − s_C (A's), ``b`` = s_B, ``c`` = s_C, and ``r_shares`` the three mask
    shares (each party knows only its own).
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    r_shares: tuple[np.ndarray, np.ndarray, np.ndarray]


class HeParty:
    """One party's own part of the threshold scheme: its engine and what it alone computes.

    A (``lead=True``) makes the context, adds ciphertexts and fuses decryptions; B and C hold
    weight shares and multiply. Masks a party draws stay inside it: :meth:`masked_products`
    returns only their row sums, which are that party's output shares. The SECO servers
    (:mod:`sealedml.seco.remote`, :mod:`sealedml.seco.gateway`) and :class:`ThresholdSession`
    call these same methods; only how the blobs travel differs.
    """

    def __init__(self, engine: HeSidecar, *, modulus: int = SECO_MODULUS, lead: bool = False) -> None:
        self.engine, self.modulus, self.lead = engine, modulus, lead
        self.slots = 0

    def new_context(self, noise_flooding: bool = True) -> bytes:
        """The lead's crypto context (parameters only, no keys), to load everywhere."""
        _, (context,) = self.engine.call(
            "context_new", {"plaintext_modulus": self.modulus, "noise_flooding": noise_flooding}
        )
        return context

    def load_context(self, context: bytes) -> None:
        info, _ = self.engine.call("context_load", blobs=[context])
        if int(info["plaintext_modulus"]) != self.modulus:
            raise HeEngineError("malformed", "the context has another plaintext modulus")
        self.slots = int(info["ring_dimension"])

    def keygen(self, previous: bytes | None = None) -> bytes:
        """This party's key share; returns the public key joint with ``previous`` (the chain so far)."""
        _, (public,) = self.engine.call("keygen", blobs=[previous] if previous is not None else [])
        return public

    def set_public_key(self, joint: bytes) -> None:
        self.engine.call("set_public_key", blobs=[joint])

    def encrypt_masks(self, packing: PackedLayers, vectors: list[np.ndarray]) -> list[bytes]:
        """Enc of this party's share of every layer's mask, replicated under its rows."""
        return [self.engine.call("encrypt", {"values": plane})[1][0] for plane in packing.replicate(vectors)]

    def add_each(self, *groups: Sequence[bytes]) -> list[bytes]:
        """Ciphertext i of every group added together, for each i (the lead's sums)."""
        return [self.engine.call("add", blobs=list(cts))[1][0] for cts in zip(*groups, strict=True)]

    def masked_products(
        self, packing: PackedLayers, weights: list[np.ndarray], enc_r: list[bytes]
    ) -> tuple[list[bytes], list[np.ndarray]]:
        """Enc(W ⊙ r − S) per ciphertext for this party's weight shares, S uniform over every slot.

        Returns the ciphertexts (for the lead) and, per layer, the row sums of S: this party's
        output share s of W·r − s.
        """
        masks = packing.random_masks(self.modulus)
        products = [
            self.engine.call("matvec", {"block": 1, "weights": w, "mask": m}, [ct])[1][0]
            for w, m, ct in zip(packing.weight_planes(weights), masks, enc_r, strict=True)
        ]
        return products, packing.row_sums(masks, self.modulus)

    def partial_decrypt(self, ciphertexts: list[bytes]) -> list[bytes]:
        """This party's (noise-flooded) partial decryption of each ciphertext."""
        return [self.engine.call("partial_decrypt", {"lead": self.lead}, [ct])[1][0] for ct in ciphertexts]

    def fuse_rows(self, packing: PackedLayers, partials: Sequence[Sequence[bytes]]) -> list[np.ndarray]:
        """The lead fuses every party's partials (its own first) and sums each row: W·r − s_B − s_C."""
        fused = []
        for shares in zip(*partials, strict=True):
            answer, _ = self.engine.call("fuse", {"length": self.slots}, list(shares))
            fused.append([int(v) for v in answer["values"]])
        return packing.row_sums(fused, self.modulus)


class ThresholdSession:
    """Three parties' HE engines with a joint key (A lead, B and C joining).

    Args:
        engines: A's, B's and C's side processes.
        modulus: the plaintext modulus t.
        noise_flooding: partial decryptions flooded with noise (OpenFHE's
            NOISE_FLOODING_MULTIPARTY: N = 16384 instead of 8192, slower, and what keeps a
            partial decryption from leaking its party's key share).
    """

    def __init__(
        self, engines: Sequence[HeSidecar], *, modulus: int = SECO_MODULUS, noise_flooding: bool = True
    ) -> None:
        if len(engines) != 3:
            raise ValueError("a session has exactly three parties")
        self.a, self.b, self.c = engines
        self.lead = HeParty(self.a, modulus=modulus, lead=True)
        self.holder_b, self.holder_c = HeParty(self.b, modulus=modulus), HeParty(self.c, modulus=modulus)
        self.modulus = modulus
        #: Bytes that cross each server link (both directions), as if the engines were remote.
        self.traffic = {"A-B": 0, "A-C": 0, "B-C": 0}
        context = self.lead.new_context(noise_flooding)
        for party in (self.lead, self.holder_b, self.holder_c):
            party.load_context(context)
        self.slots = self.lead.slots
        self.context_bytes = len(context)
        self._carry("A-B", context)
        self._carry("A-C", context)
        # Key generation, two rounds along A → B → C; C's public key is the joint one.
        pk_a = self.lead.keygen()
        pk_ab = self.holder_b.keygen(pk_a)
        pk_abc = self.holder_c.keygen(pk_ab)
        self._pk_ab, self._pk_abc = pk_ab, pk_abc
        self._carry("A-B", pk_a)
        self._carry("B-C", pk_ab, pk_abc)
        self._carry("A-C", pk_abc)
        for party in (self.lead, self.holder_b, self.holder_c):
            party.set_public_key(pk_abc)
        self._rotations: set[int] = set()
        self.rotation_key_bytes = 0

    def ensure_rotations(self, indices: Sequence[int]) -> None:
        """Joint rotation keys for ``indices`` (new ones only), inserted at B and C, who rotate."""
        missing = sorted(set(indices) - self._rotations)
        if not missing:
            return
        args = {"indices": missing}
        _, (map_a,) = self.a.call("rotation_keys", args)
        _, (map_b,) = self.b.call("rotation_keys", args, [map_a])
        _, (map_c,) = self.c.call("rotation_keys", args, [map_a])
        _, (joint_ab,) = self.a.call("add_rotation_keys", blobs=[map_a, map_b, self._pk_ab])
        _, (joint,) = self.a.call("add_rotation_keys", blobs=[joint_ab, map_c, self._pk_abc])
        for engine in (self.b, self.c):
            engine.call("insert_rotation_keys", blobs=[joint])
        self.rotation_key_bytes += len(map_a) + len(map_b) + len(map_c)
        self._carry("A-B", map_a, map_b, joint)
        self._carry("A-C", map_a, map_c, joint)
        self._rotations.update(missing)

    def _carry(self, link: str, *blobs: bytes) -> None:
        self.traffic[link] += sum(len(b) for b in blobs)

    def layout(self, n_in: int, n_out: int) -> MatvecLayout:
        return MatvecLayout(n_in, n_out, self.slots)

    def random_vector(self, n: int) -> np.ndarray:
        return uniform_mod(self.modulus, n)

    def offline_linear(
        self,
        w_b: np.ndarray,
        w_c: np.ndarray,
        r_shares: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        *,
        rotate: bool = False,
    ) -> LinearShares:
        """One offline linear step for W = W_B + W_C mod t (steps 1–3 of the module docstring).

        ``r_shares``: A's, B's and C's shares of the mask r (default: each drawn at random).
        ``rotate``: sum each row under encryption with joint rotation keys, as SECO's code does,
        instead of letting A sum the (all masked) products after decryption — the default,
        which needs no rotation keys and about half the time.
        """
        n_out, n_in = np.asarray(w_b).shape
        if r_shares is None:
            r_shares = (self.random_vector(n_in), self.random_vector(n_in), self.random_vector(n_in))
        if not rotate:
            return self.offline_layers([w_b], [w_c], [r_shares])[0]
        layout = self.layout(n_in, n_out)
        self.ensure_rotations(layout.rotations)
        block = layout.block
        with ThreadPoolExecutor(3) as pool:  # the three parties work at once, as on three hosts
            encrypted = list(
                pool.map(
                    lambda pair: pair[0].call("encrypt", {"values": layout.replicate(pair[1])})[1][0],
                    zip((self.a, self.b, self.c), r_shares, strict=True),
                )
            )
            _, (enc_r,) = self.a.call("add", blobs=encrypted)
            self._carry("A-B", encrypted[1], enc_r)
            self._carry("A-C", encrypted[2], enc_r)
            masks = {"b": layout.random_masks(self.modulus), "c": layout.random_masks(self.modulus)}

            def holder(engine: HeSidecar, weights: np.ndarray, mask: list[list[int]]) -> list[bytes]:
                return [
                    engine.call("matvec", {"block": block, "weights": w, "mask": m}, [enc_r])[1][0]
                    for w, m in zip(layout.weight_chunks(weights), mask, strict=True)
                ]

            from_b, from_c = pool.map(holder, (self.b, self.c), (w_b, w_c), (masks["b"], masks["c"]))
            fused = self._decrypt_sum(pool, from_b, from_c)
        a, b, c = layout.outputs(fused), layout.outputs(masks["b"]), layout.outputs(masks["c"])
        return LinearShares(a=a, b=b, c=c, r_shares=r_shares)

    def _decrypt_sum(self, pool: ThreadPoolExecutor, from_b: list[bytes], from_c: list[bytes]) -> list[list[int]]:
        """A adds B's and C's ciphertexts; all three decrypt partially; A fuses: the slot values."""
        fused = []
        for ct_b, ct_c in zip(from_b, from_c, strict=True):
            _, (total,) = self.a.call("add", blobs=[ct_b, ct_c])
            partials = list(
                pool.map(
                    lambda engine, lead, ct: engine.call("partial_decrypt", {"lead": lead}, [ct])[1][0],
                    (self.a, self.b, self.c),
                    (True, False, False),
                    (total, total, total),
                )
            )
            answer, _ = self.a.call("fuse", {"length": self.slots}, partials)
            self._carry("A-B", ct_b, total, partials[1])
            self._carry("A-C", ct_c, total, partials[2])
            fused.append([int(v) for v in answer["values"]])
        return fused

    def offline_layers(
        self,
        weights_b: list[np.ndarray],
        weights_c: list[np.ndarray],
        r_shares: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> list[LinearShares]:
        """The offline step of several layers at once, packed side by side (:class:`PackedLayers`).

        Layer k's mask shares ``r_shares[k]`` must be known up front — in SECO mode they are
        (the next layer's mask is drawn, not computed). Rows are summed after decryption. Each
        party's part is a :class:`HeParty` method, the same ones the SECO servers call.
        """
        packing = PackedLayers(tuple(np.asarray(w).shape for w in weights_b), self.slots)
        parties = (self.lead, self.holder_b, self.holder_c)
        with ThreadPoolExecutor(3) as pool:  # the three parties work at once, as on three hosts
            encrypted = list(
                pool.map(lambda party, i: party.encrypt_masks(packing, [s[i] for s in r_shares]), parties, range(3))
            )
            enc_r = self.lead.add_each(*encrypted)
            self._carry("A-B", *encrypted[1], *enc_r)
            self._carry("A-C", *encrypted[2], *enc_r)
            (from_b, s_b), (from_c, s_c) = pool.map(
                lambda party, w: party.masked_products(packing, w, enc_r),
                (self.holder_b, self.holder_c),
                (weights_b, weights_c),
            )
            totals = self.lead.add_each(from_b, from_c)
            partials = list(pool.map(lambda party: party.partial_decrypt(totals), parties))
            self._carry("A-B", *from_b, *totals, *partials[1])
            self._carry("A-C", *from_c, *totals, *partials[2])
        a = self.lead.fuse_rows(packing, partials)
        return [LinearShares(a[k], s_b[k], s_c[k], r_shares[k]) for k in range(len(weights_b))]
