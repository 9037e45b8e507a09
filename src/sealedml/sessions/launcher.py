"""Run an unmodified Python program as a service of a session (``sealedml run``).

In order, in one process:

1. attest to the KeyService and receive the service's bundle (:func:`~sealedml.sessions.program.release_session`);
2. under Gramine, hand each volume's key to its ``encrypted`` mounts (``/dev/attestation/keys``);
3. open the session's encrypted volumes against the KeyService's root tags and serve them,
   with the injected files, from memory (:class:`~sealedml.sessions.inject.VirtualFiles`);
4. start the TLS forwarders of the network shield (:class:`~sealedml.shield.network.Forwarder`);
5. set the environment and arguments, and run the program's ``__main__`` in this process
   (``runpy``), while a thread renews the lease: when the KeyService refuses a renewal (the
   session was revoked) or the lease runs out, the program is stopped.

The program's measurement is this build's with the program's own digest (the simulated TEE
hashes both; a Gramine manifest lists the script as a trusted file), so a session admits one
program, not any program run by this build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sealedml._internal.encoding import fields
from sealedml.attestation.base import Attester
from sealedml.client.keyservice import KeyServiceClient
from sealedml.crypto import hkdf_sha256
from sealedml.errors import AccessDenied, ConfigurationError, Error
from sealedml.sessions.inject import VirtualFiles
from sealedml.sessions.program import LeaseTracker, SessionLease, release_session
from sealedml.shield.network import Forwarder
from sealedml.shield.volume import Volume, VolumeError

__all__ = ["Forward", "LaunchPlan", "Launcher", "VolumeMount", "gramine_mount_key", "program_digest", "split_command"]

log = logging.getLogger(__name__)

#: Where Gramine takes keys for its ``encrypted`` mounts.
GRAMINE_KEYS = Path("/dev/attestation/keys")
#: Seconds a stopped program has to exit on SIGTERM before the process ends without it.
_STOP_GRACE = 5.0
#: Seconds the forwarders' live connections get to finish after the program ends.
_DRAIN = 5.0


def program_digest(script: Path) -> str:
    """SHA-256 (hex) of the program's script: part of its simulated measurement."""
    try:
        return hashlib.sha256(script.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigurationError(f"cannot read program {script}: {exc.strerror or exc}") from None


def split_command(command: list[str]) -> tuple[Path, list[str]]:
    """The script and its arguments of ``[python] SCRIPT [ARGS…]``.

    Raises:
        ConfigurationError: no command, or the script is not a readable ``.py`` file.
    """
    if command and Path(command[0]).name.startswith("python") and not command[0].endswith(".py"):
        command = command[1:]
    if not command:
        raise ConfigurationError("give the program after --: sealedml run … -- python app.py [ARGS]")
    if command[0].startswith("-"):
        raise ConfigurationError(f"run takes a script file, not interpreter option {command[0]!r}")
    script = Path(command[0])
    if script.suffix != ".py" or not script.is_file():
        raise ConfigurationError(f"{script}: not a Python script file")
    return script, command[1:]


def gramine_mount_key(volume_key: bytes, session: str, volume: str) -> bytes:
    """The 16-byte key of a Gramine ``encrypted`` mount, derived from the session's volume key."""
    return hkdf_sha256(volume_key, info=fields(b"sealedml/v1/gramine-encrypted-mount", session, volume))[:16]


@dataclass(frozen=True)
class VolumeMount:
    """An encrypted volume of the session: its directory on the host and where the program sees it."""

    name: str
    directory: Path
    mount: str


@dataclass(frozen=True)
class Forward:
    """One forwarder: ``expose`` (mutual TLS in, plain TCP out) or ``connect`` (plain in, TLS out to ``peer``)."""

    kind: str
    listen: tuple[str, int]
    target: tuple[str, int]
    peer: str | None = None


@dataclass
class LaunchPlan:
    """What ``sealedml run`` was asked to do."""

    session: str
    service: str
    script: Path
    args: list[str]
    volumes: list[VolumeMount] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    gramine_keys: Path | None = None


def _stop_process(reason: str) -> None:
    print(f"sealedml run: {reason}: stopping the program", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(_STOP_GRACE, os._exit, args=(75,))
    timer.daemon = True
    timer.start()


class Launcher:
    """Runs one program under one session's lease (see the module docstring).

    Args:
        keyservice: a client of the KeyService the program trusts.
        attester: the program's attester.
        plan: the session, service, program, volumes and forwarders.
        stop: called with a reason when the lease is revoked or runs out (default: SIGTERM,
            then exit after a grace period).
    """

    def __init__(
        self,
        keyservice: KeyServiceClient,
        attester: Attester,
        plan: LaunchPlan,
        *,
        stop: Callable[[str], None] = _stop_process,
    ) -> None:
        self._keyservice, self._attester, self.plan, self._stop = keyservice, attester, plan, stop
        self._lease: SessionLease | None = None
        self._files = VirtualFiles()
        self._forwarders: list[Forwarder] = []
        self._closed = threading.Event()
        self.volumes: dict[str, Volume] = {}

    @property
    def lease(self) -> SessionLease:
        if self._lease is None:
            raise ConfigurationError("the launcher has no lease yet")
        return self._lease

    def _release(self) -> SessionLease:
        return release_session(self._keyservice, self._attester, self.plan.session, self.plan.service)

    def start(self) -> SessionLease:
        """Release the bundle and set up volumes, files and forwarders (nothing of the program runs yet).

        Raises:
            AccessDenied: the KeyService released nothing (audited there with the reason).
            VolumeError: a volume is tampered with, rolled back, or not in the session.
        """
        self._lease = lease = self._release()
        if self.plan.gramine_keys is not None:
            for name, volume_key in lease.volume_keys.items():
                (self.plan.gramine_keys / name).write_bytes(gramine_mount_key(volume_key, lease.session, name))
        tracker = LeaseTracker(self._keyservice, lambda: self.lease)
        for mount in self.plan.volumes:
            key = lease.volume_keys.get(mount.name)
            if key is None:
                raise VolumeError(f"service {lease.service} of session {lease.session} has no volume {mount.name!r}")
            volume_id = lease.volume_id(mount.name)
            fresh = not mount.directory.exists() or not any(mount.directory.iterdir())
            if fresh and tracker.current(volume_id) is None:
                volume = Volume.create(mount.directory, volume_id, key, tracker)
            else:
                volume = Volume.open_existing(mount.directory, volume_id, key, tracker)
            self.volumes[mount.name] = volume
            self._files.mount(mount.mount, volume)
        for path, data in lease.files.items():
            self._files.add_file(path, data)
        for forward in self.plan.forwards:
            if forward.kind == "expose":
                forwarder = Forwarder.inbound(lease.tls, forward.listen, forward.target)
            else:
                forwarder = Forwarder.outbound(lease.tls, forward.listen, forward.target, forward.peer or "")
            self._forwarders.append(forwarder.start())
        threading.Thread(target=self._renew, name="sealedml-lease", daemon=True).start()
        return lease

    def _renew(self) -> None:
        """Renew the lease at half its life; stop the program when refused or expired."""
        while not self._closed.is_set():
            remaining = self.lease.expires_at - time.time()
            if self._closed.wait(max(0.2, remaining / 2)):
                return
            try:
                lease = self._release()
            except AccessDenied:
                self._stop(f"session {self.plan.session} no longer admits this program (revoked)")
                return
            except Error as exc:
                if self.lease.expires_at <= time.time():
                    self._stop(f"lease of session {self.plan.session} expired ({exc.code})")
                    return
                log.warning("lease renewal failed (%s); retrying", exc.code)
                continue
            self._lease = lease
            for forwarder in self._forwarders:
                forwarder.reload(lease.tls)

    def run(self) -> int:
        """Run the program in this process with the bundle injected; return its exit status."""
        lease = self.lease
        os.environ.update(lease.env)
        for mount in self.plan.volumes:
            os.environ[f"SEALEDML_VOLUME_{mount.name.upper().replace('-', '_').replace('.', '_')}"] = mount.mount
        script = self.plan.script.resolve()
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        sys.argv = [str(script), *self.plan.args, *lease.argv]
        sys.path[0:0] = [str(script.parent)]
        self._files.install()
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return int(exc.code or 0)
            print(exc.code, file=sys.stderr)
            return 1
        except Exception:  # the program's own failure: report it as Python would
            traceback.print_exc()
            return 1
        finally:
            self._files.uninstall()
            sys.argv, sys.path[:] = saved_argv, saved_path
        return 0

    def close(self) -> None:
        """Stop renewing and close the forwarders (live connections get a few seconds to finish)."""
        self._closed.set()
        for forwarder in self._forwarders:
            forwarder.close(drain=_DRAIN)
