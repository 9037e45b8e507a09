"""The user U of SECO mode: masks its input, talks only to the gateway, adds the output shares.

U draws the input mask r₀ = r₀ᴬ + r₀ᴮ + r₀ᶜ before it has an input (the offline phase), and
seals each server's share on its own link with that server — A relays B's and C's unread.
Online it sends A the masked input x − r₀ and gets back three sealed output shares, which add
up to the fixed-point logits. U's own work is a few vector operations (``user_cpu_ms``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sealedml.crypto import SigningKey
from sealedml.errors import ConfigurationError, ProtocolError
from sealedml.seco.gateway import Gateway
from sealedml.seco.he.packing import uniform_mod
from sealedml.seco.link import Link, LinkInitiator, PartyIdentity
from sealedml.seco.model import SecoArchitecture
from sealedml.seco.wire import unvec, vec

__all__ = ["GatewayHandle", "LocalGateway", "QueryResult", "SecoUser"]


class GatewayHandle(Protocol):
    """How U reaches A: open a session, then the two phases of each query."""

    def open_session(self, hellos: Sequence[bytes]) -> list[bytes]: ...

    def offline(self, query: str, messages: Sequence[bytes]) -> list[bytes]: ...

    def online(self, query: str, messages: Sequence[bytes]) -> tuple[list[bytes], dict[str, int]]:
        """The output shares, and the bytes each link carried for this query (A's count)."""
        ...


class LocalGateway:
    """The gateway in this process (tests, benchmarks)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._before: dict[str, int] = {}

    def open_session(self, hellos: Sequence[bytes]) -> list[bytes]:
        return self.gateway.open_session(hellos)

    def offline(self, query: str, messages: Sequence[bytes]) -> list[bytes]:
        self._before = dict(self.gateway.traffic)
        return self.gateway.offline(query, messages)

    def online(self, query: str, messages: Sequence[bytes]) -> tuple[list[bytes], dict[str, int]]:
        shares = self.gateway.online(query, messages)
        return shares, {k: v - self._before.get(k, 0) for k, v in self.gateway.traffic.items()}


@dataclass(frozen=True)
class QueryResult:
    """Logits of one query and what it cost.

    ``link_bytes`` per link (U–A, A–B, A–C, B–C): U's sealed messages for B and C, which A
    relays, count on U–A; B–C messages count on B–C (A relays them too; see docs/seco.md).
    """

    logits: np.ndarray
    output_field: np.ndarray
    offline_s: float
    online_ms: float
    user_cpu_ms: float
    link_bytes: dict[str, int]


def fold_user_links(per_link: Mapping[str, int]) -> dict[str, int]:
    """Per-link bytes with U–B and U–C (relayed by A) counted on U–A."""
    folded = {name: int(per_link.get(name, 0)) for name in ("U-A", "A-B", "A-C", "B-C")}
    folded["U-A"] += int(per_link.get("U-B", 0)) + int(per_link.get("U-C", 0))
    return folded


class SecoUser:
    """U, with its signing key, the servers' public keys and a way to reach A.

    Args:
        architecture: the deployed model's public shapes and number format.
        key: U's signing key (the servers know its public key).
        servers: A's, B's and C's public keys.
        gateway: the handle of A.
    """

    def __init__(
        self,
        architecture: SecoArchitecture,
        key: SigningKey,
        servers: Mapping[str, bytes],
        gateway: GatewayHandle,
    ) -> None:
        if set(servers) != {"A", "B", "C"}:
            raise ConfigurationError("the user needs A's, B's and C's public keys")
        self.architecture, self.p = architecture, architecture.prime
        self._key, self._servers, self.gateway = key, dict(servers), gateway
        self._links: dict[str, Link] = {}
        self.session = ""

    def connect(self) -> None:
        """Open a session: one link with each server (B's and C's handshakes go through A)."""
        session = secrets.token_hex(16)
        initiators = {
            party: LinkInitiator(self._key, "U", PartyIdentity(party, self._servers[party]), session) for party in "ABC"
        }
        replies = self.gateway.open_session([initiators[party].hello() for party in "ABC"])
        self._links = {party: initiators[party].finish(reply) for party, reply in zip("ABC", replies, strict=True)}
        self.session = session

    def query(self, x: np.ndarray) -> QueryResult:
        """One query for one sample ``x``: offline, then online.

        A failure (a server gone, a message refused) raises its typed error; the next query
        opens a new session, since the failed one may have left a link out of step.
        """
        if not self._links:
            self.connect()
        try:
            return self._query(x)
        except BaseException:
            self._links = {}
            raise

    def _query(self, x: np.ndarray) -> QueryResult:
        c0 = time.process_time()  # U: encode before anything else (a bad input fails here)
        encoded = self.architecture.encode_input(x)
        n_in = self.architecture.n_inputs
        r0 = [uniform_mod(self.p, n_in) for _ in range(3)]
        masks = [self._links[party].seal("mask-share", vec(r)) for party, r in zip("ABC", r0, strict=True)]
        user = time.process_time() - c0
        t0 = time.perf_counter()
        self.gateway.offline(self.session, masks)
        t1 = time.perf_counter()
        c0 = time.process_time()
        masked = self._links["A"].seal("masked-input", vec((encoded - r0[0] - r0[1] - r0[2]) % self.p))
        user += time.process_time() - c0
        t2 = time.perf_counter()
        shares, traffic = self.gateway.online(self.session, [masked])
        t3 = time.perf_counter()
        c0 = time.process_time()  # U: open the shares, add them, decode
        if len(shares) != 3:
            raise ProtocolError(f"the gateway returned {len(shares)} output shares, not 3")
        n_out = self.architecture.n_outputs
        parts = [
            unvec(self._links[party].open(share, "output-share"), n_out, self.p)
            for party, share in zip("ABC", shares, strict=True)
        ]
        output = (parts[0] + parts[1] + parts[2]) % self.p
        logits = self.architecture.decode_output(output)
        user += time.process_time() - c0
        return QueryResult(
            logits=logits,
            output_field=output,
            offline_s=t1 - t0,
            online_ms=(t3 - t2) * 1000,
            user_cpu_ms=user * 1000,
            link_bytes=fold_user_links(traffic),
        )
