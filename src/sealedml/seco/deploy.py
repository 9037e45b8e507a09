"""The owner's deployment of a SECO-mode model: one directory per party.

``sealedml seco deploy MODEL.onnx --out DIR`` compiles the model (refusing what SECO mode
cannot compute, naming the node), splits every layer's fixed-point weights and biases into
two additive shares mod p, and writes::

    DIR/gateway/    party.json, identity.key            (A: the architecture, no weights)
    DIR/remote-b/   party.json, identity.key, share.npz (B: one share, uniformly random alone)
    DIR/remote-c/   party.json, identity.key, share.npz (C: the other share)
    DIR/user/       party.json, identity.key            (U: the architecture, the servers' keys)

``party.json`` holds the party's name, the model's public architecture and the public keys of
the parties it talks to; ``identity.key`` its own Ed25519 seed (mode 0600). Each directory goes
to its own host; no host should ever hold both shares. (The owner generating every party's
key is this tool's simplification: in production each server makes its own key and the owner
collects the public halves.)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sealedml._internal.paths import write_private_file_once
from sealedml.crypto import SigningKey
from sealedml.errors import ConfigurationError, InputError
from sealedml.seco.model import SecoArchitecture, SecoModel

__all__ = ["PARTY_DIRS", "PartyFiles", "deploy", "load_party"]

#: Each party's directory under a deployment.
PARTY_DIRS = {"A": "gateway", "B": "remote-b", "C": "remote-c", "U": "user"}
_TALKS_TO = {"A": "UBC", "B": "UAC", "C": "UAB", "U": "ABC"}
_FORMAT = "sealedml-seco-party-v1"


@dataclass(frozen=True, eq=False)
class PartyFiles:
    """One party's deployment directory, loaded."""

    name: str
    architecture: SecoArchitecture
    key: SigningKey
    peers: dict[str, bytes]
    weights: list[np.ndarray] | None = None  # B's or C's share
    biases: list[np.ndarray] | None = None


def _write(path: Path, data: bytes) -> None:
    if not write_private_file_once(path, data):
        raise ConfigurationError(f"{path} already exists")


def deploy(model: SecoModel, out: Path) -> dict[str, Path]:
    """Write the four parties' directories under ``out``; return them by party.

    Raises:
        ConfigurationError: ``out`` exists and is not empty (nothing is overwritten).
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigurationError(f"{out} exists and is not empty: choose a new directory")
    from sealedml.seco.protocol import split_biases

    keys = {party: SigningKey.generate() for party in PARTY_DIRS}
    weights_b, weights_c = model.split()
    biases_b, biases_c = split_biases(model)
    shares = {"B": (weights_b, biases_b), "C": (weights_c, biases_c)}
    written = {}
    for party, folder in PARTY_DIRS.items():
        directory = out / folder
        doc = {
            "format": _FORMAT,
            "party": party,
            "architecture": model.architecture.to_json(),
            "peers": {peer: keys[peer].public_bytes.hex() for peer in _TALKS_TO[party]},
        }
        _write(directory / "party.json", json.dumps(doc, indent=2).encode() + b"\n")
        _write(directory / "identity.key", keys[party].private_bytes().hex().encode() + b"\n")
        if party in shares:
            weights, biases = shares[party]
            buffer = io.BytesIO()
            arrays = {f"w{k}": w for k, w in enumerate(weights)} | {f"b{k}": b for k, b in enumerate(biases)}
            np.savez(buffer, **arrays)  # type: ignore[arg-type]
            _write(directory / "share.npz", buffer.getvalue())
        written[party] = directory
    return written


def load_party(directory: Path, *, expect: str) -> PartyFiles:
    """Load a party's directory written by :func:`deploy`.

    Args:
        expect: the parties it may be (``"A"``, ``"BC"``, ``"U"``).

    Raises:
        ConfigurationError: missing or malformed files, or another party's directory.
    """
    try:
        doc = json.loads((directory / "party.json").read_text())
        seed = bytes.fromhex((directory / "identity.key").read_text().strip())
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"{directory} is not a SECO party directory ({Path(exc.filename).name} missing)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{directory}: unreadable party files ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ConfigurationError(f"{directory}/party.json is not a SECO party file")
    party = doc.get("party")
    if party not in PARTY_DIRS or party not in expect:
        raise ConfigurationError(f"{directory} is party {party!r}, expected {' or '.join(expect)}")
    try:
        architecture = SecoArchitecture.from_json(doc.get("architecture"))
        peers = {str(k): bytes.fromhex(str(v)) for k, v in dict(doc["peers"]).items()}
        key = SigningKey.from_bytes(seed)
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{directory}/party.json: {exc}") from None
    if set(peers) != set(_TALKS_TO[party]):
        raise ConfigurationError(f"{directory}/party.json must list the keys of {', '.join(_TALKS_TO[party])}")
    if party not in "BC":
        return PartyFiles(party, architecture, key, peers)
    layers = len(architecture.layer_shapes)
    try:
        with np.load(directory / "share.npz", allow_pickle=False) as data:
            weights = [np.asarray(data[f"w{k}"], dtype=np.int64) for k in range(layers)]
            biases = [np.asarray(data[f"b{k}"], dtype=np.int64) for k in range(layers)]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigurationError(
            f"{directory}/share.npz: not this model's weight share ({type(exc).__name__})"
        ) from None
    return PartyFiles(party, architecture, key, peers, weights, biases)
