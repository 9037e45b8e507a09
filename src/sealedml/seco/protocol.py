"""One SECO query, party by party: masks, threshold-HE linear layers, garbled ReLUs, output shares.

Parties (``docs/seco.md``): the user U talks only to the gateway A; the remote servers B and C
hold additive shares W_B + W_C = W (and b_B + b_C = b) of every layer. Every message between
two parties is sealed on their :class:`~sealedml.seco.link.Link` (A relays U's messages for
B and C, and B's and C's for each other, unread), so what each party receives is exactly
what its links deliver. Each party's code and state live in its own class —
:class:`~sealedml.seco.user.SecoUser`, :class:`~sealedml.seco.gateway.Gateway`,
:class:`~sealedml.seco.remote.RemoteServer` — and :class:`SecoParties` wires them together in
one process; ``sealedml seco serve`` runs the same classes as separate processes over HTTP.

Offline, per query (independent of the input):

* U draws the input mask r₀ = r₀ᴬ + r₀ᴮ + r₀ᶜ and sends each server its share.
* Every server draws its share r'ˣ of every ReLU's output mask; layer k+1's mask is
  rₖ₊₁ = −(r'ᴬ + r'ᴮ + r'ᶜ), so all layers' masks are known up front and one threshold-HE
  round (:class:`~sealedml.seco.he.threshold.HeParty`) leaves A with aₖ = W·rₖ − sᴮ − sᶜ,
  B with sᴮ and C with sᶜ for every layer.
* B garbles one ``relu_3`` circuit per value and sends C the tables; A fetches the labels of
  its inputs aₖ and r'ᴬ by OT from B and forwards them to C.

Online:

* U sends x − r₀ to A, which forwards it to B and C.
* Layer k: B computes yᴮ = W_B·mₖ + sᴮ + b_B, C computes yᶜ = W_C·mₖ + sᶜ + b_C, A has
  yᴬ = aₖ; the three add up to W·xₖ + b. Then the ReLU: B sends C the labels of yᴮ and r'ᴮ,
  C fetches those of yᶜ by OT, evaluates, learns ReLU(y) + r'ᴬ + r'ᴮ, adds r'ᶜ to get
  mₖ₊₁ = xₖ₊₁ − rₖ₊₁ and sends it to B.
* After the last layer B and C seal their output shares to U; A adds its own; U adds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sealedml.crypto import SigningKey
from sealedml.seco.gateway import LINKS, Gateway, LocalRemote
from sealedml.seco.he.client import HeSidecar
from sealedml.seco.model import SecoModel
from sealedml.seco.remote import Recorder, RemoteServer
from sealedml.seco.user import LocalGateway, QueryResult, SecoUser

__all__ = ["LINKS", "QueryResult", "SecoParties", "split_biases"]


def split_biases(model: SecoModel) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Additive shares of every layer's fixed-point bias: (B's, C's), B's uniformly random."""
    from sealedml.seco.he.packing import uniform_mod

    biases = [b for _, b in model.fixed_point()]
    bias_b = [uniform_mod(model.prime, len(b)) for b in biases]
    return bias_b, [(b - s) % model.prime for b, s in zip(biases, bias_b, strict=True)]


class SecoParties:
    """U, A, B and C in one process, each with its own keys, state and HE engine.

    Args:
        model: the compiled model; the owner's additive split happens here (B and C each get
            uniformly random-looking shares, A gets no weights).
        engines: A's, B's and C's HE side processes.
        recorders: per party (``"A"``, ``"B"``, ``"C"``), called with every message it opens.
    """

    def __init__(
        self,
        model: SecoModel,
        engines: Sequence[HeSidecar],
        *,
        recorders: dict[str, Recorder] | None = None,
    ) -> None:
        recorders = recorders or {}
        self.model = model
        keys = {party: SigningKey.generate() for party in "UABC"}
        public = {party: key.public_bytes for party, key in keys.items()}
        weights_b, weights_c = model.split()
        biases_b, biases_c = split_biases(model)
        architecture = model.architecture
        self.weights = {"B": weights_b, "C": weights_c}
        self.remotes = {
            name: RemoteServer(
                name,
                architecture,
                weights,
                biases,
                keys[name],
                {peer: public[peer] for peer in "UABC" if peer != name},
                engine,
                recorder=recorders.get(name),
            )
            for name, weights, biases, engine in (
                ("B", weights_b, biases_b, engines[1]),
                ("C", weights_c, biases_c, engines[2]),
            )
        }
        self.gateway = Gateway(
            architecture,
            keys["A"],
            {peer: public[peer] for peer in "UBC"},
            engines[0],
            {name: LocalRemote(server) for name, server in self.remotes.items()},
            recorder=recorders.get("A"),
        )
        self.user = SecoUser(architecture, keys["U"], {p: public[p] for p in "ABC"}, LocalGateway(self.gateway))

    def query(self, x: np.ndarray) -> QueryResult:
        """One query for input ``x`` (set-up and the user's session on first use)."""
        return self.user.query(x)

    def close(self) -> None:
        self.gateway.close()
