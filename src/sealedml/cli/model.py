"""Model owner and user commands: ``model convert|seal|allow-runtime|grant|revoke|enable|info|audit|list|delete``.

::

    sealedml model convert SAVEDMODEL --out MODEL.onnx [--signature S] [--tolerance T]   (owner, offline)
    sealedml model seal IN.onnx|IN.tflite --model-id ID --store DIR [--version N]       (owner)
    sealedml model allow-runtime ID --measurement [TEE:]HEX [--tee T] [--remove] (owner)
    sealedml model grant|revoke ID --user USER_ID                             (owner)
    sealedml model enable ID [--measurement [TEE:]HEX ...] [--tee T]           (user)
    sealedml model info ID                                                    (owner, granted users)
    sealedml model audit ID [--since SEQ] [--limit N]                         (owner)
    sealedml model list                                                       (owner)
    sealedml model delete ID [--store DIR] --yes                              (owner)

Each but ``convert`` takes ``--identity FILE --keyservice URL`` and the KeyService trust flags.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealedml.cli._args import (
    TEE_TYPES,
    Subcommands,
    add_command,
    add_group,
    add_identity,
    add_keyservice,
    keyservice_client,
    measurement_hex,
    runtime_measurement,
)
from sealedml.errors import ConfigurationError

if TYPE_CHECKING:
    from sealedml.client.keyservice import KeyServiceClient

__all__ = [
    "add_parser",
    "handle_model_allow_runtime",
    "handle_model_audit",
    "handle_model_convert",
    "handle_model_delete",
    "handle_model_enable",
    "handle_model_grant",
    "handle_model_info",
    "handle_model_list",
    "handle_model_seal",
]


def _progress_printer(what: str) -> Callable[[int, int], None]:
    """A progress callback printing ``what: N% of SIZE`` on stderr at every tenth (a line each: logs stay readable)."""
    import sys

    from sealedml._internal.units import format_bytes

    shown = [-1]

    def show(done: int, total: int) -> None:
        tenth = 10 if total == 0 else done * 10 // total
        if tenth > shown[0]:
            shown[0] = tenth
            print(f"{what}: {tenth * 10}% of {format_bytes(total)}", file=sys.stderr, flush=True)

    return show


def handle_model_seal(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model seal``: seal an ONNX model, store it, and upload its key to the KeyService.

    Raises:
        InputError: the file is not a usable ONNX model.
        ConfigurationError: unreadable identity or bad trust options.
    """
    from sealedml.client.model_check import check_model_file, is_tflite_file
    from sealedml.client.owner import load_model_file, publish_model, publish_partition
    from sealedml.storage.modelstore import LocalModelStore

    if (args.input is None) == (args.partition is None):
        raise ConfigurationError("give IN.onnx or --partition DIR (from `sealedml partition split`), not both")
    store = LocalModelStore(args.store)
    if args.partition is not None:
        from sealedml.partition.split import load_partition

        partition = load_partition(args.partition)
        with keyservice_client(args) as ks:
            published = publish_partition(
                partition, model_id=args.model_id, keyservice=ks, store=store, version=args.version
            )
    else:
        signature = check_model_file(args.input)  # loads in ONNX Runtime (or LiteRT) before anything is sealed
        # A .tflite file is sealed unmodified (its bytes); an .onnx file is read tensor by tensor, never loaded.
        loaded = load_model_file(args.input) if is_tflite_file(args.input) else None
        model = loaded if loaded is not None else args.input
        with keyservice_client(args) as ks:
            published = publish_model(
                model,
                model_id=args.model_id,
                keyservice=ks,
                store=store,
                version=args.version,
                signature=signature,
                progress=None if args.json else _progress_printer(f"sealing {args.input.name}"),
            )
    result: dict[str, Any] = {
        "model_id": published.model_id,
        "version": published.version,
        "sealed_bytes": published.sealed_bytes,
        "sealed_sha256": published.sealed_sha256,
        "store": str(args.store),
    }
    if published.partition_sha256 is not None:
        result["partition_sha256"] = published.partition_sha256
        result["note"] = "partitioned: the middle's weights are stored in the clear and run outside the TEE"
    return result


def handle_model_allow_runtime(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model allow-runtime``: allow (or with ``--remove`` disallow) a runtime measurement.

    Raises:
        ConfigurationError: unreadable identity, bad trust options, or a TEE type the KeyService refuses.
    """
    from sealedml.client.keyservice import parse_runtime

    runtime = parse_runtime(args.measurement, args.tee)
    with keyservice_client(args) as ks:
        ks.allow_runtime(args.model_id, runtime.measurement, tee=runtime.tee, allow=not args.remove)
        tee = runtime.tee or _only_accepted_tee(ks)
    return {"model_id": args.model_id, "tee": tee, "measurement": runtime.measurement, "allowed": not args.remove}


def _only_accepted_tee(ks: KeyServiceClient) -> str | None:
    """The TEE type the KeyService applied to a runtime named without one (its only accepted type)."""
    accepts = ks.attest().accepts
    return str(accepts[0]) if len(accepts) == 1 else None


def handle_model_grant(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model grant`` and ``model revoke`` (``args.action``): a user's access to a model.

    Raises:
        ConfigurationError: unreadable identity or bad trust options.
    """
    grant = args.action == "grant"
    with keyservice_client(args) as ks:
        ks.grant(args.model_id, args.user, grant=grant)
    return {"model_id": args.model_id, "user_id": args.user, "granted": grant}


def handle_model_enable(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model enable``: upload your request key and consent to runtimes (default: this build's).

    Raises:
        ConfigurationError: unreadable identity, bad trust options or measurements.
    """
    from sealedml.client.keyservice import parse_runtime

    measurements = args.measurement or [f"simulated:{runtime_measurement()}"]
    runtimes = [parse_runtime(m, args.tee) for m in measurements]
    with keyservice_client(args) as ks:
        ks.enable(args.model_id, measurements, tee=args.tee, accept_partitioned=args.accept_partitioned)
        user = ks.identity.principal_id if ks.identity is not None else None
        default_tee = _only_accepted_tee(ks)
    return {
        "model_id": args.model_id,
        "user_id": user,
        "consented_runtimes": [f"{r.tee or default_tee}:{r.measurement}" for r in runtimes],
        "accept_partitioned": args.accept_partitioned,
    }


def handle_model_info(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model info``: what the caller may know about a model.

    Raises:
        ConfigurationError: unreadable identity or bad trust options.
    """
    with keyservice_client(args) as ks:
        info: dict[str, Any] = ks.model_info(args.model_id).model_dump()
        return info


def handle_model_list(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model list``: the models you own, with their current version.

    Raises:
        ConfigurationError: unreadable identity or bad trust options.
    """
    with keyservice_client(args) as ks:
        listed = ks.list_models()
    return {"models": [m.model_dump() for m in listed.models]}


def handle_model_delete(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model delete``: remove your model from the KeyService and, with ``--store``, its files.

    Raises:
        ConfigurationError: no ``--yes``.
        AccessDenied: you are not the model's owner.
    """
    from sealedml.storage.modelstore import LocalModelStore

    if not args.yes:
        raise ConfigurationError(
            f"this deletes every key of {args.model_id} (no user can be served it again): add --yes to go ahead"
        )
    with keyservice_client(args) as ks:
        ks.delete_model(args.model_id)
    removed = LocalModelStore(args.store).delete(args.model_id) if args.store is not None else None
    result: dict[str, Any] = {"model_id": args.model_id, "deleted": True}
    if removed is not None:
        result["store_files_removed"] = removed
    return result


def handle_model_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model audit``: the audit records about your model (owner only), oldest first.

    Raises:
        ConfigurationError: a bad ``--since`` or ``--limit``, unreadable identity or bad trust options.
        AccessDenied: you are not the model's owner.
    """
    if args.since < 0 or not 1 <= args.limit <= 1000:
        raise ConfigurationError("--since must be ≥ 0 and --limit between 1 and 1000")
    with keyservice_client(args) as ks:
        page = ks.model_audit(args.model_id, since=args.since, limit=args.limit)
    records = [
        {"seq": r.seq, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.ts)), **r.event} for r in page.records
    ]
    result: dict[str, Any] = {"model_id": page.model_id, "records": records, "next_since": page.next_since}
    if page.next_since is not None and not args.json:
        result["more"] = f"more records: --since {page.next_since}"
    return result


def handle_model_convert(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``model convert``: a TensorFlow SavedModel to ONNX, with its largest difference reported.

    Raises:
        ConfigurationError: not a SavedModel, the output exists, no interpreter with TensorFlow
            and tf2onnx, or the conversion failed.
        InputError: the ONNX model differs from the original by more than ``--tolerance``.
    """
    import sys

    from sealedml.client.convert import convert_saved_model

    if not args.json:
        print(f"converting {args.saved_model} with tf2onnx (TensorFlow loads in a side process)…", file=sys.stderr)
    report = convert_saved_model(
        args.saved_model,
        args.out,
        signature=args.signature,
        opset=args.opset,
        samples=args.samples,
        tolerance=args.tolerance,
        python=args.python,
    )
    return report.to_json()


def add_parser(subparsers: Subcommands) -> None:
    """Register the ``model`` group on ``subparsers``."""
    model = add_group(subparsers, "model", "model owner and user commands")
    p = add_command(model, "convert", handle_model_convert, "convert a TensorFlow SavedModel to ONNX (owner, offline)")
    p.add_argument("saved_model", type=Path, metavar="SAVEDMODEL", help="SavedModel directory")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL.onnx", help="where to write (never overwritten)")
    p.add_argument("--signature", default="serving_default", help="signature to convert (default serving_default)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--samples", type=int, default=8, help="random inputs the two models are compared on (default 8)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute difference accepted (default 1e-4)")
    p.add_argument("--python", type=Path, metavar="PATH", help="an interpreter with TensorFlow and tf2onnx")
    p = add_command(model, "seal", handle_model_seal, "seal an ONNX model, store it, upload its key")
    p.add_argument("input", type=Path, metavar="IN.onnx|IN.tflite", nargs="?", default=None)
    p.add_argument(
        "--partition",
        type=Path,
        metavar="DIR",
        default=None,
        help="seal a partitioned model instead (`sealedml partition split`): front and back sealed, "
        "the middle stored in the clear to run outside the TEE",
    )
    p.add_argument("--model-id", required=True, help="the model's id (first come, first owned)")
    p.add_argument("--store", required=True, type=Path, help="the model store directory (sealed models only)")
    p.add_argument("--version", type=int, default=None, help="version number (default: next)")
    add_identity(p)
    add_keyservice(p)

    p = add_command(model, "allow-runtime", handle_model_allow_runtime, "allow a runtime measurement for a model")
    p.add_argument("model_id", metavar="ID")
    p.add_argument(
        "--measurement",
        required=True,
        type=measurement_hex,
        metavar="[TEE:]HEX",
        help="the runtime's measurement: HEX, or TEE:HEX for another TEE type",
    )
    p.add_argument(
        "--tee",
        choices=TEE_TYPES,
        default=None,
        help="the TEE type the measurement is for (default: the KeyService's only accepted type; "
        "required where it accepts several)",
    )
    p.add_argument("--remove", action="store_true", help="disallow instead")
    add_identity(p)
    add_keyservice(p)

    for action in ("grant", "revoke"):
        p = add_command(model, action, handle_model_grant, f"{action} a user's access to a model")
        p.add_argument("model_id", metavar="ID")
        p.add_argument(
            "--user", required=True, metavar="USER_ID", help="the user's principal id (printed by their `identity new`)"
        )
        p.set_defaults(action=action)
        add_identity(p)
        add_keyservice(p)

    p = add_command(model, "enable", handle_model_enable, "user: upload your request key and consent to runtimes")
    p.add_argument("model_id", metavar="ID")
    p.add_argument(
        "--measurement",
        action="append",
        type=measurement_hex,
        metavar="[TEE:]HEX",
        help="runtime you consent to (repeatable; default: this build's simulated runtime)",
    )
    p.add_argument(
        "--tee",
        choices=TEE_TYPES,
        default=None,
        help="TEE type of the --measurement values that name none (default: the KeyService's only accepted type)",
    )
    p.add_argument(
        "--accept-partitioned",
        action="store_true",
        help="also accept partitioned versions: their middle layers run outside the TEE, on representations "
        "of your inputs (docs/partition.md); without this flag such versions are never run on your requests",
    )
    add_identity(p)
    add_keyservice(p)

    p = add_command(model, "info", handle_model_info, "what you may know about a model")
    p.add_argument("model_id", metavar="ID")
    add_identity(p)
    add_keyservice(p)

    p = add_command(model, "list", handle_model_list, "owner: the models you own, with their current version")
    add_identity(p)
    add_keyservice(p)

    p = add_command(
        model, "delete", handle_model_delete, "owner: delete a model's keys, runtimes, grants and consents (and files)"
    )
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--store", type=Path, default=None, metavar="DIR", help="also remove its sealed files from DIR")
    p.add_argument("--yes", action="store_true", help="confirm: no user can be served the model afterwards")
    add_identity(p)
    add_keyservice(p)

    p = add_command(
        model,
        "audit",
        handle_model_audit,
        "owner: the KeyService's audit records about your model (why a release was denied)",
    )
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="records after this sequence number (default 0)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="records per page, 1–1000 (default 100)")
    add_identity(p)
    add_keyservice(p)
