"""Files that exist only in this process's memory: a session's injected files and mounted volumes.

An unmodified program opens ``/run/secrets/db.txt`` or ``/data/train.csv`` as it always did.
:class:`VirtualFiles` answers those paths from memory: injected files from the bundle (never
written anywhere), and the files of encrypted volumes, decrypted on open and sealed again on
close (each close commits a new volume root to the KeyService). Under Gramine or in a
confidential VM the process's memory is the TEE's, so none of it reaches the host in clear.

What is served: Python-level ``open``/``io.open`` (so ``pathlib``'s ``open``, ``read_text``,
``read_bytes``, ``write_*`` too), ``os.stat`` (``exists``, ``is_file``, ``is_dir``) and
``os.listdir`` (``iterdir``) on those paths. Native code that opens a path itself (a C library
given the file name) does not see them: give it :meth:`~sealedml.shield.volume.Volume.plaintext_path`
or, under Gramine, an ``encrypted`` mount keyed from the session (docs/sessions.md).
"""

from __future__ import annotations

import builtins
import errno
import functools
import io
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from sealedml.errors import InputError
from sealedml.shield.volume import Volume

__all__ = ["VirtualFiles"]

_FILE_MODE = stat.S_IFREG | 0o400
_DIR_MODE = stat.S_IFDIR | 0o500


class _SealOnClose(io.BytesIO):
    """A file being written into a volume: sealed and committed when closed."""

    def __init__(self, commit: Callable[[bytes], None], initial: bytes = b"") -> None:
        super().__init__(initial)
        self.seek(0, io.SEEK_END)
        self._commit: Callable[[bytes], None] | None = commit

    def close(self) -> None:
        commit, self._commit = self._commit, None
        if commit is not None and not self.closed:
            commit(self.getvalue())
        super().close()


class VirtualFiles:
    """Paths served from memory to this process (see the module docstring).

    Use :meth:`add_file` and :meth:`mount`, then :meth:`install`; :meth:`uninstall` restores
    the originals.
    """

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        self._mounts: dict[str, Volume] = {}
        self._lock = threading.Lock()
        self._originals: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what is served
    def add_file(self, path: str, data: bytes) -> None:
        """Serve ``data`` read-only at the absolute ``path``."""
        if not os.path.isabs(path):
            raise InputError(f"injected file paths are absolute: {path!r}")
        self._files[os.path.normpath(path)] = bytes(data)

    def mount(self, path: str, volume: Volume) -> None:
        """Serve ``volume``'s files under the absolute directory ``path`` (read and write)."""
        if not os.path.isabs(path):
            raise InputError(f"volume mount points are absolute: {path!r}")
        self._mounts[os.path.normpath(path)] = volume

    def _resolve(self, file: Any) -> tuple[str, Volume | None, str] | None:
        """(kind, volume, path inside it) for a path this serves; None for every other path."""
        if isinstance(file, int) or not isinstance(file, (str, bytes, os.PathLike)):
            return None
        raw = os.fsdecode(os.fspath(file))
        if not os.path.isabs(raw):
            return None
        path = os.path.normpath(raw)
        if path in self._files:
            return "file", None, path
        for mount, volume in self._mounts.items():
            if path == mount:
                return "dir", volume, ""
            if path.startswith(mount + os.sep):
                inner = path[len(mount) + 1 :]
                if inner in volume.paths():
                    return "file", volume, inner
                if any(p.startswith(inner + "/") for p in volume.paths()):
                    return "dir", volume, inner
                return "absent", volume, inner
        if any(f.startswith(path + os.sep) for f in self._files):
            return "dir", None, path
        return None

    # ------------------------------------------------------------------ the replacements
    def _open(
        self,
        file: Any,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        closefd: bool = True,
        opener: Any = None,
    ) -> IO[Any]:
        found = self._resolve(file)
        if found is None:
            return self._original("open")(file, mode, buffering, encoding, errors, newline, closefd, opener)  # type: ignore[no-any-return]
        kind, volume, inner = found
        writing = any(c in mode for c in "wax+")
        name = os.fsdecode(os.fspath(file))
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, "is a directory", name)
        if volume is None:  # an injected file
            if writing:
                raise PermissionError(errno.EACCES, "injected files are read-only", name)
            raw: io.BytesIO = io.BytesIO(self._files[inner])
        elif "+" in mode:
            raise OSError(errno.EOPNOTSUPP, "volume files open for reading or for writing, not both", name)
        elif writing:
            if "x" in mode and kind == "file":
                raise FileExistsError(errno.EEXIST, "file exists", name)
            initial = volume.read(inner) if "a" in mode and kind == "file" else b""
            raw = _SealOnClose(functools.partial(self._write, volume, inner), initial)
        elif kind == "absent":
            raise FileNotFoundError(errno.ENOENT, "no such file in the volume", name)
        else:
            raw = io.BytesIO(volume.read(inner))
        if "b" in mode:
            return raw
        return io.TextIOWrapper(raw, encoding=encoding or "utf-8", errors=errors, newline=newline)

    def _write(self, volume: Volume, inner: str, data: bytes) -> None:
        with self._lock:  # one commit at a time: each advances the volume's root by one
            volume.write(inner, data)

    def _stat(self, path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        found = self._resolve(path)
        if found is None:
            return self._original("stat")(path, *args, **kwargs)  # type: ignore[no-any-return]
        kind, volume, inner = found
        if kind == "absent":
            raise FileNotFoundError(errno.ENOENT, "no such file in the volume", os.fsdecode(os.fspath(path)))
        size = 0
        if kind == "file":
            size = len(self._files[inner]) if volume is None else len(volume.read(inner))
        now = int(time.time())
        mode = _FILE_MODE if kind == "file" else _DIR_MODE
        return os.stat_result((mode, 0, 0, 1, os.getuid(), os.getgid(), size, now, now, now))

    def _listdir(self, path: Any = ".") -> list[Any]:
        found = self._resolve(path) if path != "." else None
        if found is None or found[0] != "dir":
            return self._original("listdir")(path)  # type: ignore[no-any-return]
        _, volume, inner = found
        if volume is None:
            base = inner + os.sep
            names = {f[len(base) :].split(os.sep)[0] for f in self._files if f.startswith(base)}
        else:
            base = f"{inner}/" if inner else ""
            names = {p[len(base) :].split("/")[0] for p in volume.paths() if p.startswith(base)}
        return sorted(names)

    # ------------------------------------------------------------------ installing
    def _original(self, name: str) -> Any:
        if self._originals is None:
            raise RuntimeError("VirtualFiles is not installed")
        return self._originals[name]

    def install(self) -> None:
        """Serve the paths to this process from now on."""
        if self._originals is not None:
            return
        self._originals = {"open": io.open, "stat": os.stat, "listdir": os.listdir}
        builtins.open = io.open = self._open  # type: ignore[assignment]
        os.stat = self._stat
        os.listdir = self._listdir

    def uninstall(self) -> None:
        """Restore the process's own ``open``, ``os.stat`` and ``os.listdir``."""
        if self._originals is None:
            return
        builtins.open = io.open = self._originals["open"]
        os.stat = self._originals["stat"]
        os.listdir = self._originals["listdir"]
        self._originals = None
