"""The spill file: optimized segment weights re-encrypted under an ephemeral key on untrusted disk.

The optimized-segment mode of :class:`~sealedml.runtime.streaming.StreamingModel`
turns each segment's weights into ONNX Runtime's reordered (NCHWc) layout once,
at load. Those reordered weights are plaintext that the sealed container does
not hold, and keeping them resident would defeat the memory budget, so they
are sealed again — by this module — into a *spill file*:

* **Key.** A fresh random AES-256 key per :class:`SpillFile` (one per model
  instance), from the OS CSPRNG, held only in this process's memory. It is
  never written anywhere, so the spill is unreadable after the process exits
  and useless to any other process.
* **Nonces.** ``base_nonce XOR counter`` (:func:`~sealedml.crypto.derive_nonce`),
  where the counter numbers *every chunk ever written* to this file — a
  rebuilt segment gets new counters, so no nonce is used twice under the key.
* **Layout.** One *entry* per segment build: the segment's tensors packed into
  one blob (each at a 64-byte aligned offset), cut into chunks of
  ``chunk_size`` plaintext bytes (ciphertext ‖ tag), written back to back. A
  segment's weights are therefore one contiguous byte range, read front to
  back with one ``pread`` per chunk into a reusable ciphertext buffer and
  decrypted straight into one weight buffer
  (:func:`~sealedml.crypto.aead.aead_decrypt_into`) whose slices are the
  tensors: no intermediate plaintext object, no copy, and one allocation per
  segment however many small tensors it has.
* **AAD.** Binds the entry (one per build), the segment, the chunk index, the
  last-chunk flag, the blob length and a digest of the tensor table (names,
  types, shapes, offsets). A chunk moved, swapped, truncated or replayed from
  an older entry fails authentication.
* **File.** :func:`tempfile.TemporaryFile` in the system temp directory (or
  ``directory``): on Linux an ``O_TMPFILE`` file that never has a name,
  elsewhere a file unlinked right after creation. It holds ciphertext only.

Reads use ``pread`` rather than ``mmap``: a mapped file that an attacker
truncates turns the next read into ``SIGBUS`` (killing the worker), whereas a
short ``pread`` is an ordinary :class:`~sealedml.errors.SealedModelError`.
``mmap`` would save the kernel's copy (measured: ~4–5 ms per 100 MB).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
from onnx import helper

from sealedml._internal.encoding import fields
from sealedml.crypto import NONCE_SIZE, TAG_SIZE, aead_encrypt, derive_nonce, random_bytes
from sealedml.crypto.aead import aead_decrypt_into
from sealedml.errors import CryptoError, SealedModelError

__all__ = ["ALIGN", "SpillChunk", "SpillEntry", "SpillFile", "SpillTensor"]

_AAD_LABEL = b"sealedml/v1/spill-chunk"
_KEY_SIZE = 32
#: Alignment of every tensor inside a segment's blob (a cache line; SIMD loads).
ALIGN = 64


@dataclass(frozen=True)
class SpillChunk:
    """One AES-GCM chunk of a spill entry.

    Attributes:
        file_offset: where its ciphertext ‖ tag starts in the spill file.
        length: ciphertext ‖ tag bytes.
        start: offset of its plaintext inside the entry's blob.
        nonce: its nonce.
        aad: its associated data.
    """

    file_offset: int
    length: int
    start: int
    nonce: bytes
    aad: bytes


@dataclass(frozen=True)
class SpillTensor:
    """A tensor inside a spill entry's blob.

    Attributes:
        name: the graph-input name the runtime segment session expects.
        data_type: ONNX element type.
        dims: shape.
        offset: where it starts in the blob (a multiple of :data:`ALIGN`).
        nbytes: its size.
    """

    name: str
    data_type: int
    dims: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def dtype(self) -> np.dtype[np.generic]:
        """NumPy dtype of the tensor."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.data_type))


@dataclass(frozen=True)
class SpillEntry:
    """One segment's weights in the spill file: a contiguous byte range.

    Attributes:
        entry_id: unique per build (bound into every chunk's AAD).
        segment: the plan segment it was built for.
        offset: first byte in the file.
        length: bytes in the file (ciphertext and tags).
        nbytes: plaintext bytes of the blob (tensors and alignment padding).
        tensors: the tensors, in blob order.
        chunks: the chunks, in file order.
    """

    entry_id: int
    segment: int
    offset: int
    length: int
    nbytes: int
    tensors: tuple[SpillTensor, ...]
    chunks: tuple[SpillChunk, ...]

    def views(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        """The tensors as arrays viewing ``blob`` (a ``uint8`` buffer of :attr:`nbytes`)."""
        return {t.name: blob[t.offset : t.offset + t.nbytes].view(t.dtype).reshape(t.dims) for t in self.tensors}


def _layout(tensors: list[tuple[str, int, tuple[int, ...], memoryview]]) -> tuple[list[SpillTensor], int]:
    placed: list[SpillTensor] = []
    cursor = 0
    for name, data_type, dims, view in tensors:
        cursor = -(-cursor // ALIGN) * ALIGN
        placed.append(SpillTensor(name, data_type, tuple(int(d) for d in dims), cursor, view.nbytes))
        cursor += view.nbytes
    return placed, cursor


def _bytes(data: memoryview) -> memoryview:
    view = memoryview(data)
    if view.nbytes == 0:
        return memoryview(b"")  # cast() refuses views with a zero in their shape
    if view.ndim != 1 or view.format != "B":
        return view.cast("B")
    return view


class SpillFile:
    """An append-only file of AES-256-GCM chunks under a key that exists only in memory.

    Thread-safe: writes reserve their byte range under a lock; reads are ``pread``.

    Args:
        chunk_size: plaintext bytes per chunk (a reader's scratch buffer is this plus
            the 16-byte tag).
        directory: where to create the file (default: :func:`tempfile.gettempdir`,
            i.e. ``$TMPDIR`` or ``/tmp``).

    Raises:
        ValueError: a chunk size below 1 byte.
    """

    def __init__(self, chunk_size: int, directory: str | None = None) -> None:
        if chunk_size < 1:
            raise ValueError("spill chunk size must be positive")
        self.chunk_size = chunk_size
        self._file = tempfile.TemporaryFile(prefix="sealedml-spill-", dir=directory)
        self._fd = self._file.fileno()
        self._key = random_bytes(_KEY_SIZE)
        self._base_nonce = random_bytes(NONCE_SIZE)
        self._lock = threading.Lock()
        self._end = 0
        self._counter = 0
        self._entries = 0

    @property
    def size(self) -> int:
        """Bytes written so far (including entries superseded by rebuilds)."""
        with self._lock:
            return self._end

    @property
    def fileno(self) -> int:
        """The file descriptor (for tests and diagnostics; the content is ciphertext)."""
        return self._fd

    def file_size(self) -> int:
        """The file's current size on disk (smaller than :attr:`size` if someone truncated it)."""
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        """Close the file (its storage is released: it has no name). Idempotent."""
        self._file.close()

    def write(self, segment: int, tensors: list[tuple[str, int, tuple[int, ...], memoryview]]) -> SpillEntry:
        """Encrypt and append one segment's tensors as one contiguous entry.

        Args:
            segment: the plan segment (bound into the AAD).
            tensors: ``(name, ONNX data type, dims, plaintext bytes)`` per tensor.

        Returns:
            The entry describing the blob and where every chunk went.

        Raises:
            OSError: the file could not be written.
        """
        views = [_bytes(data) for _, _, _, data in tensors]
        placed, nbytes = _layout([(n, t, d, v) for (n, t, d, _), v in zip(tensors, views, strict=True)])
        table = hashlib.sha256(
            fields(b"sealedml/v1/spill-table", *(f"{t.name}|{t.data_type}|{t.dims}|{t.offset}" for t in placed))
        ).digest()
        chunk = self.chunk_size
        count = max(1, -(-nbytes // chunk))
        length = nbytes + count * TAG_SIZE
        with self._lock:
            entry_id = self._entries
            self._entries += 1
            offset = self._end
            self._end += length
            first_counter = self._counter
            self._counter += count
        chunks: list[SpillChunk] = []
        position = offset
        plaintext = bytearray(min(chunk, nbytes))
        for c in range(count):
            start = c * chunk
            size = min(chunk, nbytes - start)
            piece = memoryview(plaintext)[:size]
            piece[:] = bytes(size)  # alignment padding stays zero
            for tensor, view in zip(placed, views, strict=True):
                lo, hi = max(start, tensor.offset), min(start + size, tensor.offset + tensor.nbytes)
                if lo < hi:
                    piece[lo - start : hi - start] = view[lo - tensor.offset : hi - tensor.offset]
            nonce = derive_nonce(self._base_nonce, first_counter + c)
            aad = fields(_AAD_LABEL, entry_id, segment, c, int(c == count - 1), nbytes, table)
            sealed = aead_encrypt(self._key, nonce, piece, aad)  # type: ignore[arg-type]
            if os.pwrite(self._fd, sealed, position) != len(sealed):
                raise OSError("short write to the spill file")
            chunks.append(SpillChunk(position, len(sealed), start, nonce, aad))
            position += len(sealed)
        piece = memoryview(plaintext)
        piece[:] = bytes(len(plaintext))  # best effort: no plaintext left in the staging buffer
        return SpillEntry(entry_id, segment, offset, length, nbytes, tuple(placed), tuple(chunks))

    def read_into(self, entry: SpillEntry, out: memoryview, scratch: memoryview) -> None:
        """Read, authenticate and decrypt ``entry``'s blob into ``out``, chunk by chunk.

        Args:
            entry: what to read.
            out: a writable byte buffer of ``entry.nbytes`` bytes.
            scratch: a writable byte buffer of at least ``chunk_size + 16`` bytes for
                the ciphertext (one per reading thread).

        Raises:
            SealedModelError: a chunk is short (truncated file) or fails authentication;
                the failed chunk's part of ``out`` holds no unauthenticated plaintext.
        """
        for index in range(len(entry.chunks)):
            self.read_chunk(entry, index, out, scratch)

    def read_chunk(self, entry: SpillEntry, index: int, out: memoryview, scratch: memoryview) -> None:
        """Read, authenticate and decrypt chunk ``index`` of ``entry`` into its place in ``out``.

        Chunks of one entry may be read by several threads at once (each with its own
        ``scratch``): they write disjoint parts of ``out``.

        Args:
            entry: the entry.
            index: the chunk.
            out: a writable byte buffer of ``entry.nbytes`` bytes (the whole blob).
            scratch: a writable byte buffer of at least ``chunk_size + 16`` bytes.

        Raises:
            SealedModelError: the chunk is short (truncated file) or fails authentication.
        """
        c = entry.chunks[index]
        ct = scratch[: c.length]
        got = os.preadv(self._fd, [ct], c.file_offset)
        if got != c.length:
            raise SealedModelError(f"spill file truncated (segment {entry.segment})")
        try:
            aead_decrypt_into(self._key, c.nonce, ct, c.aad, out[c.start : c.start + c.length - TAG_SIZE])
        except CryptoError as exc:
            raise SealedModelError(f"spill chunk of segment {entry.segment} failed authentication") from exc
