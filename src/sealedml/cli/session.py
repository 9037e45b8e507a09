"""Sessions (secureTF's CAS) and the programs they run: ``session …`` and ``run``.

::

    sealedml session digest FILE
    sealedml session sign FILE --identity ID --signatures SIGS
    sealedml session put FILE --signatures SIGS --keyservice URL --identity ID
    sealedml session secret SESSION NAME (--value-file F | --value-stdin) --keyservice URL --identity ID
    sealedml session show SESSION --keyservice URL --identity ID
    sealedml run --session S --service X --keyservice URL [--volume NAME=DIR[:MOUNT]]
                 [--expose LISTEN=TARGET] [--connect LISTEN=PEER@TARGET] -- python app.py [ARGS]

docs/sessions.md has the document format and a walk-through.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_group, add_identity, add_keyservice, add_tee
from sealedml.errors import ConfigurationError

__all__ = ["add_parser", "handle_run", "handle_session"]


def _load(path: Path) -> Any:
    from sealedml.sessions.document import load_session

    return load_session(path)


def _read_signatures(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: not a signatures file ({type(exc).__name__})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ConfigurationError(f"{path}: a signatures file is a JSON list of {{signer, signature}}")
    return data


def handle_session(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``session digest|sign|put|secret|show``.

    Raises:
        SessionError: the document is malformed (the message names the field).
        ConfigurationError: unreadable files, or a secret given twice or not at all.
        AccessDenied: the caller is not a signer of the session (KeyService calls).
        Conflict: the KeyService refused the revision (signatures, predecessor, a race).
    """
    from sealedml.cli._args import keyservice_client
    from sealedml.client.identity import Identity
    from sealedml.sessions.document import sign_session

    if args.action == "digest":
        document = _load(args.file)
        return {"session": document.name, "revision": document.revision, "digest": document.digest()}
    if args.action == "sign":
        document = _load(args.file)
        signature = sign_session(document, Identity.load(args.identity).signing_key).model_dump()
        signatures = [s for s in _read_signatures(args.signatures) if s.get("signer") != signature["signer"]]
        args.signatures.write_text(json.dumps([*signatures, signature], indent=2) + "\n")
        return {
            "session": document.name,
            "revision": document.revision,
            "signer": signature["signer"],
            "signatures": len(signatures) + 1,
            "file": str(args.signatures),
        }
    with keyservice_client(args) as ks:
        if args.action == "put":
            document = _load(args.file)
            return ks.put_session(
                document.model_dump(mode="json", exclude_none=True), _read_signatures(args.signatures)
            )
        if args.action == "secret":
            if (args.value_file is None) == (not args.value_stdin):
                raise ConfigurationError("give the value with --value-file FILE or --value-stdin, once")
            value = sys.stdin.buffer.read() if args.value_stdin else args.value_file.read_bytes()
            ks.upload_session_secret(args.session, args.name, value)
            return {"session": args.session, "secret": args.name, "set": True}
        return ks.show_session(args.session).model_dump()


def _address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _plan(args: argparse.Namespace) -> Any:
    from sealedml.sessions.launcher import GRAMINE_KEYS, Forward, LaunchPlan, VolumeMount, split_command

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    script, program_args = split_command(command)
    volumes = []
    for text in args.volume:
        name, sep, rest = text.partition("=")
        directory, _, mount = rest.partition(":")
        if not sep or not name or not directory or (mount and not mount.startswith("/")):
            raise ConfigurationError(f"--volume: expected NAME=DIR[:/MOUNT], got {text!r}")
        volumes.append(VolumeMount(name, Path(directory), mount or f"/volumes/{name}"))
    forwards = []
    for text in args.expose:
        listen, sep, target = text.partition("=")
        if not sep:
            raise ConfigurationError(f"--expose: expected LISTEN=TARGET, got {text!r}")
        forwards.append(Forward("expose", _address(listen, "--expose"), _address(target, "--expose")))
    for text in args.connect:
        listen, sep, rest = text.partition("=")
        peer, at, target = rest.partition("@")
        if not sep or not at or not peer:
            raise ConfigurationError(f"--connect: expected LISTEN=PEER@TARGET, got {text!r}")
        forwards.append(Forward("connect", _address(listen, "--connect"), _address(target, "--connect"), peer))
    gramine_keys = args.gramine_keys
    if gramine_keys is None and GRAMINE_KEYS.is_dir():
        gramine_keys = GRAMINE_KEYS
    return LaunchPlan(args.session, args.service, script, program_args, volumes, forwards, gramine_keys)


def handle_run(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``run``: attest, receive the session's bundle, run the program with it.

    Exits with the program's own status. Nothing of the program runs unless the KeyService
    released the bundle.

    Raises:
        AccessDenied: the KeyService released nothing (its audit log names the reason).
        VolumeError: a volume is tampered with or rolled back.
        ConfigurationError: no program, or malformed flags.
    """
    from sealedml.attestation.tee import build_attester
    from sealedml.cli._args import keyservice_trust
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.sessions.launcher import Launcher, program_digest

    plan = _plan(args)
    trust = keyservice_trust(args)
    config = {**trust.measured_config(), "program": program_digest(plan.script)}
    attester = build_attester(args.tee, role="program", config=config)
    with KeyServiceClient(args.keyservice, trust=trust) as ks:
        launcher = Launcher(ks, attester, plan)
        try:
            launcher.start()
            code = launcher.run()
        finally:
            launcher.close()
    return {"_exit": code, "_silent": True}


def add_parser(subparsers: Subcommands) -> None:
    """Register ``session …`` and ``run`` on ``subparsers``."""
    group = add_group(subparsers, "session", "sessions: secrets and configuration for attested programs")
    p = add_command(group, "digest", handle_session, "print a session document's name, revision and digest")
    p.set_defaults(action="digest")
    p.add_argument("file", type=Path, help="session document (YAML or JSON)")
    p = add_command(group, "sign", handle_session, "sign a session document and add it to a signatures file")
    p.set_defaults(action="sign")
    p.add_argument("file", type=Path, help="session document (YAML or JSON)")
    add_identity(p)
    p.add_argument("--signatures", required=True, type=Path, metavar="FILE", help="signatures file (JSON; created)")
    p = add_command(group, "put", handle_session, "store a new session or its next revision in the KeyService")
    p.set_defaults(action="put")
    p.add_argument("file", type=Path, help="session document (YAML or JSON)")
    p.add_argument("--signatures", required=True, type=Path, metavar="FILE", help="signatures file (JSON)")
    add_keyservice(p)
    add_identity(p)
    p = add_command(group, "secret", handle_session, "upload the value of an uploaded secret, sealed to the KeyService")
    p.set_defaults(action="secret")
    p.add_argument("session", help="session name")
    p.add_argument("name", help="secret name")
    p.add_argument("--value-file", type=Path, metavar="FILE", help="read the value from FILE")
    p.add_argument("--value-stdin", action="store_true", help="read the value from standard input")
    add_keyservice(p)
    add_identity(p)
    p = add_command(group, "show", handle_session, "show a session's latest revision (signers only; no values)")
    p.set_defaults(action="show")
    p.add_argument("session", help="session name")
    add_keyservice(p)
    add_identity(p)

    p = add_command(subparsers, "run", handle_run, "run an unmodified Python program as a service of a session")
    p.add_argument("--session", required=True, help="session name")
    p.add_argument("--service", required=True, help="service of the session this program is")
    add_keyservice(p)
    add_tee(p)
    p.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="NAME=DIR[:MOUNT]",
        help="open encrypted volume NAME in DIR, seen by the program at MOUNT (default /volumes/NAME)",
    )
    p.add_argument(
        "--expose",
        action="append",
        default=[],
        metavar="LISTEN=TARGET",
        help="accept mutual TLS from the session's peers on LISTEN, forward plain TCP to TARGET",
    )
    p.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="LISTEN=PEER@TARGET",
        help="accept plain TCP on LISTEN, forward over mutual TLS to service PEER at TARGET",
    )
    p.add_argument(
        "--gramine-keys",
        type=Path,
        metavar="DIR",
        help="where Gramine takes encrypted-mount keys (default /dev/attestation/keys when present)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- python SCRIPT [ARGS]")
