"""The spill file: optimized segment weights re-encrypted under an ephemeral key on untrusted disk.

The optimized-segment mode of :class:`~sealedml.runtime.streaming.StreamingModel`
turns each segment's weights into ONNX Runtime's reordered (NCHWc) layout once,
at load. Those reordered weights are plaintext that the sealed container does
not hold, and keeping them resident would defeat the memory budget, so they
are sealed again — by this module — into a *spill file*:

* **Key.** A fresh random AES-256 key per :class:`SpillFile` (one per model
  instance), generated with the OS CSPRNG and held only in this process's
  memory. It is never written anywhere, so the spill is unreadable after the
  process exits and useless to any other process.
* **Nonces.** ``base_nonce XOR counter`` (:func:`~sealedml.crypto.derive_nonce`),
  where the counter numbers *every chunk ever written* to this file — a
  rebuilt segment gets new counters, so no nonce is ever used twice under the key.
* **AAD.** Binds the spill entry (one per segment build), the tensor's position
  and byte length in it, the chunk index and a last-chunk flag. A chunk moved,
  swapped, truncated or replayed from an older entry fails authentication.
* **Layout.** One *entry* per segment: its tensors back to back, each cut into
  chunks of ``chunk_size`` plaintext bytes (ciphertext ‖ tag). A segment's
  weights are one contiguous byte range, read front to back with one ``pread``
  per chunk into a reusable ciphertext buffer and decrypted straight into the
  weight array (:func:`~sealedml.crypto.aead.aead_decrypt_into`): no
  intermediate plaintext object and no extra copy.
* **File.** :func:`tempfile.TemporaryFile` in the system temp directory (or
  ``directory``): on Linux an ``O_TMPFILE`` file that never has a name,
  elsewhere a file unlinked right after creation. It holds ciphertext only.

Reads use ``pread`` rather than ``mmap``: an attacker who truncates a mapped
file would turn the next read into ``SIGBUS`` (killing the worker), whereas a
short ``pread`` is an ordinary :class:`~sealedml.errors.SealedModelError`.
"""

from __future__ import annotations

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

__all__ = ["SpillChunk", "SpillEntry", "SpillFile", "SpillTensor"]

_AAD_LABEL = b"sealedml/v1/spill-chunk"
_KEY_SIZE = 32


@dataclass(frozen=True)
class SpillChunk:
    """One AES-GCM chunk of a spilled tensor.

    Attributes:
        file_offset: where its ciphertext ‖ tag starts in the spill file.
        length: ciphertext ‖ tag bytes.
        start: offset of its plaintext inside the tensor.
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
    """A tensor in the spill file.

    Attributes:
        name: the graph-input name the runtime segment session expects.
        data_type: ONNX element type.
        dims: shape.
        nbytes: plaintext size.
        chunks: its chunks, in order.
    """

    name: str
    data_type: int
    dims: tuple[int, ...]
    nbytes: int
    chunks: tuple[SpillChunk, ...]

    @property
    def dtype(self) -> np.dtype[np.generic]:
        """NumPy dtype of the tensor."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.data_type))


@dataclass(frozen=True)
class SpillEntry:
    """One segment's weights in the spill file: a contiguous byte range.

    Attributes:
        entry_id: unique per build (bound into every chunk's AAD).
        offset: first byte in the file.
        length: bytes in the file (ciphertext and tags).
        tensors: the tensors, in file order.
    """

    entry_id: int
    offset: int
    length: int
    tensors: tuple[SpillTensor, ...]

    @property
    def nbytes(self) -> int:
        """Plaintext bytes of all tensors."""
        return sum(t.nbytes for t in self.tensors)


class SpillFile:
    """An append-only file of AES-256-GCM chunks under a key that exists only in memory.

    Thread-safe: writes reserve their byte range under a lock; reads are ``pread``.

    Args:
        chunk_size: plaintext bytes per chunk (the reader's scratch buffer is this
            plus the 16-byte tag).
        directory: where to create the file (default: :func:`tempfile.gettempdir`,
            i.e. ``$TMPDIR`` or ``/tmp``).

    Raises:
        ValueError: a chunk size below 1 byte.
    """

    def __init__(self, chunk_size: int, directory: str | None = None) -> None:
        if chunk_size < 1:
            raise ValueError("spill chunk size must be positive")
        self.chunk_size = chunk_size
        self._file = tempfile.TemporaryFile(prefix="sealedml-spill-", dir=directory)  # noqa: SIM115
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

    def close(self) -> None:
        """Close the file (its storage is released: it has no name). Idempotent."""
        self._file.close()

    def write(self, tensors: list[tuple[str, int, tuple[int, ...], memoryview]]) -> SpillEntry:
        """Encrypt and append one segment's tensors as one contiguous entry.

        Args:
            tensors: ``(name, ONNX data type, dims, plaintext bytes)`` per tensor.

        Returns:
            The entry describing where every chunk went.
        """
        chunk = self.chunk_size
        plan: list[tuple[str, int, tuple[int, ...], memoryview, int]] = []
        total = 0
        n_chunks = 0
        for name, data_type, dims, data in tensors:
            view = memoryview(data).cast("B")
            count = max(1, -(-view.nbytes // chunk))
            plan.append((name, data_type, dims, view, count))
            total += view.nbytes + count * TAG_SIZE
            n_chunks += count
        with self._lock:
            entry_id = self._entries
            self._entries += 1
            offset = self._end
            self._end += total
            first_counter = self._counter
            self._counter += n_chunks
        position = offset
        counter = first_counter
        out: list[SpillTensor] = []
        for index, (name, data_type, dims, view, count) in enumerate(plan):
            chunks: list[SpillChunk] = []
            for c in range(count):
                start = c * chunk
                piece = view[start : start + chunk]
                nonce = derive_nonce(self._base_nonce, counter)
                aad = fields(_AAD_LABEL, entry_id, index, view.nbytes, c, int(c == count - 1))
                sealed = aead_encrypt(self._key, nonce, piece, aad)  # type: ignore[arg-type]
                written = os.pwrite(self._fd, sealed, position)
                if written != len(sealed):
                    raise OSError("short write to the spill file")
                chunks.append(SpillChunk(position, len(sealed), start, nonce, aad))
                position += len(sealed)
                counter += 1
            out.append(SpillTensor(name, data_type, tuple(dims), view.nbytes, tuple(chunks)))
        return SpillEntry(entry_id, offset, total, tuple(out))

    def read_into(self, tensor: SpillTensor, out: memoryview, scratch: memoryview) -> None:
        """Read, authenticate and decrypt ``tensor`` into ``out`` chunk by chunk.

        Args:
            tensor: what to read.
            out: a writable byte buffer of ``tensor.nbytes`` bytes.
            scratch: a writable byte buffer of at least ``chunk_size + 16`` bytes for
                the ciphertext (one per reading thread).

        Raises:
            SealedModelError: a chunk is short (truncated file) or fails authentication;
                ``out`` holds no unauthenticated plaintext then.
        """
        for c in tensor.chunks:
            ct = scratch[: c.length]
            got = os.preadv(self._fd, [ct], c.file_offset)
            if got != c.length:
                raise SealedModelError(f"spill file truncated (tensor {tensor.name!r})")
            try:
                aead_decrypt_into(self._key, c.nonce, ct, c.aad, out[c.start : c.start + c.length - TAG_SIZE])
            except CryptoError as exc:
                raise SealedModelError(f"spill chunk of tensor {tensor.name!r} failed authentication") from exc
