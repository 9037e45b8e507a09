"""The sealed container a model streams from: its readers, and a segment's weights decrypted from it.

Occlumency's on-demand weight loading (Lee et al., MobiCom 2019): weights stay encrypted
outside and are decrypted and integrity checked right before the layer that needs them.
:meth:`Container.decrypt` does that for one segment of a plan. It reads only the AES-GCM
chunks that cover each weight slice and authenticates each chunk before its bytes are used.

A model reads its container through one shared reader (reads are ``pread`` or slices of
immutable bytes) or through a fresh reader per run from a factory (:class:`RunReaders`:
opened on first use and closed after the run; optimized runs may need none).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from sealedml.crypto import TAG_SIZE
from sealedml.envelope.model_container import SealedModelReader, TensorEntry
from sealedml.errors import ConfigurationError, SealedModelError
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.analysis import shape_tensors, with_values
from sealedml.runtime.memory_bounded.run_arena import DecryptedWeights, wipe
from sealedml.runtime.memory_bounded.segments import Plan, Segment

__all__ = ["Container", "ReaderSource", "RunReaders", "decrypt_reserve", "planning_graph"]

#: A reader, or a function returning a fresh reader for each request (closed after it).
ReaderSource = SealedModelReader | Callable[[], SealedModelReader]


def planning_graph(reader: SealedModelReader) -> onnx.ModelProto:
    """The container's graph as the planner should read it.

    Sealed weights stay external placeholders, except the small integer tensors whose
    values shape inference needs (``Reshape`` targets, ``Unsqueeze`` axes; see
    :func:`~.analysis.shape_tensors`): those are decrypted and inlined, so the plan knows
    every activation's size instead of estimating it. They remain sealed weights of the
    plan, read per segment like the others.

    Args:
        reader: a reader of the container.

    Returns:
        The graph, to pass to :func:`~.planner.plan` with the manifest's weight sizes.

    Raises:
        SealedModelError: the graph or a tensor fails authentication.
    """
    graph = reader.graph()
    sizes = {entry.name: entry.length for entry in reader.manifest.tensors}
    names = shape_tensors(graph, sizes)
    return with_values(graph, {name: reader.tensor(name) for name in names}) if names else graph


def decrypt_reserve(chunk_size: int) -> int:
    """Scratch bytes one decrypting thread holds besides the weight buffers (sealed path).

    One ciphertext chunk being read, its plaintext, and the previous chunk's
    plaintext kept for a tensor that starts inside it.

    Args:
        chunk_size: the container's plaintext chunk size.

    Returns:
        The bytes the planner must keep out of the budget.
    """
    return 3 * chunk_size + TAG_SIZE


class Container:
    """What a model knows of its sealed container: the header and where each sealed weight lies.

    Read once, from the reader the model is built with; later readers must be for the same
    container (same header bytes).

    Args:
        reader: a reader of the container; kept and shared by every run unless ``factory``
            is given.
        factory: opens a fresh reader per run that needs the container (then ``reader`` is
            only read here, and the caller closes it).

    Raises:
        SealedModelError: the header or the manifest fails authentication.
    """

    def __init__(self, reader: SealedModelReader, factory: Callable[[], SealedModelReader] | None = None) -> None:
        header = reader.header
        self._shared = reader if factory is None else None
        self._factory = factory
        self._header_raw = header.raw
        #: The container's plaintext chunk size.
        self.chunk_size = header.chunk_size
        self._entries: dict[str, TensorEntry] = {entry.name: entry for entry in reader.manifest.tensors}

    @property
    def weight_sizes(self) -> dict[str, int]:
        """Byte size of every sealed weight, as the planner takes them."""
        return {name: entry.length for name, entry in self._entries.items()}

    @property
    def reserve_bytes(self) -> int:
        """Scratch one thread holds while decrypting from this container (:func:`decrypt_reserve`)."""
        return decrypt_reserve(self.chunk_size)

    def check_plan(self, plan: Plan) -> None:
        """Check that every weight slice ``plan`` reads lies inside a sealed tensor.

        Args:
            plan: the plan.

        Raises:
            ConfigurationError: the plan reads a weight the container does not hold.
        """
        for segment in plan.segments:
            for weight in segment.weights:
                entry = self._entries.get(weight.tensor)
                if entry is None or weight.byte_start + weight.nbytes > entry.length:
                    raise ConfigurationError(f"plan reads weight {weight.name!r} that the container does not hold")

    def open(self) -> SealedModelReader:
        """The shared reader, or a fresh one from the factory (the caller closes it).

        Returns:
            A reader of this container.

        Raises:
            SealedModelError: the factory's reader is for another container.
        """
        if self._shared is not None:
            return self._shared
        if self._factory is None:  # pragma: no cover - the constructor sets one of the two
            raise ConfigurationError("no container reader")
        reader = self._factory()
        if reader.header.raw != self._header_raw:
            reader.close()
            raise SealedModelError("the sealed container changed since the model was planned")
        return reader

    def run_readers(self) -> RunReaders:
        """The reader of one run, opened on first use.

        Returns:
            An unopened :class:`RunReaders`; close it after the run.
        """
        return RunReaders(self.open, owned=self._factory is not None)

    def decrypt(self, reader: SealedModelReader, segment: Segment, tracker: MemoryTracker) -> DecryptedWeights:
        """Decrypt one segment's weights from the sealed container into fresh buffers.

        Occlumency's on-demand weight loading: reads only the chunks covering each weight
        slice; each chunk is authenticated before its bytes are used. Chunks shared by
        adjacent tensors are decrypted once, into one reused chunk buffer that is zeroed
        at the end (freed memory is not cleared, so nothing is left to linger in it).

        Args:
            reader: a reader of this container.
            segment: the segment.
            tracker: counts the weights (until wiped) and the scratch (while decrypting).

        Returns:
            The weights, counted in ``tracker``; zero them with :func:`~.run_arena.wipe`.

        Raises:
            SealedModelError: a chunk fails authentication or is short.
        """
        started = time.perf_counter()
        chunk_size = self.chunk_size
        scratch = decrypt_reserve(chunk_size)
        arrays: dict[str, np.ndarray] = {}
        held = 0
        tracker.add(scratch, "scratch")
        plain = np.empty(chunk_size, dtype=np.uint8)
        try:
            cached_index, cached = -1, 0
            chunk = memoryview(plain.data)
            for weight in sorted(segment.weights, key=lambda w: self._entries[w.tensor].offset + w.byte_start):
                buf = np.empty(weight.nbytes, dtype=np.uint8)
                tracker.add(weight.nbytes, "weights")
                held += weight.nbytes
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(weight.data_type))
                arrays[weight.name] = buf.view(dtype).reshape(weight.dims)
                start = self._entries[weight.tensor].offset + weight.byte_start
                end = start + weight.nbytes
                view = memoryview(buf.data)
                pos = start
                while pos < end:
                    index = pos // chunk_size
                    if index != cached_index:
                        cached_index, cached = index, reader.chunk_into(index, chunk)
                    lo = pos - index * chunk_size
                    n = min(cached - lo, end - pos)
                    if n <= 0:
                        raise SealedModelError("weight range runs past the sealed payload")
                    view[pos - start : pos - start + n] = chunk[lo : lo + n]
                    pos += n
        except BaseException:
            wipe(arrays)
            tracker.release(held, "weights")
            raise
        finally:
            plain[:] = 0
            tracker.release(scratch, "scratch")
        return DecryptedWeights(arrays, held, time.perf_counter() - started)


class RunReaders:
    """The container reader of one run, opened on first use (optimized runs may need none).

    Args:
        open_reader: returns a reader (:meth:`Container.open`).
        owned: readers from ``open_reader`` belong to the run: :meth:`close` closes them.
    """

    def __init__(self, open_reader: Callable[[], SealedModelReader], *, owned: bool) -> None:
        self._open = open_reader
        self._owned = owned
        self._reader: SealedModelReader | None = None
        self._lock = threading.Lock()

    def get(self) -> SealedModelReader:
        """The run's reader (any thread).

        Returns:
            The reader, opened by the first call.

        Raises:
            SealedModelError: the reader opened is for another container.
        """
        with self._lock:
            if self._reader is None:
                self._reader = self._open()
            return self._reader

    def close(self) -> None:
        """End of the run: close the reader if it is the run's own."""
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None and self._owned:
            reader.close()
