"""One-time masks and unblinding factors, precomputed in the TEE and kept sealed outside it.

A record holds, for one sample, every outsourced layer's mask r (uniform in
Z_p, shaped like the layer's input) and its unblinding factor u = W·r mod p.
Records are made ahead of requests (the costly part: one product per layer, the
same work the executor does online), sealed with AES-256-GCM under a key that
exists only in this pool's memory, and written to a directory in untrusted
storage. Each record's nonce and associated data carry its sequence number and
the model it belongs to; the pool hands out sequence numbers once, reads the
record, and deletes it. A record that is altered, swapped, replayed or missing
fails with :class:`~sealedml.errors.MaskError` — it is never used twice, and an
older copy put back by the storage does not authenticate under a later number.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sealedml.crypto.aead import KEY_SIZE, aead_decrypt, aead_encrypt
from sealedml.crypto.random import random_bytes
from sealedml.errors import CryptoError, MaskError
from sealedml.partition.blind.field import centered, random_field, reduce
from sealedml.partition.blind.linear import LinearLayer, apply_linear

__all__ = ["MaskPool", "MaskStats"]

_AAD = b"sealedml/blind-mask/v1\0"


@dataclass
class MaskStats:
    """What a pool did: records made ahead, made on demand (pool empty), used, and time spent making."""

    made: int = 0
    made_on_demand: int = 0
    used: int = 0
    precompute_s: float = 0.0


class MaskPool:
    """Sealed mask records for one model's outsourced layers.

    Args:
        layers: the outsourced layers, in order.
        sample_shapes: each layer's input shape for one sample (without the batch dimension).
        directory: untrusted storage for the sealed records (created; emptied on :meth:`close`).
        label: binds records to one model version (e.g. ``b"model/3"``).
        low_water: refill in the background when fewer records than this are left.
        target: how many records a refill leaves.
    """

    def __init__(
        self,
        layers: Sequence[LinearLayer],
        sample_shapes: Sequence[tuple[int, ...]],
        directory: Path,
        *,
        label: bytes,
        low_water: int = 8,
        target: int = 32,
    ) -> None:
        self.layers, self.sample_shapes = list(layers), [tuple(s) for s in sample_shapes]
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.label, self.low_water, self.target = label, low_water, target
        self.stats = MaskStats()
        self._key = random_bytes(KEY_SIZE)
        #: Each layer's product shape for one sample.
        self.output_shapes = [
            apply_linear(layer, np.zeros((1, *shape))).shape[1:]
            for layer, shape in zip(layers, self.sample_shapes, strict=True)
        ]
        self._lock = threading.Lock()
        self._making = threading.Lock()
        self._next_make = 0
        self._next_use = 0
        self._wake = threading.Event()
        self._closed = False
        self._refiller: threading.Thread | None = None

    # ------------------------------------------------------------------ making
    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.mask"

    def _aad(self, seq: int) -> bytes:
        return _AAD + self.label + b"\0" + seq.to_bytes(8, "big")

    def _make(self) -> list[tuple[np.ndarray, np.ndarray]]:
        record = []
        for layer, shape in zip(self.layers, self.sample_shapes, strict=True):
            r = random_field(shape)
            u = reduce(np.rint(apply_linear(layer, centered(r)[None].astype(np.float64))).astype(np.int64))[0]
            record.append((r, u))
        return record

    def _seal(self, seq: int, record: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
        plain = b"".join(a.astype("<u4").tobytes() for pair in record for a in pair)
        return aead_encrypt(self._key, seq.to_bytes(12, "big"), plain, self._aad(seq))

    def precompute(self, count: int) -> None:
        """Make ``count`` more records and store them sealed (the TEE's work ahead of requests)."""
        for _ in range(count):
            t0 = time.perf_counter()
            record = self._make()
            with self._making:  # one maker at a time; a number is handed out only once its record is stored
                seq = self._next_make
                tmp = self._path(seq).with_suffix(".tmp")
                tmp.write_bytes(self._seal(seq, record))
                os.replace(tmp, self._path(seq))
                with self._lock:
                    self._next_make += 1
            self.stats.made += 1
            self.stats.precompute_s += time.perf_counter() - t0

    @property
    def available(self) -> int:
        with self._lock:
            return self._next_make - self._next_use

    # ------------------------------------------------------------------ using
    def _open(self, seq: int) -> list[tuple[np.ndarray, np.ndarray]]:
        path = self._path(seq)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MaskError(f"mask record {seq} is missing from the untrusted store") from exc
        try:
            plain = aead_decrypt(self._key, seq.to_bytes(12, "big"), data, self._aad(seq))
        except CryptoError as exc:
            raise MaskError(f"mask record {seq} does not authenticate (altered, swapped or replayed)") from exc
        finally:
            path.unlink(missing_ok=True)
        words = np.frombuffer(plain, dtype="<u4").astype(np.int64)
        record, at = [], 0
        for shape, out in zip(self.sample_shapes, self.output_shapes, strict=True):
            n_in, n_out = int(np.prod(shape)), int(np.prod(out))
            if at + n_in + n_out > words.size:
                raise MaskError(f"mask record {seq} has the wrong size")
            record.append((words[at : at + n_in].reshape(shape), words[at + n_in : at + n_in + n_out].reshape(out)))
            at += n_in + n_out
        return record

    def take(self, samples: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fresh masks for one request of ``samples`` samples: per layer, r and u stacked over the batch.

        Records come from the sealed store, each used once; when the store runs dry the
        missing ones are made here (slower, counted in ``made_on_demand``).

        Raises:
            MaskError: a stored record is missing or does not authenticate.
        """
        with self._lock:
            ready = min(samples, self._next_make - self._next_use)
            seqs = list(range(self._next_use, self._next_use + ready))
            self._next_use += ready
            left = self._next_make - self._next_use
        if left < self.low_water:
            self._wake.set()
        records = [self._open(seq) for seq in seqs]
        for _ in range(samples - ready):
            records.append(self._make())
            self.stats.made_on_demand += 1
        self.stats.used += samples
        return [
            (np.stack([rec[i][0] for rec in records]), np.stack([rec[i][1] for rec in records]))
            for i in range(len(self.layers))
        ]

    # ------------------------------------------------------------------ refilling
    def start_refill(self) -> None:
        """Keep the store at ``target`` records from a background thread (woken by :meth:`take`)."""
        if self._refiller is None:
            self._refiller = threading.Thread(target=self._refill_loop, name="blind-masks", daemon=True)
            self._refiller.start()
            self._wake.set()

    def _refill_loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while not self._closed and self.available < self.target:
                self.precompute(1)

    def close(self) -> None:
        """Stop refilling and delete every record left (they are useless without the key)."""
        self._closed = True
        self._wake.set()
        if self._refiller is not None:
            self._refiller.join(timeout=30)
        for path in self.directory.glob("*.mask"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only when nothing else is in it
        self._key = b"\0" * KEY_SIZE
