"""The spill store: optimized segment weights re-encrypted under an ephemeral key.

The optimized-segment mode of :class:`~sealedml.runtime.memory_bounded.StreamingModel`
turns each segment's weights into ONNX Runtime's reordered (NCHWc) layout once,
at load. Those reordered weights are plaintext that the sealed container does
not hold, and keeping them resident would defeat the memory budget, so they
are sealed again — by this module — into a *spill store*:

* **Key.** A fresh random AES-256 key per :class:`SpillStore` (one per model
  instance), from the OS CSPRNG, held only in this process's memory. It is
  never written anywhere, so the spill is unreadable after the process exits
  and useless to any other process.
* **Nonces.** ``base_nonce XOR counter`` (:func:`~sealedml.crypto.derive_nonce`),
  where the counter numbers *every chunk ever written* to this store — a
  rebuilt segment gets new counters, so no nonce is used twice under the key.
* **Layout.** One *entry* per segment build: the segment's tensors packed into
  one blob (each at a 64-byte aligned offset), cut into chunks of
  ``chunk_size`` plaintext bytes (ciphertext ‖ tag), stored back to back. A
  segment's weights are therefore one contiguous byte range, decrypted chunk by
  chunk straight into one weight buffer
  (:func:`~sealedml.crypto.aead.aead_decrypt_into`) whose slices are the
  tensors: no intermediate plaintext object, and one allocation per segment
  however many small tensors it has.
* **AAD.** Binds the entry (one per build), the segment, the chunk index, the
  last-chunk flag, the blob length and a digest of the tensor table (names,
  types, shapes, offsets). A chunk moved, swapped, truncated or replayed from
  an older entry fails authentication.

Where the ciphertext lives (``directory``):

* **In memory** (the default, ``directory=None``): one private, anonymous
  buffer per entry — Occlumency's "encrypted weights in untrusted DRAM". Chunks
  are decrypted straight from it: no copy, no scratch buffer. The process's
  resident set grows by the ciphertext (about the model's size), which is not
  plaintext and not part of the budget; the benchmark reports RSS so the cost
  is visible. The buffers are private to the process, so nobody can rewrite a
  chunk between its authentication and its decryption (a shared mapping —
  ``mmap`` of a file or a memfd another process can write — would allow that
  double fetch, and a truncated file mapping kills the reader with
  ``SIGBUS``; neither is used).
* **On disk** (``directory=DIR``): :func:`tempfile.TemporaryFile` in ``DIR`` —
  on Linux an ``O_TMPFILE`` file that never has a name, elsewhere a file
  unlinked right after creation. Each chunk is read with one ``pread`` into the
  reading thread's ciphertext buffer and decrypted from there, so the file may
  be rewritten or truncated at any time: a short read or a changed chunk is an
  ordinary :class:`~sealedml.errors.SealedModelError`. It keeps the ciphertext
  out of the resident set at the cost of the kernel's copy (measured: ~5–7 ms
  per 100 MB) — the choice for a TEE whose process memory is the protected,
  scarce kind (an SGX enclave under Gramine).
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

__all__ = ["ALIGN", "SpillChunk", "SpillEntry", "SpillStore", "SpillTensor"]

_AAD_LABEL = b"sealedml/v1/spill-chunk"
_KEY_SIZE = 32
#: Alignment of every tensor inside a segment's blob (a cache line; SIMD loads).
ALIGN = 64


@dataclass(frozen=True)
class SpillChunk:
    """One AES-GCM chunk of a spill entry.

    Attributes:
        position: where its ciphertext ‖ tag starts in the store (the file offset of a
            file-backed store).
        length: ciphertext ‖ tag bytes.
        start: offset of its plaintext inside the entry's blob.
        nonce: its nonce.
        aad: its associated data.
    """

    position: int
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
    """One segment's weights in the spill store: a contiguous byte range.

    Attributes:
        entry_id: unique per build (bound into every chunk's AAD).
        segment: the plan segment it was built for.
        offset: its first byte in the store.
        length: its bytes in the store (ciphertext and tags).
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


class SpillStore:
    """An append-only store of AES-256-GCM chunks under a key that exists only in memory.

    Thread-safe: writes reserve their byte range under a lock; reads never modify
    the store, and chunks of one entry may be read by several threads at once.

    Args:
        chunk_size: plaintext bytes per chunk.
        directory: ``None`` keeps the ciphertext in private memory (zero-copy reads);
            a directory puts it in an anonymous file there (``pread`` into a scratch
            buffer per reading thread). See the module docstring.

    Raises:
        ValueError: a chunk size below 1 byte.
        OSError: the file could not be created.
    """

    def __init__(self, chunk_size: int, directory: str | None = None) -> None:
        if chunk_size < 1:
            raise ValueError("spill chunk size must be positive")
        self.chunk_size = chunk_size
        self._file = tempfile.TemporaryFile(prefix="sealedml-spill-", dir=directory) if directory is not None else None
        self._fd = self._file.fileno() if self._file is not None else -1
        #: Memory backing: each live entry's ciphertext, by entry id.
        self._buffers: dict[int, bytearray] = {}
        self._key = random_bytes(_KEY_SIZE)
        self._base_nonce = random_bytes(NONCE_SIZE)
        self._lock = threading.Lock()
        self._end = 0
        self._counter = 0
        self._entries = 0

    @property
    def in_memory(self) -> bool:
        """Whether the ciphertext is held in memory (else in an anonymous file)."""
        return self._file is None

    @property
    def scratch_bytes(self) -> int:
        """Ciphertext buffer one reading thread needs: a chunk and its tag (0 in memory)."""
        return 0 if self._file is None else self.chunk_size + TAG_SIZE

    @property
    def size(self) -> int:
        """Ciphertext bytes held: in memory, the live entries; on disk, everything written."""
        with self._lock:
            if self._file is None:
                return sum(len(buf) for buf in self._buffers.values())
            return self._end

    @property
    def fileno(self) -> int:
        """The file descriptor of a file-backed store (for tests and diagnostics; ciphertext only).

        Raises:
            ValueError: the store is in memory.
        """
        if self._file is None:
            raise ValueError("this spill store is in memory")
        return self._fd

    def stored(self, entry: SpillEntry) -> memoryview:
        """The ciphertext of an in-memory entry, writable (for tests and diagnostics).

        Raises:
            ValueError: the store is file-backed, or the entry was discarded.
        """
        with self._lock:
            buf = self._buffers.get(entry.entry_id) if self._file is None else None
        if buf is None:
            raise ValueError("no in-memory ciphertext for this entry")
        return memoryview(buf)

    def intact(self, entry: SpillEntry) -> bool:
        """Whether all of ``entry``'s ciphertext is still there (a file may have been truncated)."""
        if self._file is None:
            with self._lock:
                return entry.entry_id in self._buffers
        return os.fstat(self._fd).st_size >= entry.offset + entry.length

    def discard(self, entry: SpillEntry) -> None:
        """Drop a superseded entry's ciphertext (in memory; a file only grows). Idempotent."""
        with self._lock:
            self._buffers.pop(entry.entry_id, None)

    def close(self) -> None:
        """Release the ciphertext (a file has no name, so closing deletes it). Idempotent."""
        with self._lock:
            self._buffers.clear()
        if self._file is not None:
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
        memory = bytearray(length) if self._file is None else None
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
            if memory is not None:
                memory[position - offset : position - offset + len(sealed)] = sealed
            elif os.pwrite(self._fd, sealed, position) != len(sealed):
                raise OSError("short write to the spill file")
            chunks.append(SpillChunk(position, len(sealed), start, nonce, aad))
            position += len(sealed)
        piece = memoryview(plaintext)
        piece[:] = bytes(len(plaintext))  # best effort: no plaintext left in the staging buffer
        if memory is not None:
            with self._lock:
                self._buffers[entry_id] = memory
        return SpillEntry(entry_id, segment, offset, length, nbytes, tuple(placed), tuple(chunks))

    def read_into(self, entry: SpillEntry, out: memoryview, scratch: memoryview | None = None) -> None:
        """Read, authenticate and decrypt ``entry``'s blob into ``out``, chunk by chunk.

        Args:
            entry: what to read.
            out: a writable byte buffer of ``entry.nbytes`` bytes.
            scratch: for a file-backed store, a writable buffer of at least
                :attr:`scratch_bytes` for the ciphertext (one per reading thread).

        Raises:
            SealedModelError: a chunk is short (truncated file), missing (discarded entry)
                or fails authentication; the failed chunk's part of ``out`` holds no
                unauthenticated plaintext.
        """
        for index in range(len(entry.chunks)):
            self.read_chunk(entry, index, out, scratch)

    def read_chunk(self, entry: SpillEntry, index: int, out: memoryview, scratch: memoryview | None = None) -> None:
        """Read, authenticate and decrypt chunk ``index`` of ``entry`` into its place in ``out``.

        Chunks of one entry may be read by several threads at once (each with its own
        ``scratch``): they write disjoint parts of ``out``.

        Args:
            entry: the entry.
            index: the chunk.
            out: a writable byte buffer of ``entry.nbytes`` bytes (the whole blob).
            scratch: for a file-backed store, a writable buffer of at least
                :attr:`scratch_bytes` bytes.

        Raises:
            SealedModelError: the chunk is short (truncated file), missing (discarded
                entry) or fails authentication.
        """
        c = entry.chunks[index]
        ct: memoryview | bytearray
        if self._file is None:
            buf = self._buffers.get(entry.entry_id)
            if buf is None:
                raise SealedModelError(f"spill entry of segment {entry.segment} was discarded")
            local = c.position - entry.offset
            ct = memoryview(buf)[local : local + c.length]
        else:
            if scratch is None or scratch.nbytes < c.length:
                raise ValueError("a file-backed spill store needs a scratch buffer of scratch_bytes")
            ct = scratch[: c.length]
            if os.preadv(self._fd, [ct], c.position) != c.length:
                raise SealedModelError(f"spill file truncated (segment {entry.segment})")
        try:
            aead_decrypt_into(self._key, c.nonce, ct, c.aad, out[c.start : c.start + c.length - TAG_SIZE])
        except CryptoError as exc:
            raise SealedModelError(f"spill chunk of segment {entry.segment} failed authentication") from exc
