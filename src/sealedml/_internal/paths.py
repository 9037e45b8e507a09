"""Per-host locations (``$SEALEDML_HOME``, default ``~/.sealedml``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["sealedml_home", "write_private_file_once"]


def sealedml_home() -> Path:
    """The per-host SealedML directory (created on demand, mode 0700)."""
    home = Path(os.environ.get("SEALEDML_HOME") or Path.home() / ".sealedml")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def write_private_file_once(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` (mode 0600) unless it exists; race-free.

    Returns:
        True if this call created the file, False if it already existed.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic: fails if another process won the race
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links (Gramine does not implement link/linkat): create-exclusive
        # directly. A crash mid-write leaves a short file, which unsealing rejects.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)
