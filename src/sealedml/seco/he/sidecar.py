"""One SECO party's threshold-BFV engine, run as a side process under an interpreter where OpenFHE imports.

This file is executed as a script (``python3.10 sidecar.py``) and imports nothing from
SealedML: OpenFHE's Python wheels that work on this machine exist for Python 3.10 only,
while SealedML needs 3.11. The parent (``seco/he/client.py``) speaks to it over its
stdin/stdout pipes with length-prefixed frames:

    frame  = u32 header_length ‖ header (JSON) ‖ blob_0 ‖ blob_1 ‖ …
    header = {"op": str, "args": {...}, "blobs": [len_0, len_1, …]}

and the answer has the same shape, with ``{"ok": true, ...}`` or
``{"ok": false, "error": kind, "message": ...}``. Serialized OpenFHE objects travel as
blobs (``openfhe.Serialize(..., BINARY)``). The party's secret-key share is created here
and never leaves this process; nothing in an answer or an error message contains it.

Operations (one party = one process):
  context_new {plaintext_modulus, noise_flooding}   -> blob: the crypto context (the lead creates it)
  context_load [context]                             -> {ring_dimension}
  keygen [previous public key]?                      -> blob: this party's (joint-so-far) public key
  set_public_key [joint public key]                  -> {}
  rotation_keys {indices} [lead map]? [pk]?          -> blob: this party's rotation-key share
  add_rotation_keys [map, map] [pk]                  -> blob: their sum (tagged with pk)
  insert_rotation_keys [map]                         -> {}
  encrypt {values}                                   -> blob: ciphertext under the joint key
  add [ct, ct, ...]                                  -> blob: their sum
  matvec {block, weights, mask} [ct]                 -> blob: Σ_block(ct ⊙ weights) − mask
  partial_decrypt {lead} [ct]                        -> blob: this party's partial decryption
  fuse {length} [partial, partial, ...]              -> {values}: the plaintext, mod t
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one party per core; OpenFHE would take them all

import openfhe as fhe  # only where this script runs

_HEADER = struct.Struct(">I")
MAX_HEADER = 1 << 24
MAX_BLOB = 1 << 31


class Refused(Exception):
    """A request this engine will not carry out; ``kind`` becomes the answer's error field."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], list[bytes]] | None:
    prefix = stream.read(_HEADER.size)
    if not prefix:
        return None
    # Any framing error desynchronizes the pipe: the caller answers once and stops.
    if len(prefix) != _HEADER.size:
        raise Refused("framing", "truncated frame")
    (length,) = _HEADER.unpack(prefix)
    if length > MAX_HEADER:
        raise Refused("framing", "frame header too large")
    try:
        header = json.loads(stream.read(length))
    except ValueError:
        raise Refused("framing", "frame header is not JSON") from None
    sizes = header.get("blobs", []) if isinstance(header, dict) else None
    if not isinstance(sizes, list) or any(not isinstance(n, int) or not 0 <= n <= MAX_BLOB for n in sizes):
        raise Refused("framing", "bad blob lengths")
    blobs = [stream.read(n) for n in sizes]
    if any(len(b) != n for b, n in zip(blobs, sizes, strict=True)):
        raise Refused("framing", "truncated blob")
    return header, blobs


def write_frame(stream: BinaryIO, header: dict[str, Any], blobs: list[bytes]) -> None:
    header = {**header, "blobs": [len(b) for b in blobs]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    stream.write(_HEADER.pack(len(raw)) + raw)
    for blob in blobs:
        stream.write(blob)
    stream.flush()


def _deserialize(function: Callable[[bytes, Any], Any], blob: bytes, what: str) -> Any:
    """OpenFHE's deserializer: an exception *or* None for bytes it cannot read.

    It is not hardened against crafted input (a crafted crypto context can crash the
    process), which is why blobs reach an engine only from its own parent, over links
    that authenticate the party that sent them.
    """
    try:
        value = function(blob, fhe.BINARY)
    except Exception:
        value = None
    if value is None:
        raise Refused("malformed", what)
    return value


class Party:
    """The state of one party: its context, its secret-key share, the joint public key."""

    def __init__(self) -> None:
        self.cc: Any = None
        self.secret: Any = None
        self.public: Any = None  # this party's own (joint-so-far) public key
        self.joint: Any = None  # the joint public key everyone encrypts under
        self.modulus = 0

    # --- helpers -------------------------------------------------------------------------

    def _need(self, what: str) -> None:
        ready = {"context": self.cc, "keys": self.secret, "joint key": self.joint}[what]
        if ready is None:
            raise Refused("state", f"no {what} yet")

    def _ciphertext(self, blob: bytes) -> Any:
        self._need("context")
        return _deserialize(fhe.DeserializeCiphertextString, blob, "not a ciphertext of this context")

    def _public_key(self, blob: bytes) -> Any:
        return _deserialize(fhe.DeserializePublicKeyString, blob, "not a public key")

    def _key_map(self, blob: bytes) -> Any:
        return _deserialize(fhe.DeserializeEvalKeyMapString, blob, "not a rotation-key map")

    def _plaintext(self, values: Any) -> Any:
        slots = self.cc.GetRingDimension()
        if not isinstance(values, list) or len(values) > slots:
            raise Refused("malformed", f"expected at most {slots} slot values")
        if any(not isinstance(v, int) or not 0 <= v < self.modulus for v in values):
            raise Refused("malformed", "slot values must be integers in [0, t)")
        return self.cc.MakePackedPlaintext(values)

    # --- operations ----------------------------------------------------------------------

    def context_new(self, args: dict[str, Any], _: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        params = fhe.CCParamsBFVRNS()
        params.SetPlaintextModulus(int(args["plaintext_modulus"]))
        params.SetMultiplicativeDepth(1)
        if args.get("noise_flooding", True):
            params.SetMultipartyMode(fhe.NOISE_FLOODING_MULTIPARTY)
        cc = fhe.GenCryptoContext(params)
        self._enable(cc)
        return {}, [fhe.Serialize(cc, fhe.BINARY)]

    def _enable(self, cc: Any) -> None:
        """Use ``cc`` from now on; a new context starts a new key generation (keys of the old are dropped)."""
        for feature in (fhe.PKE, fhe.KEYSWITCH, fhe.LEVELEDSHE, fhe.MULTIPARTY):
            cc.Enable(feature)
        self.cc = cc
        self.modulus = int(cc.GetPlaintextModulus())
        self.secret = self.public = self.joint = None

    def context_load(self, _: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        cc = _deserialize(fhe.DeserializeCryptoContextString, blobs[0], "not a crypto context")
        self._enable(cc)
        return {"ring_dimension": int(cc.GetRingDimension()), "plaintext_modulus": self.modulus}, []

    def keygen(self, _: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("context")
        if self.secret is not None:
            raise Refused("state", "this party already has a key share")
        pair = self.cc.MultipartyKeyGen(self._public_key(blobs[0])) if blobs else self.cc.KeyGen()
        self.secret, self.public = pair.secretKey, pair.publicKey
        return {}, [fhe.Serialize(pair.publicKey, fhe.BINARY)]

    def set_public_key(self, _: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("context")
        self.joint = self._public_key(blobs[0])
        return {}, []

    def rotation_keys(self, args: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("keys")
        indices = [int(i) for i in args["indices"]]
        if blobs:  # a joining party: its share, derived from the lead's map, tagged with its key
            share = self.cc.MultiEvalAtIndexKeyGen(
                self.secret, self._key_map(blobs[0]), indices, self.public.GetKeyTag()
            )
        else:
            self.cc.EvalAtIndexKeyGen(self.secret, indices)
            share = self.cc.GetEvalAutomorphismKeyMap(self.secret.GetKeyTag())
        return {}, [fhe.Serialize(share, fhe.BINARY)]

    def add_rotation_keys(self, _: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("context")
        tag = self._public_key(blobs[2]).GetKeyTag()
        total = self.cc.MultiAddEvalAutomorphismKeys(self._key_map(blobs[0]), self._key_map(blobs[1]), tag)
        return {}, [fhe.Serialize(total, fhe.BINARY)]

    def insert_rotation_keys(self, _: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("context")
        self.cc.InsertEvalAutomorphismKey(self._key_map(blobs[0]))
        return {}, []

    def encrypt(self, args: dict[str, Any], _: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("joint key")
        ct = self.cc.Encrypt(self.joint, self._plaintext(args["values"]))
        return {}, [fhe.Serialize(ct, fhe.BINARY)]

    def add(self, _: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        if not blobs:
            raise Refused("malformed", "nothing to add")
        total = self._ciphertext(blobs[0])
        for blob in blobs[1:]:
            total = self.cc.EvalAdd(total, self._ciphertext(blob))
        return {}, [fhe.Serialize(total, fhe.BINARY)]

    def matvec(self, args: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        """ct ⊙ weights, summed over aligned blocks of ``block`` slots by rotations, minus ``mask``.

        Every slot is masked: the slots between block starts hold partial sums of the weights
        times the encrypted vector, which must not reach whoever decrypts.
        """
        block = int(args["block"])
        if block < 1 or block & (block - 1):
            raise Refused("malformed", "block must be a power of two")
        mask = args["mask"]
        if not isinstance(mask, list) or len(mask) != self.cc.GetRingDimension():
            raise Refused("malformed", "the mask must cover every slot")
        product = self.cc.EvalMult(self._ciphertext(blobs[0]), self._plaintext(args["weights"]))
        shift = 1
        while shift < block:
            product = self.cc.EvalAdd(product, self.cc.EvalAtIndex(product, shift))
            shift <<= 1
        product = self.cc.EvalSub(product, self._plaintext(mask))
        return {}, [fhe.Serialize(product, fhe.BINARY)]

    def partial_decrypt(self, args: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("keys")
        ct = self._ciphertext(blobs[0])
        decrypt = self.cc.MultipartyDecryptLead if args.get("lead") else self.cc.MultipartyDecryptMain
        return {}, [fhe.Serialize(decrypt([ct], self.secret)[0], fhe.BINARY)]

    def fuse(self, args: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        self._need("context")
        if len(blobs) < 2:
            raise Refused("malformed", "fusion needs every party's partial decryption")
        plain = self.cc.MultipartyDecryptFusion([self._ciphertext(b) for b in blobs])
        length = int(args["length"])
        plain.SetLength(length)
        values = [int(v) % self.modulus for v in plain.GetPackedValue()[:length]]
        return {"values": values}, []


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    party = Party()
    ops: dict[str, Callable[[dict[str, Any], list[bytes]], tuple[dict[str, Any], list[bytes]]]] = {
        name: getattr(party, name)
        for name in (
            "context_new",
            "context_load",
            "keygen",
            "set_public_key",
            "rotation_keys",
            "add_rotation_keys",
            "insert_rotation_keys",
            "encrypt",
            "add",
            "matvec",
            "partial_decrypt",
            "fuse",
        )
    }
    while True:
        try:
            frame = read_frame(stdin)
            if frame is None:
                return
            header, blobs = frame
            op = ops.get(str(header.get("op")))
            if op is None:
                raise Refused("malformed", "unknown operation")
            answer, out = op(header.get("args") or {}, blobs)
            write_frame(stdout, {"ok": True, **answer}, out)
        except Refused as exc:
            write_frame(stdout, {"ok": False, "error": exc.kind, "message": str(exc)}, [])
            if exc.kind == "framing":
                return
        except (KeyError, ValueError, TypeError, IndexError):
            write_frame(stdout, {"ok": False, "error": "malformed", "message": "malformed request"}, [])
        except Exception:  # an OpenFHE failure: say which kind, never echo its internals
            write_frame(stdout, {"ok": False, "error": "engine", "message": "the HE engine failed"}, [])


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
