"""The model store: untrusted storage of sealed model containers.

It holds only ciphertext, so it needs no trust: the runtime authenticates
every chunk, and the KeyService names the version a runtime must load, so the
store cannot roll a model back to an old version either.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
from pathlib import Path

from sealedml.envelope.request import ID_PATTERN
from sealedml.errors import ConfigurationError, NotFound, StoreError

__all__ = ["LINEAR_FILE", "PART_FILES", "LocalModelStore", "ModelStore"]

#: The files of a partitioned model version besides its sealed front (``v<N>.sealed``): the
#: sealed back, the middle in the clear (the owner chose to run it outside the TEE) and the
#: partition manifest, whose digest both sealed parts carry in their authenticated headers.
#: A blinded partition seals its middle (``middle.sealed``) and stores each outsourced layer's
#: quantized weights in the clear (``linear-<i>.onnx``, :data:`LINEAR_FILE`).
PART_FILES = ("back.sealed", "middle.onnx", "middle.sealed", "partition.json")
LINEAR_FILE = re.compile(r"linear-[0-9]{1,4}\.onnx")

_ID = re.compile(ID_PATTERN)


class ModelStore(abc.ABC):
    """Where sealed models are kept."""

    @abc.abstractmethod
    def put(self, model_id: str, version: int, sealed: bytes) -> None:
        """Store a sealed container (atomically; never overwrites a version)."""

    @abc.abstractmethod
    def path(self, model_id: str, version: int) -> Path:
        """A local file path of the container (for random access).

        Raises:
            NotFound: no such model version.
        """

    @abc.abstractmethod
    def versions(self, model_id: str) -> list[int]:
        """Stored versions of a model, ascending."""

    def put_file(self, model_id: str, version: int, source: Path) -> None:
        """Store a sealed container from a file (as :meth:`put`; a local store copies it in a stream)."""
        self.put(model_id, version, source.read_bytes())

    @abc.abstractmethod
    def delete(self, model_id: str) -> int:
        """Remove every stored file of a model (``model delete``); how many there were."""

    @abc.abstractmethod
    def put_part(self, model_id: str, version: int, name: str, data: bytes) -> None:
        """Store one more file of a partitioned model version (one of :data:`PART_FILES`).

        The sealed front goes in with :meth:`put`, last: a version exists once it is there.
        """

    @abc.abstractmethod
    def part_path(self, model_id: str, version: int, name: str) -> Path:
        """A local path of one file of a partitioned model version.

        Raises:
            NotFound: the file is not in the store.
        """

    def read(self, model_id: str, version: int) -> bytes:
        """The whole container."""
        return self.path(model_id, version).read_bytes()

    def latest_version(self, model_id: str) -> int | None:
        """The highest stored version, or None."""
        versions = self.versions(model_id)
        return versions[-1] if versions else None


class LocalModelStore(ModelStore):
    """A directory: ``ROOT/<model_id>/v<version>.sealed``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create model store {self.root}: {exc.strerror}") from exc

    def _dir(self, model_id: str) -> Path:
        if not _ID.match(model_id):
            raise StoreError("invalid model id")
        return self.root / model_id

    def put(self, model_id: str, version: int, sealed: bytes) -> None:
        self._write_once(self._dir(model_id) / f"v{version}.sealed", sealed, f"{model_id} version {version}")

    def put_file(self, model_id: str, version: int, source: Path) -> None:
        # Copied in blocks: a large model never sits in memory.
        self._write_once(self._dir(model_id) / f"v{version}.sealed", source, f"{model_id} version {version}")

    def put_part(self, model_id: str, version: int, name: str, data: bytes) -> None:
        self._write_once(self._part(model_id, version, name), data, f"{model_id} version {version} {name}")

    def _part(self, model_id: str, version: int, name: str) -> Path:
        if name not in PART_FILES and not LINEAR_FILE.fullmatch(name):
            raise StoreError(f"not a part of a partitioned model: {name}")
        return self._dir(model_id) / f"v{version}.{name}"

    def part_path(self, model_id: str, version: int, name: str) -> Path:
        target = self._part(model_id, version, name)
        if not target.is_file():
            raise NotFound(f"model {model_id} version {version} has no {name} in the store")
        return target

    @staticmethod
    def _write_once(target: Path, data: bytes | Path, what: str) -> None:
        """Write ``target`` atomically (a hard link of a complete temporary file); never overwrite.

        ``data``: the bytes, or a file whose content is copied in blocks.
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        if isinstance(data, Path):
            shutil.copyfile(data, tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError as exc:
            raise StoreError(f"{what} already stored") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def path(self, model_id: str, version: int) -> Path:
        target = self._dir(model_id) / f"v{version}.sealed"
        if not target.is_file():
            raise NotFound(f"model {model_id} version {version} is not in the store")
        return target

    def delete(self, model_id: str) -> int:
        directory = self._dir(model_id)
        if not directory.is_dir():
            return 0
        files = [path for path in directory.iterdir() if path.is_file()]
        for path in files:
            path.unlink()
        directory.rmdir()
        return len(files)

    def versions(self, model_id: str) -> list[int]:
        directory = self._dir(model_id)
        if not directory.is_dir():
            return []
        found = []
        for entry in directory.glob("v*.sealed"):
            try:
                found.append(int(entry.stem[1:]))
            except ValueError:
                continue
        return sorted(found)
