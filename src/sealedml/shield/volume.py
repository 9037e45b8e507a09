"""Encrypted volumes: the file shield of secureTF, with rollback protection.

A volume is a directory of sealed files plus a sealed manifest. Each file is chunked
AES-256-GCM like a sealed model (``envelope/model_container.py``): its header names the
volume, the file's path and its generation, the chunk key is derived from the volume key over
all three, and every chunk's AAD carries the header digest, the chunk index and a last-chunk
flag. So:

* a changed byte fails authentication (:class:`VolumeTamperedError`);
* a file moved to another path, or two files swapped, is refused: the path is in its header
  and the manifest lists each path's digest (:class:`VolumeTamperedError`);
* a truncated or extended file is refused: the length and last flag are authenticated;
* an older copy of one file is refused: its digest is not the manifest's;
* an older copy of the whole volume — manifest and files together, the attack Gramine's
  encrypted files cannot see once a file is closed — is refused because the manifest's
  version and digest (the *root tag*) must equal what a :class:`RootTracker` holds
  (:class:`VolumeRollbackError`). The tracker must live where the storage's attacker cannot
  roll it back: the KeyService, in a deployment; :class:`MemoryTracker` is for tests.

Programs read files as bytes, through a file object (:meth:`Volume.open`), or through a
path that unmodified libraries can open (:meth:`Volume.plaintext_path`: a ``memfd``, so the
plaintext lives in memory only). File names (paths) and sizes are not hidden.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sealedml._internal.encoding import canonical_json, fields, loads_json
from sealedml.crypto import KEY_SIZE, NONCE_SIZE, TAG_SIZE, aead_decrypt, aead_encrypt, derive_nonce, hkdf_sha256
from sealedml.crypto import random_bytes as _random_bytes
from sealedml.errors import Conflict, CryptoError, EnvelopeError, InputError

__all__ = [
    "MemoryTracker",
    "RootTracker",
    "Volume",
    "VolumeError",
    "VolumeRollbackError",
    "VolumeTamperedError",
]

_MAGIC = b"SMLVOL\x00\x01"
_MANIFEST = ".volume"
_SUFFIX = ".sealed"
_CHUNK = 64 * 1024
_MAX_HEADER = 16 * 1024
_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class VolumeError(EnvelopeError):
    """A volume that cannot be used as asked (missing file, bad path)."""

    code = "volume"


class VolumeTamperedError(VolumeError):
    """A volume file or manifest that is not what was written: altered, moved, swapped or cut."""

    code = "volume_tampered"


class VolumeRollbackError(VolumeError):
    """The volume is an older (or otherwise different) state than the tracker's: restored."""

    code = "volume_rollback"


class RootTracker(Protocol):
    """Where a volume's latest root tag lives, out of the storage attacker's reach."""

    def current(self, volume_id: str) -> tuple[int, str] | None:
        """The (version, root tag) last committed, or None for a new volume."""
        ...

    def advance(self, volume_id: str, version: int, root_tag: str, previous: str | None) -> None:
        """Commit ``version``/``root_tag`` if the current tag is still ``previous``.

        Raises:
            Conflict: another writer committed first.
        """
        ...


class MemoryTracker:
    """A tracker in this process's memory (tests; a real one is in the KeyService)."""

    def __init__(self) -> None:
        self._roots: dict[str, tuple[int, str]] = {}

    def current(self, volume_id: str) -> tuple[int, str] | None:
        return self._roots.get(volume_id)

    def advance(self, volume_id: str, version: int, root_tag: str, previous: str | None) -> None:
        now = self._roots.get(volume_id)
        if (now[1] if now else None) != previous or (now is not None and version != now[0] + 1):
            raise Conflict(f"volume {volume_id} changed since it was opened")
        self._roots[volume_id] = (version, root_tag)


@dataclass(frozen=True)
class _Entry:
    generation: int
    sha256: str


def _check_path(path: str) -> str:
    if not _PATH.fullmatch(path) or any(part in (".", "..") for part in path.split("/")):
        raise InputError(f"volume paths are relative, made of letters, digits, '.', '_', '-' and '/': {path!r}")
    return path


class Volume:
    """An open volume: read and write its files; every write commits a new root to the tracker.

    Use :meth:`create` for a new volume and :meth:`open_existing` for one on disk.
    """

    def __init__(self, root: Path, volume_id: str, key: bytes, tracker: RootTracker) -> None:
        if len(key) != KEY_SIZE:
            raise InputError("a volume key is 32 bytes")
        self.root, self.volume_id, self._tracker = root, volume_id, tracker
        self._file_key = hkdf_sha256(key, salt=b"", info=fields(b"sealedml/v1/volume-file-root", volume_id))
        self._manifest_key = hkdf_sha256(key, salt=b"", info=fields(b"sealedml/v1/volume-manifest", volume_id))
        self.version = 0
        self._files: dict[str, _Entry] = {}
        self._tag: str | None = None

    @classmethod
    def create(cls, root: Path, volume_id: str, key: bytes, tracker: RootTracker) -> Volume:
        """A new, empty volume in ``root`` (created; must be empty), committed as version 1.

        Raises:
            VolumeError: ``root`` is not empty, or the tracker already knows this volume.
        """
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if any(root.iterdir()) or tracker.current(volume_id) is not None:
            raise VolumeError(f"volume {volume_id} exists already (directory not empty, or tracked)")
        volume = cls(root, volume_id, key, tracker)
        volume._commit()
        return volume

    @classmethod
    def open_existing(cls, root: Path, volume_id: str, key: bytes, tracker: RootTracker) -> Volume:
        """Open a volume and check its manifest against the tracker.

        Raises:
            VolumeTamperedError: the manifest is not authentic.
            VolumeRollbackError: the manifest is not the state the tracker holds.
        """
        volume = cls(root, volume_id, key, tracker)
        try:
            sealed = (root / _MANIFEST).read_bytes()
        except FileNotFoundError:
            raise VolumeError(f"{root} holds no volume") from None
        version, files = volume._open_manifest(sealed)
        tag = hashlib.sha256(sealed).hexdigest()
        tracked = tracker.current(volume_id)
        if tracked is None or tracked != (version, tag):
            state = "unknown to the tracker" if tracked is None else f"version {version}, tracker has {tracked[0]}"
            raise VolumeRollbackError(f"volume {volume_id} is not its latest state ({state})")
        volume.version, volume._files, volume._tag = version, files, tag
        return volume

    # --- the manifest -------------------------------------------------------------------------

    def _open_manifest(self, sealed: bytes) -> tuple[int, dict[str, _Entry]]:
        aad = fields(b"sealedml/v1/volume-manifest", self.volume_id)
        try:
            doc = loads_json(aead_decrypt(self._manifest_key, sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad))
            files = {_check_path(p): _Entry(int(e["generation"]), str(e["sha256"])) for p, e in doc["files"].items()}
            version = int(doc["version"])
        except CryptoError:
            raise VolumeTamperedError(f"the manifest of volume {self.volume_id} is not authentic") from None
        except (ValueError, KeyError, TypeError, AttributeError, InputError):
            raise VolumeTamperedError(f"the manifest of volume {self.volume_id} is malformed") from None
        return version, files

    def _commit(self) -> None:
        """Seal the manifest as the next version, commit its tag, then put it in place."""
        version = self.version + 1
        doc = {
            "volume": self.volume_id,
            "version": version,
            "files": {p: {"generation": e.generation, "sha256": e.sha256} for p, e in sorted(self._files.items())},
        }
        nonce = _random_bytes(NONCE_SIZE)
        aad = fields(b"sealedml/v1/volume-manifest", self.volume_id)
        sealed = nonce + aead_encrypt(self._manifest_key, nonce, canonical_json(doc), aad)
        tag = hashlib.sha256(sealed).hexdigest()
        temporary = self.root / f"{_MANIFEST}.{os.getpid()}.tmp"
        temporary.write_bytes(sealed)
        # Tracker first: a crash before the rename leaves the old manifest, which the tracker
        # then refuses (a safe failure), never an old state accepted.
        self._tracker.advance(self.volume_id, version, tag, self._tag)
        os.replace(temporary, self.root / _MANIFEST)
        self.version, self._tag = version, tag

    # --- files --------------------------------------------------------------------------------

    def paths(self) -> list[str]:
        """The volume's files, sorted."""
        return sorted(self._files)

    def write(self, path: str, data: bytes) -> None:
        """Seal ``data`` as ``path`` (a new generation) and commit a new volume version."""
        path = _check_path(path)
        generation = self._files[path].generation + 1 if path in self._files else 1
        sealed = self._seal(path, generation, bytes(data))
        target = self.root / (path + _SUFFIX)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(sealed)
        os.replace(temporary, target)
        self._files[path] = _Entry(generation, hashlib.sha256(sealed).hexdigest())
        self._commit()

    def read(self, path: str) -> bytes:
        """The plaintext of ``path``.

        Raises:
            VolumeError: no such file in the volume.
            VolumeTamperedError: the file is altered, moved, swapped, cut, or an older copy.
        """
        path = _check_path(path)
        entry = self._files.get(path)
        if entry is None:
            raise VolumeError(f"volume {self.volume_id} has no file {path!r}")
        try:
            sealed = (self.root / (path + _SUFFIX)).read_bytes()
        except FileNotFoundError:
            raise VolumeTamperedError(f"{path!r} is missing from volume {self.volume_id}") from None
        if hashlib.sha256(sealed).hexdigest() != entry.sha256:
            raise VolumeTamperedError(f"{path!r} is not the file the volume's manifest lists")
        return self._open(path, entry.generation, sealed)

    def open(self, path: str) -> io.BytesIO:
        """``path`` as a read-only file object (plaintext in memory)."""
        return io.BytesIO(self.read(path))

    @contextlib.contextmanager
    def plaintext_path(self, path: str) -> Iterator[str]:
        """A path an unmodified library can open: a ``memfd`` holding the plaintext (Linux).

        The plaintext never reaches a file system; the descriptor is closed on exit.
        """
        data = self.read(path)
        fd = os.memfd_create(f"sealedml-volume-{Path(path).name}", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    # --- one sealed file ----------------------------------------------------------------------

    def _keys(self, path: str, generation: int, salt: bytes) -> bytes:
        return hkdf_sha256(self._file_key, salt=salt, info=fields(b"sealedml/v1/volume-file", path, generation))

    def _seal(self, path: str, generation: int, data: bytes) -> bytes:
        n_chunks = max(1, -(-len(data) // _CHUNK))
        header = canonical_json(
            {
                "volume": self.volume_id,
                "path": path,
                "generation": generation,
                "length": len(data),
                "chunk_size": _CHUNK,
                "salt": _random_bytes(32).hex(),
                "base_nonce": _random_bytes(NONCE_SIZE).hex(),
            }
        )
        doc = loads_json(header)
        key = self._keys(path, generation, bytes.fromhex(doc["salt"]))
        digest = hashlib.sha256(_MAGIC + header).digest()
        out = bytearray(_MAGIC + len(header).to_bytes(4, "big") + header)
        base = bytes.fromhex(doc["base_nonce"])
        for index in range(n_chunks):
            chunk = data[index * _CHUNK : (index + 1) * _CHUNK]
            aad = fields(b"sealedml/v1/volume-chunk", digest, index, int(index == n_chunks - 1))
            out += aead_encrypt(key, derive_nonce(base, index), chunk, aad)
        return bytes(out)

    def _open(self, path: str, generation: int, sealed: bytes) -> bytes:
        doc, digest, body = self._header(sealed)
        if (doc.get("volume"), doc.get("path"), doc.get("generation")) != (self.volume_id, path, generation):
            raise VolumeTamperedError(f"the file at {path!r} was written for another path, volume or generation")
        try:
            length, chunk_size = int(doc["length"]), int(doc["chunk_size"])
            key = self._keys(path, generation, bytes.fromhex(str(doc["salt"])))
            base = bytes.fromhex(str(doc["base_nonce"]))
        except (KeyError, TypeError, ValueError):
            raise VolumeTamperedError(f"{path!r} has a malformed header") from None
        n_chunks = max(1, -(-length // chunk_size)) if chunk_size > 0 else -1
        if n_chunks < 0 or length < 0 or len(body) != length + n_chunks * TAG_SIZE:
            raise VolumeTamperedError(f"{path!r} is truncated or extended")
        out, offset = bytearray(), 0
        for index in range(n_chunks):
            size = min(chunk_size, length - index * chunk_size) + TAG_SIZE
            aad = fields(b"sealedml/v1/volume-chunk", digest, index, int(index == n_chunks - 1))
            try:
                out += aead_decrypt(key, derive_nonce(base, index), body[offset : offset + size], aad)
            except CryptoError:
                raise VolumeTamperedError(f"{path!r} failed authentication") from None
            offset += size
        return bytes(out)

    @staticmethod
    def _header(sealed: bytes) -> tuple[dict[str, Any], bytes, bytes]:
        if sealed[: len(_MAGIC)] != _MAGIC or len(sealed) < len(_MAGIC) + 4:
            raise VolumeTamperedError("not a sealed volume file")
        length = int.from_bytes(sealed[len(_MAGIC) : len(_MAGIC) + 4], "big")
        start = len(_MAGIC) + 4
        raw = sealed[start : start + length]
        try:
            doc = loads_json(raw) if length <= _MAX_HEADER else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or canonical_json(doc) != raw:
            raise VolumeTamperedError("a sealed volume file with a malformed header")
        return doc, hashlib.sha256(_MAGIC + raw).digest(), sealed[start + length :]
