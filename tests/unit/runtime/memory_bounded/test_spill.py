"""The spill file (:mod:`sealedml.runtime.memory_bounded.spill`) and ``aead_decrypt_into``."""

from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto

from sealedml.crypto import TAG_SIZE, aead_encrypt
from sealedml.crypto.aead import aead_decrypt_into
from sealedml.errors import CryptoError, SealedModelError
from sealedml.runtime.memory_bounded import spill_chunk_size
from sealedml.runtime.memory_bounded.spill import ALIGN, SpillEntry, SpillStore


def tensors(seed: int = 0) -> list[tuple[str, int, tuple[int, ...], memoryview]]:
    rng = np.random.default_rng(seed)
    arrays = {
        "a": rng.standard_normal((3, 1000)).astype(np.float32),  # 12 000 bytes: 3 chunks of 4096 + 1
        "b": rng.standard_normal(7).astype(np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "i": np.arange(5000, dtype=np.int64),
    }
    return [
        (name, TensorProto.INT64 if a.dtype == np.int64 else TensorProto.FLOAT, a.shape, memoryview(a))
        for name, a in arrays.items()
    ]


def read(spill: SpillStore, entry: SpillEntry) -> dict[str, np.ndarray]:
    blob = np.empty(entry.nbytes, np.uint8)
    scratch = memoryview(np.empty(spill.scratch_bytes, np.uint8)) if spill.scratch_bytes else None
    spill.read_into(entry, memoryview(blob), scratch)
    return entry.views(blob)


@pytest.mark.parametrize("in_memory", [True, False])
def test_round_trip_contiguous_entries(tmp_path: object, in_memory: bool) -> None:
    spill = SpillStore(4096, None if in_memory else str(tmp_path))
    assert spill.in_memory == in_memory
    assert spill.scratch_bytes == (0 if in_memory else 4096 + TAG_SIZE)
    first = spill.write(0, tensors(0))
    second = spill.write(1, tensors(1))
    assert first.offset == 0 and second.offset == first.length == spill.size - second.length
    for entry, seed in ((first, 0), (second, 1)):
        originals = {name: np.frombuffer(view.tobytes(), np.uint8) for name, _, _, view in tensors(seed)}
        got = read(spill, entry)
        assert list(got) == list(originals)
        for tensor in entry.tensors:
            assert tensor.offset % ALIGN == 0
            assert np.array_equal(got[tensor.name].reshape(-1).view(np.uint8), originals[tensor.name])
            assert got[tensor.name].shape == tensor.dims
        position = entry.offset
        for chunk in entry.chunks:
            assert chunk.position == position  # back to back: one contiguous range per segment
            position += chunk.length
        assert position == entry.offset + entry.length
    # 12 000 + 28 + 0 + 40 000 bytes, aligned to 64: 52 096 bytes in 13 chunks of 4096.
    assert first.nbytes == 52_096 and len(first.chunks) == 13
    nonces = [c.nonce for e in (first, second) for c in e.chunks]
    assert len(set(nonces)) == len(nonces)  # one counter for every chunk of the store
    assert not os.listdir(str(tmp_path))  # anonymous, or not on disk at all: nothing to see
    spill.close()


def test_in_memory_store_refuses_tampered_moved_and_discarded_entries() -> None:
    spill = SpillStore(4096)
    entry = spill.write(0, tensors())
    other = spill.write(1, tensors())
    assert spill.size == entry.length + other.length
    with pytest.raises(ValueError, match="in memory"):
        _ = spill.fileno
    stored = spill.stored(entry)
    assert stored.nbytes == entry.length
    c0, c1 = entry.chunks[0], entry.chunks[1]
    at = c1.position - entry.offset
    original = bytes(stored[at : at + c1.length])
    stored[at] ^= 1
    with pytest.raises(SealedModelError, match="failed authentication"):
        read(spill, entry)
    stored[at : at + c1.length] = original
    assert read(spill, entry).keys() == {"a", "b", "empty", "i"}
    # A valid chunk at the wrong place, or the same index of another entry: the AAD binds both.
    stored[at : at + c1.length] = stored[0 : c0.length]
    with pytest.raises(SealedModelError, match="failed authentication"):
        read(spill, entry)
    theirs = spill.stored(other)
    stored[at : at + c1.length] = theirs[c1.position - entry.offset : c1.position - entry.offset + c1.length]
    with pytest.raises(SealedModelError, match="failed authentication"):
        read(spill, entry)
    # A superseded entry is dropped: reading it is a typed error, and the memory is released.
    spill.discard(entry)
    assert not spill.intact(entry) and spill.intact(other)
    assert spill.size == other.length
    with pytest.raises(SealedModelError, match="discarded"):
        read(spill, entry)
    with pytest.raises(ValueError):
        spill.stored(entry)
    spill.close()
    assert spill.size == 0


def test_file_store_needs_a_scratch_buffer(tmp_path: object) -> None:
    spill = SpillStore(4096, str(tmp_path))
    entry = spill.write(0, tensors())
    with pytest.raises(ValueError, match="scratch"):
        spill.read_chunk(entry, 0, memoryview(np.empty(entry.nbytes, np.uint8)))
    with pytest.raises(ValueError, match="no in-memory ciphertext"):
        spill.stored(entry)
    spill.close()


def test_tampered_moved_and_truncated_chunks_are_refused(tmp_path: object) -> None:
    spill = SpillStore(4096, str(tmp_path))
    entry = spill.write(0, tensors())
    other = spill.write(1, tensors())
    fd = spill.fileno
    c0, c1 = entry.chunks[0], entry.chunks[1]
    original = os.pread(fd, c1.length, c1.position)
    os.pwrite(fd, bytes([original[0] ^ 1]), c1.position)
    with pytest.raises(SealedModelError, match="failed authentication"):
        read(spill, entry)
    os.pwrite(fd, original, c1.position)
    read(spill, entry)
    # A valid chunk at the wrong place (same length): the AAD binds its position...
    os.pwrite(fd, os.pread(fd, c0.length, c0.position), c1.position)
    with pytest.raises(SealedModelError, match="failed authentication"):
        read(spill, entry)
    # ...and its entry: the same plaintext at the same index of another entry does not pass.
    os.pwrite(fd, os.pread(fd, other.chunks[1].length, other.chunks[1].position), c1.position)
    with pytest.raises(SealedModelError, match="failed authentication"):
        read(spill, entry)
    os.pwrite(fd, original, c1.position)
    os.ftruncate(fd, other.chunks[-1].position + 10)
    with pytest.raises(SealedModelError, match="truncated"):
        read(spill, other)
    spill.close()


def test_aead_decrypt_into_wipes_the_buffer_on_failure() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    plaintext = os.urandom(5000)
    sealed = aead_encrypt(key, nonce, plaintext, b"aad")
    out = np.zeros(5000, np.uint8)
    assert aead_decrypt_into(key, nonce, memoryview(sealed), b"aad", memoryview(out)) == 5000
    assert out.tobytes() == plaintext
    bad = bytearray(sealed)
    bad[7] ^= 1
    out[:] = 7
    with pytest.raises(CryptoError, match="authentication failed"):
        aead_decrypt_into(key, nonce, bad, b"aad", memoryview(out))
    assert not out.any()  # no unauthenticated plaintext left behind
    with pytest.raises(CryptoError):
        aead_decrypt_into(key, nonce, sealed, b"other", memoryview(out))
    with pytest.raises(CryptoError, match="buffer"):
        aead_decrypt_into(key, nonce, sealed, b"aad", memoryview(np.zeros(10, np.uint8)))
    with pytest.raises(CryptoError, match="nonce"):
        aead_decrypt_into(key, nonce[:8], sealed, b"aad", memoryview(out))


def test_spill_chunk_size_fits_the_reserve() -> None:
    assert spill_chunk_size(1 << 20, 3 * 256 * 1024 + 16) == 768 * 1024
    assert spill_chunk_size(1 << 20, 8 << 20) == 1 << 20
    assert spill_chunk_size(1 << 20, 3 * 1024 + 16) == 3072
    assert spill_chunk_size(1 << 20, 10) == 1
