"""Recovery shares of the master key: rebuild the KeyService after losing every replica, or move it
to a build with another measurement when no old replica is left to join.

At start, a KeyService given recovery holders (``--recovery-holders FILE``: a threshold *k* and
each holder's principal id with its recovery public key) splits its master key with Shamir's
scheme, k of n (``Crypto.Protocol.SecretSharing.Shamir``, over 16-byte halves), and HPKE-seals
each holder's share to that holder's recovery key. The sealed shares are kept in the store (they
are ciphertext only, and a forged one cannot pass the check below).

To recover, a new KeyService runs ``sealedml keyservice recover`` on the same store: it attests
like a KeyService and waits. Each holder fetches its sealed share, opens it with its identity,
attests the recovering instance against its own trust (``--keyservice-measurement`` names the
new build) and sends the share HPKE-sealed to it. With k shares the instance rebuilds a key and
keeps it only if it authenticates the store's anchored audit head — the one check a wrong share,
or shares of another service, cannot pass — then seals it to itself and stops; ``keyservice
serve`` then starts on it as usual.

What each party learns: the store's operator, sealed shares only; a holder, its own share (one
of k needed); fewer than k colluding holders, nothing of the key (Shamir); the recovering
instance, the master key — which is why holders attest it first.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sealedml._internal.encoding import b64d, b64e, canonical_json, fields, loads_json
from sealedml.crypto import HpkePrivateKey, HpkePublicKey, hpke_seal
from sealedml.errors import ConfigurationError, CryptoError, ProtocolError

__all__ = [
    "RecoveryPolicy",
    "SealedShares",
    "combine_shares",
    "load_recovery_policy",
    "open_share",
    "split_master_key",
]

_SHARE_LABEL = b"sealedml/v1/recovery-share"
_RESHARE_LABEL = b"sealedml/v1/recovery-reshare"
META_KEY = "recovery_shares"


class RecoveryPolicy(BaseModel):
    """Who holds recovery shares, and how many are needed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: int = Field(ge=1)
    holders: dict[str, str] = Field(min_length=1)  # principal id → recovery public key (base64)

    def check(self) -> RecoveryPolicy:
        if self.threshold > len(self.holders):
            raise ConfigurationError(f"threshold {self.threshold} exceeds the {len(self.holders)} holder(s)")
        if len(self.holders) > 255:
            raise ConfigurationError("at most 255 recovery holders")
        for holder, key in self.holders.items():
            try:
                HpkePublicKey.from_bytes(b64d(key))
            except (ValueError, CryptoError):
                raise ConfigurationError(f"holder {holder}: not a recovery public key") from None
        return self


def load_recovery_policy(path: Path) -> RecoveryPolicy:
    """Read ``--recovery-holders`` (YAML or JSON: ``threshold`` and ``holders``).

    Raises:
        ConfigurationError: unreadable, malformed, or a threshold the holders cannot reach.
    """
    try:
        data = yaml.safe_load(path.read_text())
        return RecoveryPolicy.model_validate(data).check()
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path}: unreadable recovery holders file ({type(exc).__name__})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise ConfigurationError(f"{path}: {where}: {first['msg']}") from None


class SealedShares(BaseModel):
    """The shares as the store keeps them: each sealed to its holder's recovery key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service_id: str
    threshold: int
    shares: dict[str, str]  # holder → HPKE ciphertext (base64)


def _share_info(service_id: str, holder: str, threshold: int, holders: int) -> bytes:
    return fields(_SHARE_LABEL, service_id, holder, threshold, holders)


def split_master_key(master_key: bytes, policy: RecoveryPolicy, service_id: str) -> SealedShares:
    """k-of-n shares of ``master_key``, each sealed to its holder (see the module docstring)."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(master_key) != 32:
        raise ConfigurationError("the master key is 32 bytes")
    k, n = policy.threshold, len(policy.holders)
    low = Shamir.split(k, n, master_key[:16], ssss=False)
    high = Shamir.split(k, n, master_key[16:], ssss=False)
    sealed = {}
    for (index, a), (_, b), (holder, key) in zip(low, high, sorted(policy.holders.items()), strict=True):
        share = canonical_json({"index": index, "a": a.hex(), "b": b.hex(), "service_id": service_id})
        recipient = HpkePublicKey.from_bytes(b64d(key))
        sealed[holder] = b64e(hpke_seal(recipient, share, _share_info(service_id, holder, k, n)))
    return SealedShares(service_id=service_id, threshold=k, shares=sealed)


def open_share(sealed: SealedShares, holder: str, key: HpkePrivateKey) -> dict[str, Any]:
    """A holder opens its own share.

    Raises:
        ProtocolError: no share for ``holder``, or it does not open with ``key``.
    """
    ciphertext = sealed.shares.get(holder)
    if ciphertext is None:
        raise ProtocolError(f"no recovery share for {holder}")
    info = _share_info(sealed.service_id, holder, sealed.threshold, len(sealed.shares))
    try:
        share = loads_json(key.open(b64d(ciphertext), info))
    except (CryptoError, ValueError):
        raise ProtocolError(f"the recovery share of {holder} does not open with this identity") from None
    if not isinstance(share, dict) or share.get("service_id") != sealed.service_id:
        raise ProtocolError("the recovery share is for another service")
    return share


def reshare_info(service_key: bytes, holder: str) -> bytes:
    """HPKE info for a share sent on to a recovering KeyService."""
    return fields(_RESHARE_LABEL, service_key, holder)


def combine_shares(shares: list[dict[str, Any]]) -> bytes:
    """The key ``shares`` (opened, distinct holders) rebuild; wrong or too few shares give another key.

    Raises:
        ProtocolError: malformed shares.
    """
    from Crypto.Protocol.SecretSharing import Shamir

    try:
        low = [(int(s["index"]), bytes.fromhex(s["a"])) for s in shares]
        high = [(int(s["index"]), bytes.fromhex(s["b"])) for s in shares]
        return bytes(Shamir.combine(low, ssss=False)) + bytes(Shamir.combine(high, ssss=False))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed recovery share ({type(exc).__name__})") from None


class ShareCollector:
    """What a recovering KeyService holds: shares received so far, until they rebuild the key."""

    def __init__(self, sealed: SealedShares) -> None:
        self.sealed = sealed
        self._received: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add(self, holder: str, share: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Record ``holder``'s share; return the shares once there are enough, else None."""
        if holder not in self.sealed.shares:
            raise ProtocolError(f"{holder} is not a recovery holder of this service")
        with self._lock:
            self._received[holder] = share
            if len(self._received) < self.sealed.threshold:
                return None
            return list(self._received.values())

    def reset(self) -> None:
        with self._lock:
            self._received.clear()

    @property
    def received(self) -> int:
        with self._lock:
            return len(self._received)
