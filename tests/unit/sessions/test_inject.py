"""Injected files and mounted volumes, served from memory to Python-level file calls."""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealedml.errors import ConfigurationError, InputError
from sealedml.sessions.inject import VirtualFiles
from sealedml.sessions.launcher import gramine_mount_key, split_command
from sealedml.shield.volume import MemoryTracker, Volume

KEY = bytes(range(32))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VirtualFiles, Volume]]:
    volume = Volume.create(tmp_path / "vol", "s/data", KEY, MemoryTracker())
    volume.write("dir/a.txt", b"alpha")
    files = VirtualFiles()
    files.add_file("/run/secrets/token", b"s3cret")
    files.mount("/data", volume)
    files.install()
    try:
        yield files, volume
    finally:
        files.uninstall()


def test_injected_files_are_read_through_open_pathlib_and_stat(served: tuple[VirtualFiles, Volume]) -> None:
    with open("/run/secrets/token") as f:
        assert f.read() == "s3cret"
    assert Path("/run/secrets/token").read_bytes() == b"s3cret"
    assert os.path.isfile("/run/secrets/token") and os.path.isdir("/run/secrets")
    assert os.listdir("/run/secrets") == ["token"]
    assert os.stat("/run/secrets/token").st_size == 6


def test_injected_files_are_read_only(served: tuple[VirtualFiles, Volume]) -> None:
    with pytest.raises(PermissionError):
        open("/run/secrets/token", "w")
    with pytest.raises(PermissionError):
        Path("/run/secrets/token").write_text("x")


def test_volume_files_are_decrypted_on_read_and_sealed_on_close(
    served: tuple[VirtualFiles, Volume], tmp_path: Path
) -> None:
    _, volume = served
    assert Path("/data/dir/a.txt").read_text() == "alpha"
    assert sorted(os.listdir("/data")) == ["dir"] and os.listdir("/data/dir") == ["a.txt"]
    version = volume.version
    Path("/data/new.txt").write_text("written by an unmodified program")
    with open("/data/dir/a.txt", "ab") as f:
        f.write(b"+beta")
    assert volume.read("new.txt") == b"written by an unmodified program"
    assert volume.read("dir/a.txt") == b"alpha+beta"
    assert volume.version == version + 2  # each close committed a new root
    assert b"written" not in (tmp_path / "vol" / "new.txt.sealed").read_bytes()


def test_volume_paths_that_do_not_exist_behave_like_missing_files(served: tuple[VirtualFiles, Volume]) -> None:
    assert not os.path.exists("/data/nothing.txt")
    with pytest.raises(FileNotFoundError):
        open("/data/nothing.txt")
    with pytest.raises(IsADirectoryError):
        open("/data/dir")
    with pytest.raises(FileExistsError):
        open("/data/dir/a.txt", "x")
    with pytest.raises(OSError, match="not both"):
        open("/data/dir/a.txt", "r+")


def test_other_paths_and_uninstall_are_untouched(served: tuple[VirtualFiles, Volume], tmp_path: Path) -> None:
    files, _ = served
    (tmp_path / "plain.txt").write_text("plain")
    assert open(tmp_path / "plain.txt").read() == "plain"
    files.uninstall()
    assert builtins.open is io.open and not os.path.exists("/run/secrets/token")


def test_relative_paths_are_refused() -> None:
    files = VirtualFiles()
    with pytest.raises(InputError):
        files.add_file("run/secrets/x", b"")


def test_split_command_takes_a_script_and_its_arguments(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text("print(1)\n")
    assert split_command(["python3", str(script), "--x"]) == (script, ["--x"])
    assert split_command([str(script)]) == (script, [])
    for bad in ([], ["python"], ["python", "-c", "print(1)"], ["python", str(tmp_path / "missing.py")]):
        with pytest.raises(ConfigurationError):
            split_command(bad)


def test_gramine_mount_keys_are_16_bytes_and_differ_per_volume() -> None:
    one, two = gramine_mount_key(KEY, "s", "data"), gramine_mount_key(KEY, "s", "logs")
    assert len(one) == 16 and one != two and one != KEY[:16]
