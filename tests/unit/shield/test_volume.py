"""Encrypted volumes: every tampered, swapped, truncated or rolled-back state is a typed error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sealedml.crypto import random_bytes
from sealedml.errors import Conflict, InputError
from sealedml.shield import MemoryTracker, Volume, VolumeError, VolumeRollbackError, VolumeTamperedError

KEY = random_bytes(32)


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Volume, MemoryTracker]:
    tracker = MemoryTracker()
    v = Volume.create(tmp_path / "vol", "vol-1", KEY, tracker)
    v.write("model/weights.bin", b"w" * 200_000)  # several chunks
    v.write("config.json", b'{"lr": 0.1}')
    return v, tracker


def test_files_round_trip_and_reopen(volume: tuple[Volume, MemoryTracker]) -> None:
    v, tracker = volume
    again = Volume.open_existing(v.root, "vol-1", KEY, tracker)
    assert again.paths() == ["config.json", "model/weights.bin"] and again.version == 3
    assert again.read("model/weights.bin") == b"w" * 200_000
    assert again.open("config.json").read() == b'{"lr": 0.1}'
    assert b"lr" not in (v.root / "config.json.sealed").read_bytes()  # encrypted at rest


def test_an_unmodified_library_opens_the_plaintext_through_a_memory_path(volume: tuple[Volume, MemoryTracker]) -> None:
    v, _ = volume
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    v.write("x.npy", buffer.getvalue())
    with v.plaintext_path("x.npy") as path:
        assert path.startswith("/proc/self/fd/")
        np.testing.assert_array_equal(np.load(path), array)  # numpy opens it like any file


def test_a_changed_byte_is_detected(volume: tuple[Volume, MemoryTracker]) -> None:
    v, tracker = volume
    target = v.root / "model/weights.bin.sealed"
    data = bytearray(target.read_bytes())
    data[-100] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(VolumeTamperedError, match="not the file"):
        v.read("model/weights.bin")


def test_two_swapped_files_are_detected(volume: tuple[Volume, MemoryTracker]) -> None:
    v, _ = volume
    a, b = v.root / "config.json.sealed", v.root / "model/weights.bin.sealed"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for path in ("config.json", "model/weights.bin"):
        with pytest.raises(VolumeTamperedError):
            v.read(path)


def test_a_truncated_file_is_detected(volume: tuple[Volume, MemoryTracker]) -> None:
    v, _ = volume
    target = v.root / "model/weights.bin.sealed"
    target.write_bytes(target.read_bytes()[:-70_000])
    with pytest.raises(VolumeTamperedError):
        v.read("model/weights.bin")


def test_an_older_copy_of_one_file_is_detected(volume: tuple[Volume, MemoryTracker]) -> None:
    v, _ = volume
    old = (v.root / "config.json.sealed").read_bytes()
    v.write("config.json", b'{"lr": 0.2}')
    (v.root / "config.json.sealed").write_bytes(old)
    with pytest.raises(VolumeTamperedError, match="not the file"):
        v.read("config.json")


def test_restoring_an_older_copy_of_the_whole_volume_is_detected(
    volume: tuple[Volume, MemoryTracker], tmp_path: Path
) -> None:
    v, tracker = volume
    backup = tmp_path / "backup"
    shutil.copytree(v.root, backup)
    v.write("config.json", b'{"lr": 0.3}')  # the volume moves on
    shutil.rmtree(v.root)
    shutil.copytree(backup, v.root)  # the storage's attacker puts the old state back
    with pytest.raises(VolumeRollbackError, match="not its latest state"):
        Volume.open_existing(v.root, "vol-1", KEY, tracker)


def test_a_tampered_manifest_a_wrong_key_and_an_untracked_volume_are_refused(
    volume: tuple[Volume, MemoryTracker],
) -> None:
    v, tracker = volume
    with pytest.raises(VolumeTamperedError, match="not authentic"):
        Volume.open_existing(v.root, "vol-1", random_bytes(32), tracker)
    with pytest.raises(VolumeTamperedError, match="not authentic"):  # the volume id is bound in too
        Volume.open_existing(v.root, "vol-2", KEY, tracker)
    with pytest.raises(VolumeRollbackError, match="unknown to the tracker"):
        Volume.open_existing(v.root, "vol-1", KEY, MemoryTracker())
    manifest = v.root / ".volume"
    data = bytearray(manifest.read_bytes())
    data[20] ^= 1
    manifest.write_bytes(bytes(data))
    with pytest.raises(VolumeTamperedError):
        Volume.open_existing(v.root, "vol-1", KEY, tracker)


def test_two_writers_cannot_both_commit(volume: tuple[Volume, MemoryTracker]) -> None:
    v, tracker = volume
    other = Volume.open_existing(v.root, "vol-1", KEY, tracker)
    v.write("a.txt", b"first")
    with pytest.raises(Conflict):
        other.write("b.txt", b"second")


def test_bad_paths_missing_files_and_existing_volumes_are_clear_errors(
    volume: tuple[Volume, MemoryTracker], tmp_path: Path
) -> None:
    v, tracker = volume
    for bad in ("../etc/passwd", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(InputError):
            v.write(bad, b"x")
    with pytest.raises(VolumeError, match="no file"):
        v.read("nope.txt")
    with pytest.raises(VolumeError, match="exists already"):
        Volume.create(v.root, "vol-1", KEY, tracker)
    with pytest.raises(VolumeError, match="holds no volume"):
        Volume.open_existing(tmp_path / "empty", "vol-9", KEY, tracker)
    (v.root / "config.json.sealed").unlink()
    with pytest.raises(VolumeTamperedError, match="missing"):
        v.read("config.json")
