"""Faulted-in heap kept free for the next model load, topped up after each request that loaded one.

A model load allocates tens of megabytes (MobileNetV2: the 14 MB decrypted payload and
about as much again in ONNX Runtime's packed weights). Memory a process has never
touched costs a page fault per 4 KiB, and on this project's VM a fault costs several
microseconds: ~9,500 faults were ~25 ms of a 70 ms load. A fresh instance faults in
48 MB while it waits for its first request, so its first load was fast; but every later
load in the same instance (a packed instance holds many models) paid the faults again.
Measured in one process, five MobileNetV2 loads after the first: decryption 13–18 ms and
session creation 20–29 ms with ~9,500 faults each; with the reserve topped up between
loads, 7–10 ms and 11–18 ms with ~20 faults.

:class:`HeapReserve` keeps that much of the heap faulted in and free: one thread, at
idle priority (it takes only CPU time nothing else wants), allocates zero-filled pieces
and frees them again after each request that loaded a model. A load that starts while it
is working stops it at the next 4 MB piece and finds whatever it had faulted in already
free. The pieces go through glibc without the GIL
(:func:`~sealedml._internal.malloc.prefault_heap`), so the faults never stall the event
loop. It only works when the loading thread and the reserve's thread allocate from the
same glibc arena: instances run with a single arena
(:func:`sealedml._internal.malloc.single_arena`).

What it costs: the instance's resident memory includes the reserve between loads (it
did already between start and the first load), and about 0.1 s of otherwise idle CPU
time per load. What it does not change: freed memory is zeroed as it is faulted in, so
the reserve holds no stale plaintext.
"""

from __future__ import annotations

import logging
import threading

from sealedml._internal.malloc import prefault_heap
from sealedml._internal.priority import yield_to_compute
from sealedml.errors import ConfigurationError

__all__ = ["HEAP_RESERVE_MODES", "HeapReserve"]

#: ``after-loads``: at start and after each request that loaded a model (packed instances);
#: ``at-start``: only before the first load (one model per instance, or scarce memory);
#: ``off``: never.
HEAP_RESERVE_MODES = ("after-loads", "at-start", "off")

log = logging.getLogger(__name__)


class HeapReserve:
    """Keeps ``nbytes`` of this process's heap faulted in and free, on a background thread.

    Args:
        nbytes: the reserve's size.
        after_loads: top it up after every load (False: only when :meth:`replenish` is called).
    """

    def __init__(self, nbytes: int, *, after_loads: bool = True) -> None:
        self.nbytes = nbytes
        self.after_loads = after_loads and nbytes > 0
        #: Completed top-ups (a top-up a load interrupted does not count).
        self.top_ups = 0
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._loads = 0
        self._due = False
        self._closed = False
        self._thread: threading.Thread | None = None

    @classmethod
    def for_mode(cls, mode: str, nbytes: int) -> HeapReserve:
        """The reserve a :data:`HEAP_RESERVE_MODES` mode asks for.

        Raises:
            ConfigurationError: an unknown mode.
        """
        if mode not in HEAP_RESERVE_MODES:
            raise ConfigurationError(f"unknown heap reserve mode {mode!r}; choose from {', '.join(HEAP_RESERVE_MODES)}")
        return cls(0 if mode == "off" else nbytes, after_loads=mode == "after-loads")

    @property
    def mode(self) -> str:
        """This reserve's :data:`HEAP_RESERVE_MODES` mode."""
        return "off" if self.nbytes == 0 else "after-loads" if self.after_loads else "at-start"

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def replenish(self) -> None:
        """Fault the reserve in again soon (after a load used it, or at start)."""
        with self._lock:
            if self._closed or self.nbytes == 0:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="heap-reserve", daemon=True)
                self._thread.start()
        self._wanted.set()

    def load_started(self) -> None:
        """A model load begins: a top-up under way stops at its next piece and frees what it holds."""
        with self._lock:
            self._loads += 1

    def load_finished(self) -> None:
        """A model load ended (successfully or not): top the reserve up after the request (:meth:`request_finished`)."""
        with self._lock:
            self._loads -= 1
            self._due = self._due or self.after_loads

    def request_finished(self) -> None:
        """A request ended: if a load used the reserve and none is running, top it up now.

        Not as soon as the load ends: the request's first run of the new model allocates
        ONNX Runtime's activation buffers, and a top-up beside it would take the free pages
        that run is about to reuse. Called on every request: without a load to follow up,
        one attribute read.
        """
        if not self._due:
            return
        with self._lock:
            due = self._due and self._loads == 0
            if due:
                self._due = False
        if due:
            self.replenish()

    def close(self) -> None:
        """Stop the background thread; it frees what it holds after the piece it is allocating.

        Does not wait for it (a daemon thread at idle priority may wait for a free core).
        """
        with self._lock:
            self._closed = True
        self._wanted.set()

    def _interrupted(self) -> bool:
        return self._closed or self._loads > 0

    def _run(self) -> None:
        yield_to_compute()
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            if self._loads or self._due:
                continue  # asked again after the loading request (request_finished)
            done = prefault_heap(self.nbytes, stop=self._interrupted)
            if done >= self.nbytes:
                self.top_ups += 1
            else:
                log.debug("heap reserve top-up stopped at %d of %d bytes for a model load", done, self.nbytes)
