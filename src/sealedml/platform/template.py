"""Instances forked from a pre-imported template process (OpenWhisk's prewarm, Lambda's SnapStart).

Most of a cold start used to be a fresh interpreter importing NumPy, ONNX
Runtime, ``cryptography`` and the web stack (about 0.6 s of 0.8 s). The
template is the standard library's *forkserver*: one process, started once per
platform, that has imported all of that and forks each new instance. The child
then runs exactly what ``sealedml worker serve`` runs — the same argument list,
the same code — only without the imports.

What siblings must not share. The template imports code and nothing else: it
creates no key, opens no socket, draws no randomness. Everything secret an
instance holds — its attestation key, its RA-TLS key, the keys released to it,
session keys — is made after the fork, by the child. Random state is renewed in
every child before the instance starts (:func:`reseed_after_fork`): Python's
``random`` and NumPy's global generator from the OS; OpenSSL (under
``cryptography``) reseeds on fork by itself, and ``secrets`` reads the OS each
time. ``tests/unit/platform/test_template.py`` checks that two children hold
different keys and random state.

A forked instance has no parent but the template, so :class:`ForkedInstance`
offers the platform the part of :class:`asyncio.subprocess.Process` it uses
(``pid``, ``returncode``, ``send_signal``, ``kill``, ``wait``, ``stdout``).
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["PRELOAD", "ForkedInstance", "fork", "fork_instance", "reseed_after_fork", "warm_up"]

# What ``worker serve`` imports before it listens; the template imports it once.
PRELOAD = (
    "sealedml.platform.template_arena",  # first: before any library starts a thread
    "numpy",
    "numpy.random",  # its global generator is then copied by every fork: reseed_after_fork()
    "onnxruntime",
    "cryptography.hazmat.primitives.ciphers.aead",
    "uvicorn",
    "starlette.applications",
    "sealedml.cli.main",
    "sealedml.runtime.server",
    "sealedml.runtime.app",
    "sealedml._internal.serve",
)

_lock = threading.Lock()
_context: Any = None


def _forkserver() -> Any:
    """The forkserver context, its preload list set before it first starts."""
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(list(PRELOAD))
            _context = context
        return _context


def _ready() -> None:
    """A child that does nothing: it exists once the template has finished importing."""


def warm_up() -> None:
    """Start the template now and return once it can fork (a second or two of imports), rather
    than make the first cold start wait for it."""
    probe = _forkserver().Process(target=_ready, daemon=True)
    probe.start()
    probe.join()


def reseed_after_fork() -> None:
    """Give this (forked) process random state of its own, drawn from the OS."""
    import numpy as np

    random.seed()
    np.random.seed()


def _child(target: Callable[..., Any], args: Sequence[Any], stdout: socket.socket, workdir: str) -> None:
    """Runs in the child: stdout to the platform's socket, a private directory, fresh random state."""
    os.dup2(stdout.fileno(), 1)
    stdout.close()
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    # As for a spawned instance: whatever a library caches stays in the instance's directory.
    os.environ["XDG_CACHE_HOME"] = workdir
    os.chdir(workdir)
    reseed_after_fork()
    try:
        code = target(*args)
    except BrokenPipeError:
        # The platform was stopped first (a stop signals its whole process group) and no
        # longer reads: the instance's last line goes nowhere. Not a failure of the instance.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        code = 0
    finally:
        # multiprocessing ends a child with os._exit, which skips atexit: the instance's
        # private working directory and the like are removed here instead.
        atexit._run_exitfuncs()
    sys.exit(code if isinstance(code, int) else 0)


def _worker_main(argv: Sequence[str]) -> int:
    from sealedml.cli.main import main

    return main(list(argv))


class ForkedInstance:
    """A child of the template, seen as the platform sees a subprocess."""

    def __init__(self, process: Any, stdout: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._process = process
        self.stdout: asyncio.StreamReader | None = stdout
        # Held, not used: a StreamWriter closes the socket when it is collected.
        self._writer = writer
        self._exited: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def returncode(self) -> int | None:
        code = self._process.exitcode
        return None if code is None else int(code)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the child to end (the template reaps it and reports its status)."""
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            if self._exited is None:
                exited: asyncio.Future[None] = loop.create_future()
                sentinel = self._process.sentinel

                def ended() -> None:
                    loop.remove_reader(sentinel)
                    if not exited.done():
                        exited.set_result(None)

                loop.add_reader(sentinel, ended)
                self._exited = exited
            await asyncio.shield(self._exited)
        self._process.join(0)
        self._writer.close()
        code = self.returncode
        return -1 if code is None else code


async def fork(target: Callable[..., Any], args: Sequence[Any], workdir: str) -> ForkedInstance:
    """Fork ``target(*args)`` from the template, in ``workdir``, its stdout readable by the caller.

    ``target`` must be importable by name (it is sent to the template pickled).
    """
    context = _forkserver()
    ours, theirs = socket.socketpair()
    try:
        process = context.Process(target=_child, args=(target, tuple(args), theirs, workdir), daemon=True)
        # Connecting to the template (starting it the first time) blocks: not on the event loop.
        await asyncio.to_thread(process.start)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    return ForkedInstance(process, reader, writer)


async def fork_instance(argv: Sequence[str], workdir: str) -> ForkedInstance:
    """Fork a runtime instance: ``sealedml *argv`` (a ``worker serve`` command line) from the template."""
    return await fork(_worker_main, (tuple(argv),), workdir)
